import json
import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient
from seqeval.metrics import f1_score, precision_score, recall_score

from qloraner import ENTITY_TYPES, QloranerError
from qloraner.bio import entities_to_bio
from qloraner.config import EvalConfig
from qloraner.conll import read_split
from qloraner.decode import CPU_BATCH, generate_greedy
from qloraner.evaluate import ARTIFACTS, _prompt_ids, _prompts, evaluate_model, load_for_eval
from qloraner.labels import CONLL, LabelSet
from qloraner.metrics import score
from qloraner.model import load_tokenizer
from qloraner.parse import parse_response
from qloraner.prompts import Prompting
from tests.conftest import fill, last_line, run_entry

CPU = torch.device("cpu")


RECORDED = [  # (tokens, gold tags, raw response) as a model produced them
    (
        "SOCCER - JAPAN GET LUCKY WIN , CHINA IN SURPRISE DEFEAT .".split(),
        "O O B-LOC O O O O B-PER O O O O".split(),
        "[LOC] JAPAN\n[LOC] CHINA",
    ),
    (
        "Nadim Ladki".split(),
        "B-PER I-PER".split(),
        'The answer to the question of the sentence is "Nadim Ladki" is "Nadim',
    ),
    (
        "AL-AIN , United Arab Emirates 1996-12-06".split(),
        "B-LOC O B-LOC I-LOC I-LOC O".split(),
        "[LOC] AL-AIN\n[LOC] United Arab Emirates\n\n### Sentence:\nJapan began",
    ),
    (
        "Japan began the defence of their Asian Cup title".split(),
        "B-LOC O O O O O B-MISC I-MISC O".split(),
        "{'LOC': ['Japan'], 'MISC': ['Asian Cup title']}",
    ),
    ("But China saw their luck desert them".split(), "O B-LOC O O O O O".split(), "ORG: China"),
]


def test_scoring_path_matches_seqeval_on_recorded_responses():
    """parse -> tag -> score on recorded responses equals seqeval run on the hand-tagged predictions."""
    expected_pred = [
        "O O B-LOC O O O O B-LOC O O O O".split(),
        "O O".split(),
        "B-LOC O B-LOC I-LOC I-LOC O".split(),
        "B-LOC O O O O O B-MISC I-MISC I-MISC".split(),
        "O B-ORG O O O O O".split(),
    ]
    gold = [g for _, g, _ in RECORDED]
    pred = [entities_to_bio(tokens, parse_response(raw)) for tokens, _, raw in RECORDED]
    assert pred == expected_pred
    ours = score(gold, pred)
    assert (ours["precision"], ours["recall"], ours["f1"]) == (
        precision_score(gold, expected_pred),
        recall_score(gold, expected_pred),
        f1_score(gold, expected_pred),
    )
    assert ours["precision"] == pytest.approx(4 / 7) and ours["recall"] == pytest.approx(4 / 8)


def test_missing_adapter_and_foreign_adapter(tmp_path, tiny_adapter, smol_checkpoint, tiny_model):
    """A missing adapter folder, and an adapter trained on another base, are clear errors."""
    with pytest.raises(QloranerError, match="adapter not found"):
        load_for_eval(EvalConfig(adapter=str(tmp_path / "none")), CPU)
    with pytest.raises(QloranerError, match="adapter was trained on .*tiny-llama"):
        load_for_eval(EvalConfig(model=str(smol_checkpoint), adapter=str(tiny_adapter)), CPU)


def test_prompting_follows_the_adapter_unless_flags_say_otherwise(tmp_path, tiny_adapter):
    """Evaluation asks for the template and response format the adapter was trained with; flags override them."""
    import shutil

    adapter = tmp_path / "json-adapter"
    shutil.copytree(tiny_adapter, adapter)
    settings = json.loads((adapter / "train_config.json").read_text())
    (adapter / "train_config.json").write_text(json.dumps({**settings, "prompt": "typed", "response_format": "json"}))
    labels = LabelSet.from_saved(settings["labels"])
    assert load_for_eval(EvalConfig(adapter=str(adapter)), CPU).prompting == Prompting("typed", "json", labels)
    flags = EvalConfig(adapter=str(adapter), prompt="fewshot", response_format="lines")
    assert load_for_eval(flags, CPU).prompting == Prompting("fewshot", "lines", labels)


