"""Batched greedy decoding on a CoNLL-2003 split, scored with seqeval; base vs fine-tuned."""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qloraner import ENTITY_TYPES, QloranerError, dist, run_main
from qloraner.bio import entities_to_bio
from qloraner.config import EvalConfig, as_dict, from_args
from qloraner.conll import Sentence, read_split, resolve_data_dir
from qloraner.data import build_prompt
from qloraner.metrics import error_analysis, score
from qloraner.model import DEFAULT_MODEL, load_base, load_tokenizer, resolve_model
from qloraner.parse import is_explicit_empty, parse_response

ROOT = Path(__file__).resolve().parents[1]
STOP_TEXT = "\n\n"  # our responses hold no blank line: one after the answer ends it
_TAIL = 4  # tokens decoded to look for STOP_TEXT; it never spans more


@dataclass
class Generation:
    tokens: list[list[int]]  # per prompt, in input order, without the stopping EOS
    forward_passes: int


def response_budget(tokenizer, tokens: tuple[str, ...] | list[str], cap: int) -> int:
    """An answer can't need more than one `[MISC] token` line per token of the sentence."""
    return min(cap, len(tokenizer(" ".join(tokens), add_special_tokens=False)["input_ids"]) + 6 * len(tokens) + 4)


def _stopped(tokenizer, row: list[int], eos: int, newline: dict[int, bool]) -> bool:
    """EOS, or a blank line just written after an answer (not after a preamble like 'The entities are:')."""
    if row[-1] == eos:
        return True
    if row[-1] not in newline:  # most tokens hold no newline: decode only when one was just written
        newline[row[-1]] = "\n" in tokenizer.decode(row[-1:])
    if not newline[row[-1]] or STOP_TEXT not in tokenizer.decode(row[-_TAIL:]):
        return False
    text = tokenizer.decode(row)
    return bool(parse_response(text)) or is_explicit_empty(text)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[list[int]], budgets: list[int], batch_size: int, progress=None) -> Generation:
    """Greedy decoding in batches of similar length: left padding, an attention mask, a KV cache.

    A row stops at EOS or at a blank line and never grows after; a batch ends when all its
    rows have stopped or reached their budget.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory peaks early
    out: list[list[int]] = [[] for _ in prompts]
    passes = 0
    newline: dict[int, bool] = {}  # token id -> its text holds a newline
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), eos, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(idx), dtype=torch.bool)
        cache = None
        for _ in range(max(budgets[i] for i in idx)):
            step = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)  # the LM head on the last position only
            passes += 1
            cache = step.past_key_values
            nxt = step.logits[:, -1].argmax(-1).cpu()
            for row, i in enumerate(idx):
                if not done[row]:
                    out[i].append(int(nxt[row]))
                    done[row] = _stopped(tokenizer, out[i], eos, newline) or len(out[i]) >= budgets[i]
            if done.all():
                break
            nxt[done] = eos  # finished rows idle on EOS; their outputs are ignored
            ids = nxt[:, None].to(device)
            mask = torch.cat([mask, torch.ones((len(idx), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
        if progress is not None:
            progress.update(len(idx))
    for row in out:
        if row and row[-1] == eos:
            row.pop()
    return Generation(out, passes)


def _prompts(tokenizer, sentences: list[Sentence], prompting: dict, max_prompt_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Prompt ids per sentence; over-long sentences are cut to fit (their cut tokens score as O)."""
    ids, kept = [], []
    for s in sentences:
        n = len(s.tokens)
        p = tokenizer(build_prompt(s.tokens, prompting["prompt"], prompting["response_format"]))["input_ids"]
        while len(p) > max_prompt_tokens and n > 0:
            n = max(0, min(n - 1, n * max_prompt_tokens // len(p)))
            p = tokenizer(build_prompt(s.tokens[:n], prompting["prompt"], prompting["response_format"]))["input_ids"]
        ids.append(p)
        kept.append(n)
    return ids, kept


def respond(model, tokenizer, sentences: list[Sentence], prompting: dict, config: EvalConfig, label: str) -> tuple[list[dict], dict]:
    """Generate and parse one model's responses; rows hold tokens, gold and predicted tags.

    `prompting` names the prompt template and response format (`load_for_eval` gives them).
    """
    prompt_ids, kept = _prompts(tokenizer, sentences, prompting, config.max_prompt_tokens)
    truncated = sum(k < len(s.tokens) for k, s in zip(kept, sentences))
    if truncated:
        warnings.warn(f"{truncated} sentence(s) cut to fit --max-prompt-tokens {config.max_prompt_tokens}", stacklevel=2)
    budgets = [response_budget(tokenizer, s.tokens[:k], config.max_new_tokens) for s, k in zip(sentences, kept)]
    start = time.perf_counter()
    with tqdm(total=len(sentences), desc=f"eval {label}", unit="sent", dynamic_ncols=True, disable=None) as bar:
        gen = generate_greedy(model, tokenizer, prompt_ids, budgets, config.batch_size, progress=bar)
    stats = {"seconds": time.perf_counter() - start, "forward_passes": gen.forward_passes, "truncated_sentences": truncated}
    rows = []
    for s, k, toks in zip(sentences, kept, gen.tokens):
        raw = tokenizer.decode(toks, skip_special_tokens=True)
        entities = parse_response(raw)
        pred = entities_to_bio(s.tokens[:k], entities) + ["O"] * (len(s.tokens) - k)
        rows.append({"tokens": list(s.tokens), "gold_tags": list(s.tags), "raw_response": raw,
                     "entities": {t: entities.get(t, []) for t in ENTITY_TYPES}, "pred_tags": pred,
                     "parse_failure": bool(raw.strip()) and not entities and not is_explicit_empty(raw),
                     "generated_tokens": len(toks)})
    return rows, stats


def summarize(rows: list[dict], stats: dict) -> dict:
    """Scores, error analysis and timing for one model's rows."""
    gold, pred = [r["gold_tags"] for r in rows], [r["pred_tags"] for r in rows]
    return {
        **score(gold, pred),
        "errors": error_analysis(gold, pred),
        "parse_failures": sum(r["parse_failure"] for r in rows),
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
    stats = {"seconds": max(s["seconds"] for _, _, s in shards),
             "forward_passes": sum(s["forward_passes"] for _, _, s in shards),
             "truncated_sentences": sum(s["truncated_sentences"] for _, _, s in shards)}
    return rows, stats


def _adapter_settings(adapter: Path) -> dict:
    config = adapter / "train_config.json"
    if not (adapter / "adapter_config.json").is_file() or not config.is_file():
        raise QloranerError(f"adapter not found: {adapter} (expected adapter_config.json and train_config.json, as in outputs/run/final)")
    return json.loads(config.read_text())


def load_for_eval(config: EvalConfig, device: torch.device):
    """(model, tokenizer, prompting, base name). The adapter stays unmerged on the NF4 base unless --merge.

    prompting: the template and response format, from the flags, else the adapter's training, else the defaults.
    """
    from peft import PeftModel

    trained = _adapter_settings(Path(config.adapter)) if config.adapter else {}
    base_name = config.model or trained.get("model") or DEFAULT_MODEL
    base_path = resolve_model(base_name)
    if trained and config.model and resolve_model(trained["model"]) != base_path:
        raise QloranerError(f"{config.adapter}: adapter was trained on {trained['model']}, not {config.model}")
    tokenizer = load_tokenizer(base_path, padding_side="left")
    base = load_base(base_path, device)
    if config.merge:  # into the NF4 weights the adapter was trained on, dequantized to bf16 (fp32 on CPU): merging
        base = base.dequantize()  # into 4-bit loses accuracy, into the original weights changes the model
    model = base
    if config.adapter:
        try:
            model = PeftModel.from_pretrained(base, config.adapter)
        except (RuntimeError, ValueError, KeyError) as err:
            raise QloranerError(f"{config.adapter}: adapter does not fit {base_name}: {str(err).splitlines()[0][:200]}") from None
        if config.merge:
            model = model.merge_and_unload()
    model.eval()
    prompting = {"prompt": config.prompt or trained.get("prompt") or "simple",
                 "response_format": config.response_format or trained.get("response_format") or "lines"}
    return model, tokenizer, prompting, str(base_name)


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown: overall and per-type P/R/F1 and parse failures, one column per model."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in ("precision", "recall", "f1"):
        lines.append(f"| {key} | " + " | ".join(f"{100 * results[n][key]:.2f}" for n in names) + " |")
    for t in ENTITY_TYPES:
        lines.append(f"| F1 {t} | " + " | ".join(f"{100 * results[n]['per_type'][t]['f1-score']:.2f}" for n in names) + " |")
    for key in ("parse_failures", *results[names[0]]["errors"]):
        value = (lambda n: results[n][key]) if key == "parse_failures" else (lambda n: results[n]["errors"][key])
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(str(value(n)) for n in names) + " |")
    lines.append("| sentences/s | " + " | ".join(f"{results[n]['sentences_per_s']:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def _bar_chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(results)
    for k, (name, m) in enumerate(results.items()):
        xs = [i + k * width for i in range(len(ENTITY_TYPES))]
        ax.bar(xs, [100 * m["per_type"][t]["f1-score"] for t in ENTITY_TYPES], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ENTITY_TYPES))], ENTITY_TYPES)
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_model(config: EvalConfig, device: torch.device | None = None) -> dict[str, dict]:
    """Evaluate (and with --compare-base, also the base), write artifacts, log to MLflow.

    Under torchrun each rank decodes every world-th sentence; rank 0 gathers the rows, scores them
    and writes the same artifacts as one process would, in sentence order.
    """
    import mlflow

    from qloraner.tracking import git_revision, start_run

    rank, world, rank_device = dist.setup()
    device = device or rank_device
    out = Path(config.output_dir or (Path(config.adapter).parent / "eval" if config.adapter else ROOT / "outputs" / "eval"))
    sentences = read_split(resolve_data_dir(config.data_dir, ROOT), config.split)
    sentences = sentences[: config.limit] if config.limit else sentences
    mine = list(range(rank, len(sentences), world))
    my_sentences = [sentences[i] for i in mine]
    model, tokenizer, prompting, base_name = load_for_eval(config, device)
    name = "fine-tuned" if config.adapter else "base"
    shards = {}
    if config.compare_base:
        with model.disable_adapter():  # the same NF4 weights without the adapter: the base model
            shards["base"] = respond(model, tokenizer, my_sentences, prompting, config, "base")
    shards[name] = respond(model, tokenizer, my_sentences, prompting, config, name)
    gathered = {label: dist.gather((mine, *shard)) for label, shard in shards.items()}
    if rank != 0:
        return {}
    responses, results = {}, {}
    for label, parts in gathered.items():
        responses[label], stats = _merge_shards(parts, len(sentences))
        results[label] = summarize(responses[label], stats)

    out.mkdir(parents=True, exist_ok=True)
    metrics = {**results[name], "model": base_name, "adapter": config.adapter, **prompting, "split": config.split,
               "limit": config.limit, "world_size": world,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if config.compare_base:
        metrics["base"] = results["base"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for label, rows in responses.items():
        with open(out / f"responses{'' if label == name else '_' + label}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "comparison.md").write_text(comparison_table(results))
    _bar_chart(results, out / "f1_by_type.png")

    with start_run(out, config.experiment, run_name=f"eval-{name}"):
        mlflow.log_params({**as_dict(config), **prompting, "model": base_name, "git_revision": git_revision(),
                           "world_size": world})
        for label, m in results.items():
            prefix = "" if label == name else f"{label}_"
            mlflow.log_metrics({f"{prefix}{k}": m[k] for k in ("precision", "recall", "f1", "parse_failures", "sentences_per_s")})
            mlflow.log_metrics({f"{prefix}f1_{t}": m["per_type"][t]["f1-score"] for t in ENTITY_TYPES})
        for f in sorted(out.glob("*")):
            if f.suffix in (".json", ".jsonl", ".md", ".png"):
                mlflow.log_artifact(str(f), artifact_path="eval")
    print(comparison_table(results), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        evaluate_model(from_args(EvalConfig, argv, "Evaluate a base model or LoRA adapter on CoNLL-2003 (./run_eval.sh)"))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
