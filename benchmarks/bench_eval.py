"""Evaluation speed: our batched evaluator against the original's (HF `pipeline`, batch 8, 150 new tokens, no stop rule).

On the GPU machine, after the bundle's two-step start:
  . /root/qdev/env.sh && ADAPTER=outputs/acc-quick/final python3 benchmarks/bench_eval.py
(a) the fine-tuned SmolLM2 adapter: ours over the full test split at each batch size in BATCHES_A, merged and not (and
    unmerged over the first PEER_SENTENCES), then the peer over
    those PEER_SENTENCES, extrapolated to the full split (said so in the output), all scored with our parser and seqeval.
(b) the LLaMA-2-7B shape (bench_train.py's random checkpoint): ours over all 3,453 prompts with NEW_TOKENS budgets
    (NF4 unmerged, then a bf16 merge of a fresh adapter), the peer `generate` at batch 8 on PEER_SENTENCES prompts.
BENCH_TINY=1 runs the same code on a tiny model on the CPU (a smoke test of the script).
"""

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench_train  # noqa: E402  (its model shape and paths)

# Settings
TINY = bench_train.TINY
ADAPTER = os.environ.get("ADAPTER")  # a fine-tuned SmolLM2 adapter for (a); (a) is skipped without it
# PART_B=0 skips (b); BENCH_JSON names the report under $OUT
PEER_SENTENCES = int(os.environ.get("PEER_SENTENCES", 16 if TINY else 200))
PEER_CHUNK = int(
    os.environ.get("PEER_CHUNK", 8 if TINY else 40)
)  # (a): the pipeline's figure is saved after each chunk
NEW_TOKENS = int(os.environ.get("NEW_TOKENS", 12))  # the fine-tuned SmolLM2's mean response: 40,594 tokens / 3,453
OUR_BATCH = int(os.environ.get("OUR_BATCH", 8 if TINY else 256))  # (b)
BATCHES_A = [int(b) for b in os.environ.get("BATCHES_A", "4,8" if TINY else "256,1024").split(",")]  # (a): ours at each
LIMIT = int(os.environ.get("LIMIT", 24 if TINY else 0))  # sentences for our runs (0 = the full split)
DEVICE = bench_train.DEVICE


def _sentences():
    from qloraner.conll import read_split, resolve_data_dir

    sentences = read_split(resolve_data_dir(None, ROOT), "test")
    return sentences[:LIMIT] if LIMIT else sentences


def part_a(report: Callable[[dict], None] = lambda partial: None) -> dict:
    """Fine-tuned SmolLM2: ours on the full split and on the subset, then the pipeline on the subset in chunks of
    PEER_CHUNK sentences (the figure is saved after each, so a time box still leaves a measured, smaller subset)."""
    from transformers import pipeline

    from qloraner.bio import entities_to_bio
    from qloraner.config import EvalConfig
    from qloraner.data import build_prompt
    from qloraner.evaluate import load_for_eval, respond, summarize
    from qloraner.metrics import score
    from qloraner.parse import parse_response

    sentences = _sentences()
    subset = sentences[:PEER_SENTENCES]
    result = {}
    # the bf16 merge first, so that the unmerged model stays loaded for the peer
    for merge in (True, False):
        model, tok, prompting, _ = load_for_eval(EvalConfig(adapter=ADAPTER, merge=merge), DEVICE)
        runs = [(f"ours{'_merged' if merge else ''}_b{b}", b, sentences) for b in BATCHES_A]
        for name, batch, part in runs + ([] if merge else [("ours_on_subset", BATCHES_A[0], subset)]):
            config = EvalConfig(adapter=ADAPTER, batch_size=batch, merge=merge)
            summary = summarize(*respond(model, tok, part, prompting, config, name))
            result[name] = {
                k: summary[k]
                for k in (
                    "f1",
                    "precision",
                    "recall",
                    "per_type",
                    "parse_failures",
                    "seconds",
                    "sentences_per_s",
                    "sentences",
                    "generated_tokens",
                )
                if k in summary
            }
            report(result)
    pipe = pipeline(
        "text-generation",
        model=model,
        tokenizer=tok,
        batch_size=8,
        max_new_tokens=150,
        do_sample=False,
        return_full_text=False,
    )
    for name, cudnn, n in (("peer", True, len(subset)), ("peer_sdpa_without_cudnn", False, PEER_CHUNK)):
        if DEVICE.type == "cuda":  # the original's evaluator runs with PyTorch's default SDPA kernels (cuDNN included)
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        pred, seconds = [], 0.0
        for b in range(0, n, PEER_CHUNK):
            chunk = subset[b : min(n, b + PEER_CHUNK)]
            start = time.perf_counter()
            out = pipe([build_prompt(s.tokens, prompting["prompt"], prompting["response_format"]) for s in chunk])
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            pred += [entities_to_bio(s.tokens, parse_response(o[0]["generated_text"])) for s, o in zip(chunk, out)]
            done = subset[: len(pred)]
            rate = len(done) / seconds
            result[name] = {
                "sentences": len(done),
                "seconds": seconds,
                "sentences_per_s": rate,
                "f1_on_those_sentences": score([list(s.tags) for s in done], pred)["f1"],
                "full_split_seconds_extrapolated": len(sentences) / rate,
            }
            for ours in [
                k for k in result if k.startswith("ours_") and k != "ours_on_subset" and "sentences_per_s" in result[k]
            ]:
                result[f"speedup_{ours}_vs_{name}"] = result[ours]["sentences_per_s"] / rate
            report(result)
    if DEVICE.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return result