@pytest.mark.parametrize(
    "saved,types,meanings",
    [
        pytest.param(None, ENTITY_TYPES, CONLL.meanings, id="an-adapter-before-label-sets-tags-conll-types"),
        pytest.param({"PSN": "people", "GEO": ""}, ("GEO", "PSN"), (("PSN", "people"),), id="its-own-types"),
    ],
)
def test_evaluation_uses_the_label_set_the_adapter_recorded(tmp_path, tiny_adapter, saved, types, meanings):
    """The adapter's train_config.json `labels` is the label set evaluation prompts and parses with; an adapter
    saved before label sets (no key) means CoNLL-2003's four types."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    settings = {k: v for k, v in json.loads((adapter / "train_config.json").read_text()).items() if k != "labels"}
    (adapter / "train_config.json").write_text(json.dumps(settings | ({"labels": saved} if saved else {})))
    labels = load_for_eval(EvalConfig(adapter=str(adapter)), CPU).prompting.labels
    assert (labels.types, labels.meanings) == (types, meanings)


def test_empty_split_is_an_error(tmp_path, tiny_model):
    """A split file without sentences stops the evaluation with a message naming it."""
    (tmp_path / "test.txt").write_text("-DOCSTART- -X- -X- O\n\n")
    with pytest.raises(QloranerError, match="test split holds no sentences"):
        evaluate_model(EvalConfig(model=str(tiny_model), data_dir=str(tmp_path), output_dir=str(tmp_path / "o")), CPU)


def test_overlong_sentences_are_cut_counted_and_reported(tmp_path, tiny_model, conll_dir):
    """Sentences too long for --max-prompt-tokens are cut with a warning and counted in metrics.json."""
    config = EvalConfig(
        model=str(tiny_model),
        data_dir=str(conll_dir),
        split="valid",
        limit=6,
        max_new_tokens=4,
        max_prompt_tokens=90,
        output_dir=str(tmp_path / "o"),
        experiment="test",
    )
    with pytest.warns(UserWarning, match="cut to fit"):
        evaluate_model(config, CPU)
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    lengths = [len(s.tokens) for s in read_split(conll_dir, "valid")[:6]]
    assert 0 < metrics["truncated_sentences"] < 6 and max(lengths) > 20
    rows = [json.loads(line) for line in (tmp_path / "o" / "responses.jsonl").read_text().splitlines()]
    assert [len(r["pred_tags"]) for r in rows] == lengths


@pytest.mark.slow
def test_run_eval_sh_end_to_end(trained_default, conll_dir):
    """./run_eval.sh --limit 10 --compare-base writes every artifact and an MLflow run holding them; its output,
    not a terminal, says the batch size and shows each model's progress as plain lines."""
    import os
    import subprocess

    from mlflow.tracking import MlflowClient

    from tests.conftest import ROOT

    out = trained_default / "eval"
    env = {**os.environ, "CONLL_DIR": str(conll_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [
            str(ROOT / "run_eval.sh"),
            "--adapter",
            str(trained_default / "final"),
            "--limit",
            "10",
            "--compare-base",
            "--max-new-tokens",
            "16",
            "--batch-size",
            "10",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout.splitlines()  # a pipe, not a terminal: plain progress lines
    assert "qloraner: evaluating 10 test sentences on cpu, batch size 10" in log
    assert [line.split(" (")[0] for line in log if line.startswith("eval ")] == [
        "eval base 10/10",
        "eval fine-tuned 10/10",
    ]
    expected = {"metrics.json", "responses.jsonl", "responses_base.jsonl", "comparison.md", "f1_by_type.png"}
    assert expected <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {"tokens", "gold_tags", "raw_response", "entities", "pred_tags"} <= set(rows[0])
    rescored = score([r["gold_tags"] for r in rows], [r["pred_tags"] for r in rows])
    assert (rescored["precision"], rescored["recall"], rescored["f1"]) == (
        metrics["precision"],
        metrics["recall"],
        metrics["f1"],
    )
    assert "base" in metrics and "| f1 |" in (out / "comparison.md").read_text()
    client = MlflowClient(f"sqlite:///{trained_default / 'mlflow.db'}")  # beside the adapter's training run
    (run,) = client.search_runs(
        [client.get_experiment_by_name("qloraner").experiment_id], "attributes.run_name = 'eval-fine-tuned'"
    )
    assert run.data.metrics["f1"] == pytest.approx(metrics["f1"]) and "base_f1" in run.data.metrics
    assert run.data.params["limit"] == "10" and run.data.params["compare_base"] == "True"
    assert expected <= {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "eval")}


def test_merge_goes_into_the_dequantized_nf4_weights(tiny_model, tiny_adapter, conll_dir):
    """--merge folds the adapter into unquantized weights (never into NF4) that hold the NF4 values it was trained
    on, so the merged model computes what the unmerged adapter on the NF4 base computes."""
    import bitsandbytes as bnb

    merged, tok, prompting, _ = load_for_eval(
        EvalConfig(model=str(tiny_model), adapter=str(tiny_adapter), merge=True), CPU
    )
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    unmerged, _, _, _ = load_for_eval(EvalConfig(model=str(tiny_model), adapter=str(tiny_adapter)), CPU)
    prompts = [tok(prompting.text(s.tokens))["input_ids"] for s in read_split(conll_dir, "train")[:8]]
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    a = generate_greedy(merged, tok, prompts, [24] * 8, batch_size=8).tokens
    b = generate_greedy(unmerged, tok, prompts, [24] * 8, batch_size=8).tokens
    assert a == b


def test_auto_batch_size_gives_the_results_of_an_explicit_one(tmp_path, tiny_model, tiny_adapter, conll_dir):
    """--batch-size auto (the default; a fixed size on a CPU, recorded in metrics.json) decodes exactly what an
    explicit batch size of 3 decodes (fp32), response by response."""
    runs = {}
    for batch in ("auto", 3):
        out = tmp_path / str(batch)
        config = EvalConfig(
            adapter=str(tiny_adapter),
            data_dir=str(conll_dir),
            limit=12,
            max_new_tokens=12,
            batch_size=batch,
            output_dir=str(out),
            experiment="test",
        )
        evaluate_model(config, CPU)
        rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
        runs[batch] = (json.loads((out / "metrics.json").read_text()), rows)
    assert runs["auto"][0]["batch_size"] == CPU_BATCH and runs[3][0]["batch_size"] == 3
    assert [r["raw_response"] for r in runs["auto"][1]] == [r["raw_response"] for r in runs[3][1]]
    assert runs["auto"][0]["f1"] == runs[3][0]["f1"]


@pytest.mark.parametrize(
    ("damage", "file", "message"),
    [
        ("cut", "adapter_model.safetensors", "damaged adapter weights"),
        ("empty", "adapter_model.safetensors", "damaged adapter weights"),
        ("broken", "train_config.json", "damaged settings file"),
    ],
)
def test_a_damaged_adapter_is_one_line_naming_the_file(damage, file, message, tmp_path, tiny_adapter):
    """./run_eval.sh's module on an adapter whose weights are cut or empty, or whose settings are broken JSON,
    exits 2 with one line that names the damaged file."""
    adapter = tmp_path / "final"
    shutil.copytree(tiny_adapter, adapter)
    target = adapter / file
    target.write_bytes({"cut": target.read_bytes()[:64], "empty": b"", "broken": b"{oops"}[damage])
    proc = run_entry("evaluate", "--adapter", str(adapter), "--limit", "2", "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith(f"error: {target}: {message}")


def test_evaluation_files_are_one_evaluations_and_a_step_gets_its_own_folder(tmp_path, tiny_adapter, conll_dir):
    """An evaluation replaces every file of an earlier one in its folder (no stale responses_base.jsonl beside a
    new metrics.json); a step-* checkpoint's default folder is eval-step-NNNNNN/, not final's eval/ (these smoke runs
    of 3 sentences: eval-limit3/ and eval-step-NNNNNN-limit3/); the MLflow runs go to the adapter's run folder beside
    its training run."""
    run = tmp_path / "run"
    shutil.copytree(tiny_adapter, run / "final")
    shutil.copytree(tiny_adapter, run / "step-000040")
    common = dict(data_dir=str(conll_dir), limit=3, max_new_tokens=4, experiment="test")
    evaluate_model(EvalConfig(adapter=str(run / "final"), compare_base=True, **common), CPU)
    assert (run / "eval-limit3" / "responses_base.jsonl").is_file()
    evaluate_model(EvalConfig(adapter=str(run / "final"), **common), CPU)
    assert not (run / "eval-limit3" / "responses_base.jsonl").exists()
    assert sorted(p.name for p in (run / "eval-limit3").iterdir()) == sorted(ARTIFACTS[:2] + ARTIFACTS[3:])
    evaluate_model(EvalConfig(adapter=str(run / "step-000040"), **common), CPU)
    assert (run / "eval-step-000040-limit3" / "metrics.json").is_file()
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("test").experiment_id])) == 3


