"""Batched greedy decoding on a data split (CoNLL-2003 or the run's own files), scored by seqeval; base vs tuned."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from qloraner import ROOT, QloranerError, dist, make_dir, refuse_empty, run_main
from qloraner.config import EvalConfig, as_dict, from_args
from qloraner.conll import Sentence, resolve_corpus
from qloraner.data import response_budget
from qloraner.decode import auto_batch_size, generate_greedy
from qloraner.labels import CONLL, LabelSet, types_seen
from qloraner.metrics import error_analysis, score
from qloraner.model import load_base, load_tokenizer
from qloraner.parse import ends_answer, is_explicit_empty, parse_response, tag_response
from qloraner.progress import Progress
from qloraner.prompts import Prompting
from qloraner.sources import DEFAULT_MODEL, resolve_model
from qloraner.startup import STOPWATCH, stopwatch


def _prompt_ids(tokenizer, tokens, prompting: Prompting, context: str) -> list[int]:
    """The token ids of one sentence's prompt."""
    return prompting.ids(tokenizer, tokens, context)


def _prompts(
    tokenizer, sentences: list[Sentence], prompting: Prompting, max_prompt_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """Prompt ids per sentence and the words each keeps, fitted to `max_prompt_tokens` (Prompting.fitted, by
    prompts.fit): an over-long prompt drops its document context first, then its sentence is cut to fit (the cut
    tokens score as O)."""
    fitted = [prompting.fitted(tokenizer, s.tokens, s.context, max_prompt_tokens) for s in sentences]
    return [f.built for f in fitted], [f.words for f in fitted]


def _fitted_prompts(
    tokenizer, sentences: list[Sentence], prompting: Prompting, config: EvalConfig
) -> tuple[list[list[int]], list[int], list[int]]:
    """Each sentence's prompt ids fitted to --max-prompt-tokens, the words it keeps, and their response budget."""
    with stopwatch("prompts"):
        prompt_ids, kept = _prompts(tokenizer, sentences, prompting, config.max_prompt_tokens)
    fmt, labels = prompting.response_format, prompting.labels
    budgets = [
        response_budget(tokenizer, s.tokens[:k], config.max_new_tokens, fmt, labels) for s, k in zip(sentences, kept)
    ]
    return prompt_ids, kept, budgets


def _row(sentence: Sentence, kept: int, raw: str, labels: LabelSet, generated: int, budget: int, cut: bool) -> dict:
    """One sentence's row of responses.jsonl: its tokens, gold and predicted tags (the words cut from its prompt
    O), the raw answer and its entities."""
    entities = parse_response(raw, labels)
    return {
        "tokens": list(sentence.tokens),
        "gold_tags": list(sentence.tags),
        "raw_response": raw,
        "entities": {t: entities.get(t, []) for t in labels.types},
        "pred_tags": tag_response(sentence.tokens[:kept], raw, labels) + ["O"] * (len(sentence.tokens) - kept),
        "parse_failure": bool(raw.strip()) and not entities and not is_explicit_empty(raw),
        "generated_tokens": generated,
        "budget": budget,
        "cut": cut,  # the budget ran out before the answer ended: it may have lost entities
    }


def respond(
    model,
    tokenizer,
    sentences: list[Sentence],
    prompting: Prompting,
    config: EvalConfig,
    label: str,
    batch_size: int,
    show: bool = True,
) -> tuple[list[dict], dict]:
    """Generate and parse one model's responses; rows hold tokens, gold and predicted tags.

    `prompting` names the prompt template, the response format and the label set (`load_for_eval` gives them).
    """
    prompt_ids, kept, budgets = _fitted_prompts(tokenizer, sentences, prompting, config)
    truncated = sum(k < len(s.tokens) for k, s in zip(kept, sentences))
    if truncated:
        warnings.warn(
            f"{truncated} sentence(s) cut to fit --max-prompt-tokens {config.max_prompt_tokens}", stacklevel=2
        )
    start = time.perf_counter()
    progress = Progress(len(sentences), f"eval {label}", "sentences", enabled=show)
    try:
        gen = generate_greedy(
            model,
            tokenizer,
            prompt_ids,
            budgets,
            batch_size,
            progress=STOPWATCH.until_first(progress),
            graphs=config.cuda_graphs,
            ends_answer=ends_answer(prompting.labels),
        )
    finally:
        progress.close()
    stats = {
        "seconds": time.perf_counter() - start,
        "forward_passes": gen.forward_passes,
        "truncated_sentences": truncated,
        "batch_size": batch_size,
        "engine": gen.stats,
    }
    raws = [tokenizer.decode(toks, skip_special_tokens=True) for toks in gen.tokens]
    rows = [
        _row(s, k, raw, prompting.labels, len(toks), budget, cut)
        for s, k, raw, toks, budget, cut in zip(sentences, kept, raws, gen.tokens, budgets, gen.cut)
    ]
    return rows, stats


def batch_size_for(model, tokenizer, sentences: list[Sentence], prompting: Prompting, config: EvalConfig) -> int:
    """--batch-size, or for `auto` what the longest prompt and its response budget fit (see decode.auto_batch_size)."""
    if config.batch_size != "auto":
        return int(config.batch_size)
    if not sentences:  # a rank with no share of a tiny split
        return 1
    longest = max(sentences, key=lambda s: len(s.tokens))
    prompt = _prompt_ids(tokenizer, longest.tokens, prompting, "")
    budget = response_budget(
        tokenizer, longest.tokens, config.max_new_tokens, prompting.response_format, prompting.labels
    )
    row = min(len(prompt), config.max_prompt_tokens) + budget
    return auto_batch_size(model, row)


def summarize(rows: list[dict], stats: dict, types: tuple[str, ...]) -> dict:
    """Scores (per type over `types`), error analysis and timing for one model's rows."""
    gold, pred = [r["gold_tags"] for r in rows], [r["pred_tags"] for r in rows]
    return {
        **score(gold, pred, types),
        "errors": error_analysis(gold, pred, types),
        "parse_failures": sum(r["parse_failure"] for r in rows),
        "cut_answers": sum(r["cut"] for r in rows),
        "sentences": len(rows),
        "generated_tokens": sum(r["generated_tokens"] for r in rows),
        **stats,
        "sentences_per_s": len(rows) / stats["seconds"] if stats["seconds"] else 0.0,
    }


def _merge_shards(shards: list[tuple[list[int], list[dict], dict]], n: int) -> tuple[list[dict], dict]:
    """Rank shards back into sentence order; wall time is the slowest rank's."""
    rows: list[dict] = [{}] * n
    for indices, shard_rows, _ in shards:
        for i, row in zip(indices, shard_rows):
            rows[i] = row
    stats = {
        "engine": shards[0][2].get("engine"),  # rank 0's
        "seconds": max(s["seconds"] for _, _, s in shards),
        "forward_passes": sum(s["forward_passes"] for _, _, s in shards),
        "truncated_sentences": sum(s["truncated_sentences"] for _, _, s in shards),
        "batch_size": shards[0][2]["batch_size"],
    }
    return rows, stats


def _adapter_settings(adapter: Path) -> dict:
    config = adapter / "train_config.json"
    if not (adapter / "adapter_config.json").is_file() or not config.is_file():
        raise QloranerError(
            f"adapter not found: {adapter} "
            "(expected adapter_config.json and train_config.json, as in outputs/run/final)"
        )
    weights = adapter / "adapter_model.safetensors"
    try:
        settings = json.loads(config.read_text())
        from safetensors import safe_open

        with safe_open(weights, "pt") as f:
            f.keys()
    except ValueError as err:  # broken JSON (JSONDecodeError is a ValueError)
        raise QloranerError(f"{config}: damaged settings file ({err}); train again or use another checkpoint") from None
    except Exception as err:  # safetensors raises its own error type for a cut or empty file
        raise QloranerError(
            f"{weights}: damaged adapter weights ({str(err).splitlines()[0][:120]}); "
            "train again or use another checkpoint"
        ) from None
    return settings


class Loaded(NamedTuple):
    """A model ready to evaluate or tag: load_for_eval's answer."""

    model: torch.nn.Module  # the adapter on its NF4 base (merged with --merge), or an export's plain weights
    tokenizer: object  # left padding
    prompting: Prompting
    base_name: str  # as the user named it (MLflow and metrics.json record it)


def load_for_eval(config: EvalConfig, device: torch.device) -> Loaded:
    """The model, tokenizer and prompting to evaluate. The adapter stays unmerged on the NF4 base unless --merge.

    prompting: the template and response format, from the flags, else the adapter's training, else the defaults;
    the label set the adapter was trained with (CoNLL-2003's for one that predates label sets; None for a base
    model, whose caller takes the data's).
    """
    from peft import PeftModel

    from qloraner.export import is_export, load_export

    exported = config.adapter if is_export(config.adapter) else config.model if is_export(config.model) else None
    if exported:  # a merged model from ./run_export.sh: plain weights, its prompt settings in qloraner.json
        with stopwatch("model load"):
            return load_export(Path(exported), device, config)
    trained = _adapter_settings(Path(config.adapter)) if config.adapter else {}
    base_name = config.model or trained.get("model") or DEFAULT_MODEL
    base_path = resolve_model(base_name)
    if trained and config.model and resolve_model(trained["model"]) != base_path:
        raise QloranerError(f"{config.adapter}: adapter was trained on {trained['model']}, not {config.model}")
    with stopwatch("tokenizer"):
        tokenizer = load_tokenizer(base_path, padding_side="left")
    with stopwatch("model load"):
        base = load_base(base_path, device)
    if config.merge:  # into the NF4 weights the adapter was trained on, dequantized to bf16 (fp32 on CPU): merging
        base = base.dequantize()  # into 4-bit loses accuracy, into the original weights changes the model
    model = base
    if config.adapter:
        try:
            with stopwatch("adapter"):
                model = PeftModel.from_pretrained(base, config.adapter)
        except (RuntimeError, ValueError, KeyError) as err:
            raise QloranerError(
                f"{config.adapter}: adapter does not fit {base_name}: {str(err).splitlines()[0][:200]}"
            ) from None
        if config.merge:
            model = model.merge_and_unload()
    model.eval()
    prompting = Prompting(
        config.prompt or trained.get("prompt") or "simple",
        config.response_format or trained.get("response_format") or "lines",
        LabelSet.from_saved(trained.get("labels")) if trained else None,
    )
    return Loaded(model, tokenizer, prompting, str(base_name))


def report_types(labels: LabelSet, sentences: list[Sentence], split: str, whole: bool) -> tuple[str, ...]:
    """The types the metrics report: the model's, and any other that the split's gold tags name (its mentions are
    missed, and count against recall). One line says where the split's types differ from the model's (for a
    --limit run, only types the model lacks: a few sentences need not hold all of its types)."""
    gold = types_seen(s.tags for s in sentences)
    unseen = [t for t in gold if t not in labels.types]
    absent = [t for t in labels.types if t not in gold] if whole else []
    if unseen or absent:
        parts = [f"the model tags {labels.listed}; the {split} split's types are {', '.join(gold) or 'none'}"]
        parts += [f"not trained on {', '.join(unseen)} (their mentions count against recall)"] if unseen else []
        print(f"qloraner: warning: {'; '.join(parts)}", flush=True)
    return tuple(sorted({*labels.types, *gold}))


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown: overall and per-type P/R/F1 and parse failures, one column per model."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in ("precision", "recall", "f1"):
        lines.append(f"| {key} | " + " | ".join(f"{100 * results[n][key]:.2f}" for n in names) + " |")
    for t in results[names[0]]["per_type"]:
        lines.append(
            f"| F1 {t} | " + " | ".join(f"{100 * results[n]['per_type'][t]['f1-score']:.2f}" for n in names) + " |"
        )
    counts = {n: {k: results[n][k] for k in ("parse_failures", "cut_answers")} | results[n]["errors"] for n in names}
    for key in counts[names[0]]:
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(str(counts[n][key]) for n in names) + " |")
    lines.append("| sentences/s | " + " | ".join(f"{results[n]['sentences_per_s']:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def _bar_chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(next(iter(results.values()))["per_type"])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(types)), 3.5))
    width = 0.8 / len(results)
    for k, (name, m) in enumerate(results.items()):
        xs = [i + k * width for i in range(len(types))]
        ax.bar(xs, [100 * m["per_type"][t]["f1-score"] for t in types], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(types))], types)
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def decode_split(config: EvalConfig, device: torch.device) -> tuple[dict, dict, dict]:
    """Decode this rank's share of the split with the fine-tuned model (and with --compare-base, the base);
    rank 0 gets every rank's rows back in sentence order. Returns (responses, stats, context) per model label;
    responses and stats are empty on other ranks."""
    rank, world, _ = dist.setup()
    with stopwatch("data"):
        sentences = resolve_corpus(config, ROOT).read(config.split)
    sentences = sentences[: config.limit] if config.limit else sentences
    mine = list(range(rank, len(sentences), world))
    my_sentences = [sentences[i] for i in mine]
    model, tokenizer, prompting, base_name = load_for_eval(config, device)
    if prompting.labels is None:  # a base model: asked for the split's types
        prompting = replace(prompting, labels=LabelSet.from_data(types_seen(s.tags for s in sentences) or CONLL.types))
    types = report_types(prompting.labels, sentences, config.split, not config.limit) if rank == 0 else ()
    batch = batch_size_for(model, tokenizer, my_sentences, prompting, config)
    if rank == 0:
        print(
            f"qloraner: evaluating {len(sentences)} {config.split} sentences on {_device_name(device)}, "
            f"batch size {batch}{' (auto)' if config.batch_size == 'auto' else ''}",
            flush=True,
        )
    name = "fine-tuned" if config.adapter else "base"
    shards = {}
    if config.compare_base:
        with model.disable_adapter():  # the same NF4 weights without the adapter: the base model
            shards["base"] = respond(model, tokenizer, my_sentences, prompting, config, "base", batch, rank == 0)
    shards[name] = respond(model, tokenizer, my_sentences, prompting, config, name, batch, rank == 0)
    gathered = {label: dist.gather((mine, *shard)) for label, shard in shards.items()}
    context = {"name": name, "model": base_name, "prompting": prompting, "world_size": world, "types": types}
    if rank != 0:
        return {}, {}, context
    merged = {label: _merge_shards(parts, len(sentences)) for label, parts in gathered.items()}
    return {k: rows for k, (rows, _) in merged.items()}, {k: stats for k, (_, stats) in merged.items()}, context


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _write_atomic(path: Path, write) -> None:
    """`write(tmp_path)`, then rename over `path`: a kill or a full disk never leaves a cut file under its name."""
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")  # keeps the suffix: matplotlib picks the format by it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