def part_b() -> dict:
    """7B shape: our generate_greedy over all prompts with NEW_TOKENS budgets, NF4 unmerged and bf16 merged."""
    from peft import LoraConfig, get_peft_model

    from qloraner.data import build_prompt
    from qloraner.evaluate import generate_greedy
    from qloraner.model import compute_dtype, load_base, load_tokenizer

    bench_train.make_model()
    tok = load_tokenizer(bench_train.MODEL_DIR, padding_side="left")
    sentences = _sentences()
    prompts = [tok(build_prompt(s.tokens, "simple"))["input_ids"] for s in sentences]
    lora = LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    results = {}
    for name in ("nf4-unmerged", "bf16-merged"):
        if name == "nf4-unmerged":
            model = get_peft_model(load_base(bench_train.MODEL_DIR, DEVICE), lora).eval()
        else:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(
                bench_train.MODEL_DIR, dtype=compute_dtype(DEVICE), device_map={"": DEVICE}
            )
            model = get_peft_model(base, lora).merge_and_unload().eval()
        generate_greedy(model, tok, prompts[:OUR_BATCH], [2] * min(OUR_BATCH, len(prompts)), OUR_BATCH)  # warm-up
        start = time.perf_counter()
        gen = generate_greedy(model, tok, prompts, [NEW_TOKENS] * len(prompts), OUR_BATCH)
        seconds = time.perf_counter() - start
        results[name] = {
            "sentences": len(prompts),
            "seconds": seconds,
            "sentences_per_s": len(prompts) / seconds,
            "new_tokens": sum(len(t) for t in gen.tokens),
            "forward_passes": gen.forward_passes,
        }
        if name == "nf4-unmerged":  # the peer: plain generate, batch 8, 150 forced new tokens, same NF4 model
            subset = [build_prompt(s.tokens, "simple") for s in sentences[:PEER_SENTENCES]]
            start = time.perf_counter()
            for b in range(0, len(subset), 8):
                enc = tok(subset[b : b + 8], return_tensors="pt", padding=True).to(DEVICE)
                model.generate(**enc, max_new_tokens=150, min_new_tokens=150, do_sample=False)
            peer_s = time.perf_counter() - start
            results["peer-generate-batch8"] = {
                "sentences": len(subset),
                "seconds": peer_s,
                "sentences_per_s": len(subset) / peer_s,
                "extrapolated": False,
            }
        del model
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    report = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__}
    out = Path(os.environ.get("OUT", "/tmp")) / os.environ.get("BENCH_JSON", "bench_eval.json")

    def save(key: str, value: dict) -> None:  # after each measurement: a timeout keeps what was done
        report[key] = value
        out.write_text(json.dumps(report, indent=2))

    if ADAPTER:
        save("a_smollm2", part_a(lambda partial: save("a_smollm2", partial)))
    if os.environ.get("PART_B", "1") == "1":
        save("b_7b_shape", part_b())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