def test_a_bad_output_dir_fails_before_decoding(tmp_path, tiny_adapter, conll_dir, capsys):
    """--output-dir under a file is refused before any decoding, in one line naming it."""
    (tmp_path / "file").write_text("x")
    config = EvalConfig(adapter=str(tiny_adapter), data_dir=str(conll_dir), output_dir=str(tmp_path / "file" / "o"))
    with pytest.raises(QloranerError, match=r"--output-dir .*file/o: a file is in the way"):
        evaluate_model(config, CPU)
    assert "evaluating" not in capsys.readouterr().out


def test_a_full_disk_while_writing_the_evaluation_leaves_no_cut_file(small_disk, tiny_adapter, conll_dir):
    """With no space left, the evaluation ends in one line naming its folder and the reason, and leaves no file
    (no metrics.json, no half-written temp file) that could pass for a result."""
    fill(small_disk)
    out = small_disk / "eval"
    config = EvalConfig(
        adapter=str(tiny_adapter),
        data_dir=str(conll_dir),
        limit=3,
        max_new_tokens=4,
        output_dir=str(out),
        experiment="test",
    )
    with pytest.raises(
        QloranerError, match=r"eval: could not write the evaluation's files \(No space left on device\)"
    ):
        evaluate_model(config, CPU)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("adapter", "split", "limit", "folder"),
    [
        ("final", "test", 0, "eval"),
        ("final", "valid", 0, "eval-valid"),
        ("step-000040", "valid", 0, "eval-step-000040-valid"),
        ("final", "test", 1, "eval-limit1"),
        ("step-000040", "valid", 20, "eval-step-000040-valid-limit20"),
    ],
)
def test_each_split_and_checkpoint_gets_its_own_evaluation_folder(tmp_path, adapter, split, limit, folder):
    """Without --output-dir, an adapter's files go beside it, in a folder named by the checkpoint, for another
    split than test by the split, and for a --limit run by its limit: a valid score or a smoke run never overwrites
    the full test one. MLflow: the run folder."""
    from qloraner.evaluate import output_dirs

    config = EvalConfig(adapter=str(tmp_path / "run" / adapter), split=split, limit=limit)
    assert output_dirs(config) == (tmp_path / "run" / folder, tmp_path / "run")


