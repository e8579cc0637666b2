"""qloraner.export and ./run_export.sh: a merged checkpoint that plain transformers loads and that answers as the
adapter does, with its task settings and a model card; errors on one line; never a half-written export."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qloraner import QloranerError
from qloraner.config import EvalConfig
from qloraner.conll import read_split
from qloraner.data import response_budget
from qloraner.decode import generate_greedy
from qloraner.evaluate import _prompts, load_for_eval
from qloraner.export import SETTINGS_FILE, ExportConfig, card_metadata, export
from qloraner.export_gguf import GGUF_FILE, MODELFILE
from qloraner.tag import Tagger
from tests.conftest import ROOT, last_line

MAX_NEW = 24  # enough for the tiny adapter's answers on short sentences; keeps CPU decoding short
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_adapter) -> Path:
    """The tiny adapter exported in f32, with small shards (several files and an index)."""
    out = tmp_path_factory.mktemp("export") / "merged"
    return export(ExportConfig(adapter=str(tiny_adapter), output=str(out), dtype="f32", max_shard_mb=4))


@pytest.fixture(scope="module")
def exported_gguf(tmp_path_factory, tiny_adapter) -> Path:
    """The tiny adapter exported as a GGUF in f32."""
    out = tmp_path_factory.mktemp("export-gguf") / "gguf"
    return export(ExportConfig(adapter=str(tiny_adapter), output=str(out), format="gguf", dtype="f32"))


@pytest.fixture(scope="module")
def merged(tiny_adapter):
    """qloraner's --merge: the adapter merged into its NF4 base dequantized to f32 (on the CPU)."""
    return load_for_eval(EvalConfig(adapter=str(tiny_adapter), merge=True, max_new_tokens=MAX_NEW), CPU)


@pytest.fixture(scope="module")
def conll_sentences(conll_dir):
    """16 sentences: 8 the adapter learned (it finds entities in them) and the first 8 test sentences."""
    return read_split(conll_dir, "train")[:8] + read_split(conll_dir, "test")[:8]