ARTIFACTS = ("metrics.json", "responses.jsonl", "responses_base.jsonl", "comparison.md", "f1_by_type.png")


def write_artifacts(out: Path, metrics: dict, responses: dict[str, list[dict]], results: dict[str, dict]) -> None:
    """responses[_base].jsonl, comparison.md, f1_by_type.png, then metrics.json in `out`, each written atomically.

    An earlier evaluation's files go first and metrics.json comes last, so a folder with a metrics.json holds
    one evaluation's files, all complete, and a kill or a full disk leaves no old file beside new ones.
    """
    try:
        for name in ARTIFACTS:
            (out / name).unlink(missing_ok=True)
        for label, rows in responses.items():
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            name = f"responses{'' if label == metrics['label'] else '_' + label}.jsonl"
            _write_atomic(out / name, lambda p, text=text: p.write_text(text, encoding="utf-8"))
        _write_atomic(out / "comparison.md", lambda p: p.write_text(comparison_table(results)))
        _write_atomic(out / "f1_by_type.png", lambda p: _bar_chart(results, p))
        _write_atomic(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
    except OSError as err:
        raise QloranerError(f"{out}: could not write the evaluation's files ({err.strerror or err})") from None


def output_dirs(config: EvalConfig) -> tuple[Path, Path]:
    """(where the files go, where a local MLflow store goes). Files: --output-dir, else eval/ beside a final/ adapter
    and eval-step-NNNNNN/ beside a step checkpoint, -SPLIT added for another split than test and -limitN for a
    --limit run (eval-valid/, eval-step-NNNNNN-valid-limit20/), so that none overwrites another: a smoke run never
    replaces a full evaluation. MLflow: the adapter's run folder, beside its training run; without an adapter, the
    files' folder (outputs/eval/, outputs/eval-limitN/)."""
    suffix = ("" if config.split == "test" else f"-{config.split}") + (f"-limit{config.limit}" if config.limit else "")
    if not config.adapter:
        out = Path(config.output_dir or ROOT / "outputs" / f"eval{suffix}")
        return out, out
    adapter = Path(config.adapter)
    name = ("eval" if adapter.name == "final" else f"eval-{adapter.name}") + suffix
    return Path(config.output_dir or adapter.parent / name), adapter.parent


def log_to_mlflow(out: Path, store: Path, config: EvalConfig, context: dict, results: dict[str, dict]) -> None:
    """One MLflow run: the settings, P/R/F1 (per type too) per model, and the files in `out`."""
    import mlflow

    from qloraner.tracking import git_revision, start_run

    with start_run(store, config.experiment, run_name=f"eval-{context['name']}"):
        mlflow.log_params(
            {
                **as_dict(config),
                **context["prompting"].record(),
                "model": context["model"],
                "git_revision": git_revision(),
                "world_size": context["world_size"],
            }
        )
        for label, m in results.items():
            prefix = "" if label == context["name"] else f"{label}_"
            keys = ("precision", "recall", "f1", "parse_failures", "cut_answers", "sentences_per_s", "batch_size")
            mlflow.log_metrics({f"{prefix}{k}": m[k] for k in keys})
            mlflow.log_metrics({f"{prefix}f1_{t}": r["f1-score"] for t, r in m["per_type"].items()})
        mlflow.log_metrics(STOPWATCH.metrics())  # where the start-up's seconds went (startup.py)
        for f in sorted(out.glob("*")):
            if f.suffix in (".json", ".jsonl", ".md", ".png"):
                mlflow.log_artifact(str(f), artifact_path="eval")


def evaluate_model(config: EvalConfig, device: torch.device | None = None) -> dict[str, dict]:
    """Decode, score, write the artifacts, log to MLflow (and with --compare-base, the base model too).

    Under torchrun each rank decodes every world-th sentence; rank 0 gathers the rows, scores them
    and writes the same artifacts as one process would, in sentence order.
    """
    for flag, value in (("--model", config.model), ("--adapter", config.adapter), ("--output-dir", config.output_dir)):
        refuse_empty(value, flag)  # else an empty flag would mean the default
    rank, _, rank_device = dist.setup()
    device = device or rank_device
    out, store = output_dirs(config)
    if rank == 0:  # before decoding: a bad folder or tracking URI must not cost the decoding
        with stopwatch("tracking checks"):
            from qloraner.tracking import check_experiment, check_tracking

            make_dir(out)
            check_tracking(store)
            check_experiment(config.experiment)
    responses, stats, context = decode_split(config, device)
    if not responses:  # not rank 0
        return {}
    results = {label: summarize(rows, stats[label], context["types"]) for label, rows in responses.items()}
    name = context["name"]
    metrics = {
        **results[name],
        "label": name,
        "model": context["model"],
        "adapter": config.adapter,
        **context["prompting"].record(),
        "split": config.split,
        "limit": config.limit,
        "world_size": context["world_size"],
        "device": _device_name(device),
    }
    if config.compare_base:
        metrics["base"] = results["base"]
    write_artifacts(out, metrics, responses, results)
    log_to_mlflow(out, store, config, context, results)
    print(comparison_table(results), flush=True)
    return results


def done_line(m: dict, split: str, out: Path) -> str:
    """The evaluation's last line: F1, and what may have scored wrong (cut answers, parse failures) when any."""
    warn = [
        f"{m['cut_answers']} of {m['sentences']} answers cut at their token budget (--max-new-tokens)",
        f"{m['parse_failures']} unreadable answers (parse failures)",
    ]
    shown = [text for text, n in zip(warn, (m["cut_answers"], m["parse_failures"])) if n]
    return "; ".join(
        [
            f"qloraner: done: F1 {100 * m['f1']:.2f} (P {100 * m['precision']:.2f}, R {100 * m['recall']:.2f}) on "
            f"{m['sentences']} {split} sentences",
            *shown,
            f"files in {out}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        STOPWATCH.begin()
        config = from_args(EvalConfig, argv, "Evaluate a base model or an adapter on NER data (./run_eval.sh)")
        results = evaluate_model(config)
        if results and config.verbose:
            print(STOPWATCH.line(), flush=True)
        if results:  # rank 0
            label = "fine-tuned" if config.adapter else "base"
            print(done_line(results[label], config.split, output_dirs(config)[0]), flush=True)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