def test_an_overlong_prompt_drops_its_context_before_cutting_the_sentence(conll_dir, smol_checkpoint):
    """With the context template, a limit under the prompt's length but over its length without the context keeps
    the whole sentence and drops the context; a limit under that cuts the sentence to fit."""
    tok = load_tokenizer(smol_checkpoint)
    s = max(read_split(conll_dir, "valid")[:50], key=lambda x: len(x.context))
    prompting = Prompting("context", "lines", CONLL)
    full, bare = (_prompt_ids(tok, s.tokens, prompting, c) for c in (s.context, ""))
    assert len(bare) < len(full)
    assert _prompts(tok, [s], prompting, len(full) - 1) == ([bare], [len(s.tokens)])
    (ids,), (kept,) = _prompts(tok, [s], prompting, len(bare) - 1)
    assert kept < len(s.tokens) and len(ids) <= len(bare) - 1


def test_cut_answers_are_counted_in_metrics_and_the_end_line(tmp_path, tiny_model, conll_dir):
    """An answer whose token budget ran out before it stopped is marked cut in responses.jsonl (its length is its
    budget), counted as cut_answers in metrics.json and comparison.md, and the evaluation's last line says how many."""
    out = tmp_path / "o"
    args = ("--model", str(tiny_model), "--data-dir", str(conll_dir), "--limit", "3", "--max-new-tokens", "4")
    proc = run_entry("evaluate", *args, "--output-dir", str(out), "--experiment", "test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert all(r["generated_tokens"] == r["budget"] <= 4 for r in rows if r["cut"])
    assert metrics["cut_answers"] == sum(r["cut"] for r in rows) > 0  # a random model does not stop in 4 tokens
    assert f"| cut answers | {metrics['cut_answers']} |" in (out / "comparison.md").read_text()
    assert last_line(proc.stdout).startswith(f"qloraner: done: F1 {100 * metrics['f1']:.2f} ")
    assert f"; {metrics['cut_answers']} of 3 answers cut at their token budget" in last_line(proc.stdout)


def test_a_limited_evaluation_writes_beside_the_full_one(tmp_path, tiny_adapter, conll_dir):
    """./run_eval.sh's module with --limit 1 on a run's final/ writes into eval-limit1/ and leaves the full
    evaluation's eval/ files as they were, byte for byte."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.txt").write_text("".join(f"{s}\n\n" for s in (conll_dir / "test.txt").read_text().split("\n\n")[1:4]))
    run = tmp_path / "run"
    shutil.copytree(tiny_adapter, run / "final")
    args = ("--adapter", str(run / "final"), "--data-dir", str(data), "--max-new-tokens", "4", "--experiment", "test")
    assert run_entry("evaluate", *args).returncode == 0
    full = {p.name: p.read_bytes() for p in (run / "eval").iterdir()}
    assert json.loads(full["metrics.json"])["sentences"] == 3
    proc = run_entry("evaluate", *args, "--limit", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (run / "eval").iterdir()} == full
    assert json.loads((run / "eval-limit1" / "metrics.json").read_text())["sentences"] == 1
    assert last_line(proc.stdout).endswith(f"files in {run / 'eval-limit1'}")