def test_export_weights_are_the_merge_weights_bit_for_bit(exported, merged):
    """Every tensor of the f32 export equals, bit for bit, the same tensor of --merge's model (the adapter merged
    into its NF4 base dequantized to f32): streaming re-quantizes each base weight exactly as load_base does."""
    from safetensors import safe_open

    state = merged[0].state_dict()
    files = sorted(exported.glob("model-*.safetensors"))
    assert len(files) > 1 and (exported / "model.safetensors.index.json").is_file()
    seen = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), state[name]), name
                seen += 1
    assert seen == len(json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"])


def test_plain_transformers_gives_the_engines_greedy_answers(exported, merged, conll_sentences):
    """The export loaded with plain AutoModelForCausalLM.from_pretrained and greedy `generate` gives, token for
    token, the answers qloraner's engine gives with --merge (f32 on the CPU) on 16 CoNLL sentences: the engine's
    answer (cut at its stop rule) is the start of transformers' (which runs on to EOS or its budget)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, prompting, _ = merged
    prompts, _ = _prompts(tokenizer, conll_sentences, prompting, 1024)
    budgets = [response_budget(tokenizer, s.tokens, MAX_NEW, prompting.response_format) for s in conll_sentences]
    ours = generate_greedy(model, tokenizer, prompts, budgets, batch_size=16, graphs=False).tokens
    plain = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(exported)
    answered = 0
    for prompt, budget, answer in zip(prompts, budgets, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = plain.generate(ids, max_new_tokens=budget, do_sample=False, pad_token_id=plain_tokenizer.eos_token_id)
        assert out[0, len(prompt) :].tolist()[: len(answer)] == answer
        answered += bool(answer)
    assert answered == len(prompts)


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_metadata_is_yaml_with_the_evaluation(tmp_path, tiny_adapter):
    """The model card's metadata block parses as YAML (yaml.safe_load) with the Hub's keys, and carries the
    evaluation found beside the adapter (../eval/metrics.json) as model-index results and in its text."""
    run = tmp_path / "run"
    shutil.copytree(tiny_adapter, run / "final")
    per_type = {t: {"f1-score": 0.5} for t in ("LOC", "MISC", "ORG", "PER")}
    metrics = {
        "f1": 0.8123,
        "precision": 0.8,
        "recall": 0.825,
        "split": "test",
        "sentences": 3453,
        "per_type": per_type,
    }
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    out = export(ExportConfig(adapter=str(run / "final"), output=str(tmp_path / "merged")))
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["datasets"] == ["conll2003"] and meta["license"] == "other" and "base_model" not in meta
    assert {"f1", "precision", "recall"} <= set(meta["metrics"]) and "ner" in meta["tags"]
    results = meta["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in results["metrics"]} == {"f1": 81.23, "precision": 80.0, "recall": 82.5}
    assert "F1 81.23" in card and "Tagger.load" in card and "AutoModelForCausalLM" in card
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["labels"] == ["LOC", "MISC", "ORG", "PER"] and "{sentence}" in settings["prompt_text"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    known = front_matter(card_metadata({"model": "smollm2-135m-instruct"}, None, None))
    assert known["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and known["license"] == "apache-2.0"


@pytest.mark.parametrize("fmt", ["exported", "exported_gguf"])
def test_tagger_on_the_export_gives_the_adapters_tags(fmt, request, tiny_adapter, conll_sentences):
    """Tagger.load on the export, hf or gguf (found by its qloraner.json: plain weights, the GGUF's dequantized,
    the adapter's prompt settings) tags 16 CoNLL sentences exactly as Tagger.load on the adapter, entities
    included."""
    tokens = [list(s.tokens) for s in conll_sentences]
    on_export = Tagger.load(request.getfixturevalue(fmt), "cpu", max_new_tokens=MAX_NEW, progress=False)
    on_adapter = Tagger.load(tiny_adapter, "cpu", max_new_tokens=MAX_NEW, progress=False)
    assert on_export.prompting == on_adapter.prompting
    tags = on_export.tag_tokens(tokens)
    assert tags == on_adapter.tag_tokens(tokens)
    assert any(t != "O" for sentence in tags for t in sentence)


def test_eval_takes_the_export_as_model(exported, tmp_path, conll_dir):
    """./run_eval.sh --model EXPORT_DIR (no adapter) loads the export with its prompt settings and scores it."""
    from qloraner.evaluate import evaluate_model

    out = tmp_path / "eval"
    config = EvalConfig(
        model=str(exported), data_dir=str(conll_dir), limit=4, max_new_tokens=MAX_NEW, output_dir=str(out)
    )
    evaluate_model(config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["sentences"] == 4 and metrics["prompt"] == json.loads((exported / SETTINGS_FILE).read_text())["prompt"]
    )


def run_export(*args: str) -> subprocess.CompletedProcess:
    """./run_export.sh ARGS as a user runs it, in this interpreter's environment (env.sh's container mode)."""
    env = {
        **os.environ,
        "QLORANER_IN_CONTAINER": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run([str(ROOT / "run_export.sh"), *args], capture_output=True, text=True, env=env, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_errors_are_one_line_and_exit_2(tmp_path, tiny_adapter):
    """A non-empty output folder (without --overwrite), a missing adapter and an adapter whose base is missing each
    end ./run_export.sh with one `error:` line and exit code 2, writing nothing."""
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    gone_base = tmp_path / "orphan" / "final"
    shutil.copytree(tiny_adapter, gone_base)
    settings = json.loads((gone_base / "train_config.json").read_text())
    (gone_base / "train_config.json").write_text(json.dumps({**settings, "model": str(tmp_path / "no-such-base")}))
    cases = {
        "not empty": ("--adapter", str(tiny_adapter), "--output", str(full)),
        "adapter not found": ("--adapter", str(tmp_path / "nowhere"), "--output", str(tmp_path / "a")),
        "base is missing": ("--adapter", str(gone_base), "--output", str(tmp_path / "b")),
    }
    for words, args in cases.items():
        proc = run_export(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().count("\n") == 0 and last_line(proc.stderr).startswith("error: ")
        assert words in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "orphan"]
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_run_export_sh_writes_and_overwrites(tmp_path, tiny_adapter):
    """./run_export.sh writes a loadable export and says where, with progress over the base's tensors (a log line
    at the end: stdout is not a terminal); --overwrite replaces a non-empty folder whole."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    proc = run_export("--adapter", str(tiny_adapter), "--output", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert last_line(proc.stdout).endswith(str(out))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensors = len(f.keys())
    assert f"export {tensors}/{tensors} (100.0%)" in proc.stdout
    assert (
        not (out / "stale.txt").exists() and (out / SETTINGS_FILE).is_file() and (out / "model.safetensors").is_file()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_an_interrupted_export_leaves_no_complete_looking_folder(tmp_path, tiny_adapter, monkeypatch):
    """Interrupted while writing its second shard (Ctrl-C), an export leaves no output folder and no temporary
    one; interrupted while replacing an earlier export (--overwrite), it leaves the earlier export as it was."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    config = ExportConfig(adapter=str(tiny_adapter), output=str(tmp_path / "merged"), max_shard_mb=1)
    with pytest.raises(KeyboardInterrupt):
        export(config)
    assert list(tmp_path.iterdir()) == []
    earlier = tmp_path / "merged"
    earlier.mkdir()
    (earlier / "earlier.txt").write_text("kept")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(**{**config.__dict__, "overwrite": True}))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and [p.name for p in earlier.iterdir()] == ["earlier.txt"]


def test_missing_settings_are_reported_together():
    """Without --adapter and --output the settings fail on one QloranerError naming both flags."""
    with pytest.raises(QloranerError, match="--adapter.*--output"):
        ExportConfig()


def test_a_full_disk_is_one_error_and_leaves_nothing(small_disk, tiny_adapter):
    """An export onto a disk too small for it stops with one QloranerError naming the full disk, and leaves
    neither the output folder nor its temporary one."""
    with pytest.raises(QloranerError, match="the disk is full") as err:
        export(ExportConfig(adapter=str(tiny_adapter), output=str(small_disk / "merged"), dtype="f32"))
    assert "\n" not in str(err.value)
    assert list(small_disk.iterdir()) == []


# --- GGUF ------------------------------------------------------------------------------------------------------


def gguf_alone(export_dir: Path, tmp_path: Path) -> Path:
    """A folder holding only the export's model.gguf: what is read from it comes from the GGUF itself."""
    alone = tmp_path / f"alone-{export_dir.name}"
    alone.mkdir()
    shutil.copy2(export_dir / GGUF_FILE, alone / GGUF_FILE)
    return alone


def prompt_texts(export_dir: Path, sentences) -> list[str]:
    from qloraner.prompts import build_prompt

    settings = json.loads((export_dir / SETTINGS_FILE).read_text())
    return [build_prompt(s.tokens, settings["prompt"], settings["response_format"], s.context) for s in sentences]


def read_gguf(folder: Path):
    """(model, tokenizer) from folder/model.gguf by transformers' own GGUF loader, in f32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)


def logits_and_answers(model, prompts: list[list[int]]) -> list[tuple[torch.Tensor, list[int]]]:
    """Per prompt, the logits over it and the greedy answer (to EOS, as the model's config names it)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(ids).logits[0]
            answer = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
        out.append((logits, answer[0, len(prompt) :].tolist()))
    return out


def test_gguf_read_by_transformers_equals_the_hf_export(exported, exported_gguf, conll_sentences, tmp_path):
    """The f32 GGUF alone (copied into an empty folder), read back by transformers' own GGUF loader, tokenizes 6
    CoNLL prompts (numbers, hyphens, quotes, capitals) as the hf export's tokenizer does, and gives the hf export's
    logits within 1e-4 and its greedy answers, token for token, which are not empty."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = read_gguf(gguf_alone(exported_gguf, tmp_path))
    plain = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(exported)
    texts = prompt_texts(exported_gguf, conll_sentences[:3] + conll_sentences[8:11])
    prompts = [plain_tokenizer(t)["input_ids"] for t in texts]
    assert [tokenizer(t)["input_ids"] for t in texts] == prompts
    assert model.config.eos_token_id == plain.config.eos_token_id
    for (got, answer), (want, plain_answer) in zip(
        logits_and_answers(model, prompts), logits_and_answers(plain, prompts)
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert answer == plain_answer and answer


def test_q8_0_gguf_stays_near_the_f32_export(exported_gguf, tiny_adapter, conll_sentences, tmp_path):
    """A q8_0 export stores every matrix in Q8_0 blocks and every norm in f32; read back by transformers, its
    logits on 3 prompts stay near the f32 GGUF's (on average within 1% of their range, everywhere within 5%) and its
    greedy answers are the same."""
    import gguf

    out = export(ExportConfig(adapter=str(tiny_adapter), output=str(tmp_path / "q8"), format="gguf", dtype="q8_0"))
    types = {t.name: (t.tensor_type, len(t.shape)) for t in gguf.GGUFReader(out / GGUF_FILE).tensors}
    Q = gguf.GGMLQuantizationType
    assert {kind for kind, dims in types.values() if dims == 2} == {Q.Q8_0}
    assert {kind for kind, dims in types.values() if dims == 1} == {Q.F32}
    model, tokenizer = read_gguf(gguf_alone(out, tmp_path))
    reference, _ = read_gguf(gguf_alone(exported_gguf, tmp_path))
    prompts = [tokenizer(t)["input_ids"] for t in prompt_texts(out, conll_sentences[:3])]
    for (got, answer), (want, f32_answer) in zip(
        logits_and_answers(model, prompts), logits_and_answers(reference, prompts)
    ):
        gap, spread = (got - want).abs(), want.max() - want.min()
        assert gap.mean() <= 0.01 * spread and gap.max() <= 0.05 * spread
        assert answer == f32_answer


@given(
    kv_heads=st.sampled_from([1, 2, 3, 4]),
    groups=st.integers(1, 3),
    half_dim=st.integers(1, 8),
    cols=st.integers(1, 5),
)
def test_permute_is_undone_by_transformers_gguf_reader(kv_heads, groups, half_dim, cols):
    """llama.cpp's q/k row order, as permute writes it for q (all heads) and k (the key/value heads, grouped-query
    attention included), is undone exactly by the permutation transformers' GGUF reader applies."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from qloraner.export_gguf import permute

    heads = kv_heads * groups
    reader = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    for name, n_head in (("blk.0.attn_q.weight", heads), ("blk.0.attn_k.weight", kv_heads)):
        weight = torch.randn(n_head * 2 * half_dim, cols)
        back = reader.process(permute(weight, n_head).numpy(), name).weights
        assert np.array_equal(back, weight.numpy()) and (
            half_dim == 1 or not torch.equal(permute(weight, n_head), weight)
        )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
        ("model.layers.31.self_attn.o_proj.weight", "blk.31.attn_output.weight"),
        ("model.layers.7.mlp.down_proj.weight", "blk.7.ffn_down.weight"),
        ("model.layers.2.input_layernorm.weight", "blk.2.attn_norm.weight"),
        ("model.layers.2.post_attention_layernorm.weight", "blk.2.ffn_norm.weight"),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", None),
    ],
)
def test_gguf_names_are_llama_cpps(name, expected):
    """Each LLaMA checkpoint tensor gets the name llama.cpp's llama architecture reads (RoPE constants none)."""
    from qloraner.export_gguf import gguf_name

    assert gguf_name(name) == expected


@pytest.mark.parametrize(
    "name", ["model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.experts.0.w1.weight", "vision.patch.weight"]
)
def test_tensors_without_a_gguf_place_are_refused(name):
    """A tensor the llama GGUF layout cannot hold (biases, experts, other towers) stops the export on one line."""
    from qloraner.export_gguf import gguf_name

    with pytest.raises(QloranerError, match="--format hf") as err:
        gguf_name(name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("prompt", ["simple", "typed", "fewshot", "context"])
@pytest.mark.parametrize("fmt", ["lines", "json", "inline"])
def test_modelfile_template_is_the_adapters_prompt(prompt, fmt):
    """The Modelfile's TEMPLATE, its {{ .Prompt }} filled with a sentence, is qloraner's prompt for that sentence
    (no document context); it reads model.gguf, decodes greedily and stops at a blank line."""
    import re

    from qloraner.decode import STOP_TEXT
    from qloraner.export_gguf import modelfile
    from qloraner.prompts import build_prompt

    sentence = "EU rejects German call to boycott British lamb ."
    text = modelfile({"prompt": prompt, "response_format": fmt, "stop": {"text": STOP_TEXT}}, 8192)
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)[1]
    assert template.replace("{{ .Prompt }}", sentence) == build_prompt(sentence.split(), prompt, fmt, "")
    assert "FROM ./model.gguf\n" in text and "PARAMETER temperature 0\n" in text
    assert re.search(r'^PARAMETER stop """(.*?)"""$', text, re.S | re.M)[1] == STOP_TEXT


def test_gguf_export_files_and_tokenizer_keys(exported_gguf, smol_checkpoint):
    """The gguf export holds model.gguf, the Modelfile, the tokenizer files, qloraner.json naming the GGUF and a
    card with Ollama and llama.cpp lines; the tokenizer keys built from a Hugging Face tokenizer equal, token for
    token, merge for merge, those of the GGUF the embedded default came from (which the default's export copies)."""
    import gguf

    from qloraner.export_gguf import bpe_vocab, source_gguf_vocab

    names = {p.name for p in exported_gguf.iterdir()}
    assert {GGUF_FILE, MODELFILE, "tokenizer.json", SETTINGS_FILE, "README.md"} <= names
    assert "config.json" not in names and not any(n.endswith(".safetensors") for n in names)
    settings = json.loads((exported_gguf / SETTINGS_FILE).read_text())
    assert settings["format"] == "gguf" and settings["gguf_file"] == GGUF_FILE
    card = (exported_gguf / "README.md").read_text()
    assert "ollama create" in card and "llama-completion" in card and "gguf" in front_matter(card)["tags"]
    built, copied = gguf.GGUFWriter(None, "llama"), gguf.GGUFWriter(None, "llama")
    bpe_vocab(built, smol_checkpoint, 49152)
    source_gguf_vocab(copied, smol_checkpoint, 49152)
    keys = ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id", "model", "pre")
    for key in keys:
        assert built.kv_data[0][f"tokenizer.ggml.{key}"].value == copied.kv_data[0][f"tokenizer.ggml.{key}"].value, key


@pytest.mark.parametrize(
    "tokenizer",
    [
        {"model": {"type": "WordPiece"}, "pre_tokenizer": {"type": "BertPreTokenizer"}},
        {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}},
        {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True, "add_prefix_space": True}},
    ],
)
def test_unsupported_tokenizers_are_one_line(tmp_path, tokenizer):
    """A tokenizer the GGUF writer cannot express for llama.cpp (WordPiece, BPE without byte-level splitting, a
    byte-level one adding a prefix space) is refused on one line saying gguf export of it is not supported yet."""
    from qloraner.export_gguf import bpe_pre

    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(QloranerError, match="not supported yet") as err:
        bpe_pre(tmp_path)
    assert "\n" not in str(err.value)


def test_q8_0_needs_gguf():
    """--dtype q8_0 with --format hf fails on one QloranerError naming both flags."""
    with pytest.raises(QloranerError, match="--dtype q8_0: not with --format hf"):
        ExportConfig(adapter="a", output="b", format="hf", dtype="q8_0")


def test_an_interrupted_gguf_export_leaves_nothing(tmp_path, tiny_adapter, monkeypatch):
    """Interrupted while writing the GGUF's third tensor (Ctrl-C), a gguf export leaves no output folder and no
    temporary one."""
    import gguf

    real, calls = gguf.GGUFWriter.write_tensor_data, []

    def interrupted(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(adapter=str(tiny_adapter), output=str(tmp_path / "gguf"), format="gguf"))
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_a_full_disk_stops_a_gguf_export_and_leaves_nothing(small_disk, tiny_adapter):
    """A gguf export onto a disk too small for it stops with one QloranerError naming the full disk, and leaves
    neither the output folder nor its temporary one."""
    with pytest.raises(QloranerError, match="the disk is full") as err:
        export(ExportConfig(adapter=str(tiny_adapter), output=str(small_disk / "gguf"), format="gguf", dtype="f32"))
    assert "\n" not in str(err.value)
    assert list(small_disk.iterdir()) == []
