"""Training speed on the LLaMA-2-7B shape: our loop against the original's stack (HF Trainer + peft), same run.

On the GPU machine, after the bundle's two-step start:  . /root/qdev/env.sh && python3 benchmarks/bench_train.py
On 2 GPUs (our loop only; rank 0 reports):  BENCH_RUNS=ours-ckpt torchrun --standalone --nproc-per-node 2 benchmarks/bench_train.py
BENCH_TINY=1 runs the same code on a tiny model on the CPU (a smoke test of the script).
"""

import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch._dynamo
import torch._functorch.config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Settings
TINY = os.environ.get("BENCH_TINY") == "1"
STEPS = int(os.environ.get("STEPS", 4 if TINY else 8))  # optimizer steps timed per run, after WARMUP
WARMUP = 1 if TINY else 2
SEQS = 16  # sequences per optimizer step, both sides
LORA = dict(r=64, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])
LR = 2e-4
MODEL_DIR = Path(os.environ.get("BENCH_MODEL_DIR", "/tmp/bench-llama7b" + ("-tiny" if TINY else "")))
TOKENIZER = Path(os.environ.get("LLAMA2_TOKENIZER", ROOT.parent / "shared" / "tokenizers" / "llama-2"))
FLOP_PER_TOKEN = 6 * 6.7e9
SHAPE = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
if TINY:
    SHAPE.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
WORLD = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun: each rank takes its own GPU
DEVICE = torch.device("cpu" if TINY else "cuda", None if TINY else int(os.environ.get("LOCAL_RANK", "0")))
RUNS = os.environ.get("BENCH_RUNS", "peer,ours-ckpt,ours-no-ckpt").split(",")  # names in VARIANTS, run in this order
REPORT = os.environ.get("BENCH_JSON", "bench_train.json")  # written under $OUT after each run
if DEVICE.type == "cuda":
    torch.cuda.set_device(DEVICE)


def make_model() -> None:
    """Random bf16 weights in the LLaMA-2-7B shape, saved with the real LLaMA-2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (MODEL_DIR / "config.json").is_file():
        return
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(MODEL_DIR)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, MODEL_DIR / f)
    del model
    gc.collect()


def matmul_tflops() -> float:
    if TINY:
        return 0.0
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def _reset() -> None:
    torch._dynamo.reset()  # each variant compiles afresh: cached graphs keep the partitioning they were compiled with
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0


def ours(name: str, change: str | None = None, **overrides) -> dict:
    """Our loop (qloraner.train.train_adapter), the steps after WARMUP timed from its own per-step metrics.

    `change` names a change (CHANGES) for this run only: one of ours taken back, so that each is measured alone,
    or one being tried before it goes into the loop.
    """
    from qloraner.config import TrainConfig
    from qloraner.train import train_adapter

    _reset()
    changed = CHANGES[change]() if change else contextlib.nullcontext()
    steps = []
    settings = dict(
        model=str(MODEL_DIR),
        output_dir=f"/tmp/bench-{name}",
        limit=(STEPS + WARMUP) * SEQS,
        batch_size=SEQS,
        max_steps=STEPS + WARMUP,
        lr=LR,
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        save_every=0,
        eval_after=False,
        resume=False,
        experiment="bench",
    )
    config = TrainConfig(**{**settings, **overrides})
    shutil.rmtree(config.output_dir, ignore_errors=True)
    with changed:
        train_adapter(config, device=None if WORLD > 1 else DEVICE, on_step=lambda step, m: steps.append(m))
    timed = steps[WARMUP:]
    seconds = sum(m["step_s"] for m in timed)
    median = statistics.median(m["step_s"] for m in timed)
    tokens = sum(m["tokens_per_s"] * m["step_s"] for m in timed)
    supervised = sum(m["supervised_tokens_per_s"] * m["step_s"] for m in timed)
    return {
        "name": name,
        "settings": overrides,
        "change": change,
        "processes": WORLD,
        "tokens_per_s": tokens / seconds,
        "supervised_tokens_per_s": supervised / seconds,
        "s_per_step": seconds / len(timed),
        "s_per_step_median": median,
        "peak_gib": _peak_gib(),
        "steps_timed": len(timed),
    }


def peer(cudnn: bool = True) -> dict:
    """The original's stack: HF Trainer + peft, batch 4 x accumulation 4, paged_adamw_32bit, checkpointing, bf16,
    with PyTorch's default SDPA kernels (cuDNN included) unless cudnn=False."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from qloraner.conll import resolve_data_dir
    from qloraner.data import encode, instruction_data
    from qloraner.model import load_base, load_tokenizer

    _reset()
    tok = load_tokenizer(MODEL_DIR)
    records, _ = instruction_data(
        resolve_data_dir(None, ROOT), "simple", Path("/tmp/bench-instruct.json"), (STEPS + WARMUP) * SEQS
    )
    examples = encode(tok, [r["prompt"] for r in records], [r["response"] for r in records])
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    base = load_base(MODEL_DIR, DEVICE)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)  # load_base turns it off; the original stack has the default
    model = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    args = TrainingArguments(
        output_dir="/tmp/bench-peer",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        optim="paged_adamw_32bit",
        gradient_checkpointing=True,
        bf16=not TINY,
        learning_rate=LR,
        max_steps=STEPS + WARMUP,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=TINY,
    )
    import transformers.trainer

    # Our project's datasets/ folder (a namespace package when run from the checkout) makes transformers
    # believe HF `datasets` is installed; it is not, and the peer does not use it.
    transformers.trainer.is_datasets_available = lambda: False
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        callbacks=[Clock()],
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    trainer.train()
    seconds = marks[-1] - marks[WARMUP - 1]
    median = statistics.median(b - a for a, b in zip(marks[WARMUP - 1 :], marks[WARMUP:]))
    per_seq = sum(len(e.input_ids) for e in examples) / len(examples)  # the sampler is random: use the mean
    sup_per_seq = sum(e.n_supervised for e in examples) / len(examples)
    result = {
        "name": "peer: HF Trainer + peft" + ("" if cudnn else ", SDPA without cuDNN"),
        "tokens_per_s": per_seq * SEQS * STEPS / seconds,
        "supervised_tokens_per_s": sup_per_seq * SEQS * STEPS / seconds,
        "s_per_step": seconds / STEPS,
        "s_per_step_median": median,
        "peak_gib": _peak_gib(),
        "steps_timed": STEPS,
        "tokens_estimated_from_mean_length": True,
    }
    del trainer, model
    return result


def _after(name: str, then):
    """Patch qloraner.train's `name` (add_lora, load_base) so that `then` runs on the model it returns."""
    import qloraner.train

    original = getattr(qloraner.train, name)

    def wrapped(*args, **kw):
        model = original(*args, **kw)
        then(model)
        return model

    return mock.patch.object(qloraner.train, name, wrapped)


def _fp32_frozen():
    """prepare_model_for_kbit_training's state: every unquantized frozen weight in fp32 (we put them back in bf16)."""

    def upcast(model) -> None:
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.bfloat16:
                p.data = p.data.float()

    return _after("add_lora", upcast)


def _full_head():
    """The LM head and loss over every position (we run them only where a label exists)."""
    import torch.nn.functional as F

    import qloraner.train

    def forward(self, input_ids, attention_mask, labels):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")  # -100 ignored

    return mock.patch.object(qloraner.train.SupervisedLoss, "forward", forward)


def _eager_attention():
    """Eager attention (we load the model with SDPA)."""
    return _after("load_base", lambda model: model.set_attn_implementation("eager"))


def _cudnn_attention():
    """PyTorch's default SDPA kernel choice, cuDNN included (we keep SDPA off cuDNN; main() restores that)."""
    return _after("load_base", lambda model: torch.backends.cuda.enable_cudnn_sdp(True))


def _checkpoint_outside():
    """HF's activation checkpoint around each compiled layer (with --compile we recompute inside the compiled graphs)."""
    import qloraner.train

    return mock.patch.object(qloraner.train, "RECOMPUTE_IN_GRAPH_ON", ())


def _budget_zero():
    """In-graph recomputation saving only each compiled layer's inputs (we let it save 5 % more: RECOMPUTE_BUDGET)."""
    import qloraner.model

    return mock.patch.object(qloraner.model, "RECOMPUTE_BUDGET", 0.0)


CHANGES = {
    "fp32-frozen": _fp32_frozen,
    "full-head": _full_head,
    "eager-attention": _eager_attention,
    "no-cudnn-attention": _cudnn_attention,
    "checkpoint-outside": _checkpoint_outside,
    "budget-zero": _budget_zero,
}

VARIANTS = {  # name -> run; "ours-*" settings override TrainConfig (16 sequences a step in every case)
    "peer": peer,
    "ours-ckpt": lambda: ours("ours-ckpt", gradient_checkpointing=True),
    "ours-no-ckpt": lambda: ours("ours-no-ckpt", gradient_checkpointing=False),
    "ours-ckpt-mb8": lambda: ours("ours-ckpt-mb8", gradient_checkpointing=True, micro_batch_size=8),
    "ours-ckpt-compile": lambda: ours("ours-ckpt-compile", gradient_checkpointing=True, compile=True),
    "ours-ckpt-mb8-compile": lambda: ours(
        "ours-ckpt-mb8-compile", gradient_checkpointing=True, micro_batch_size=8, compile=True
    ),
    "ours-ckpt-fp32-frozen": lambda: ours("ours-ckpt-fp32-frozen", change="fp32-frozen", gradient_checkpointing=True),
    "ours-ckpt-full-head": lambda: ours("ours-ckpt-full-head", change="full-head", gradient_checkpointing=True),
    "ours-ckpt-eager-attention": lambda: ours(
        "ours-ckpt-eager-attention", change="eager-attention", gradient_checkpointing=True
    ),
    "ours-ckpt-compile-cudnn": lambda: ours(
        "ours-ckpt-compile-cudnn", change="no-cudnn-attention", gradient_checkpointing=True, compile=True
    ),
    "ours-ckpt-compile-outside": lambda: ours(
        "ours-ckpt-compile-outside", change="checkpoint-outside", gradient_checkpointing=True, compile=True
    ),
    "ours-ckpt-compile-budget-zero": lambda: ours(
        "ours-ckpt-compile-budget-zero", change="budget-zero", gradient_checkpointing=True, compile=True
    ),
    "peer-no-cudnn": lambda: peer(cudnn=False),
}


def main() -> None:
    t0 = time.time()
    if WORLD == 1:
        make_model()  # under torchrun, make it first in one process
    print(f"model ready in {time.time() - t0:.0f} s", flush=True)
    tflops = matmul_tflops()
    limit = tflops * 1e12 / FLOP_PER_TOKEN if tflops else 0.0
    report = {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "processes": WORLD,
        "bf16_matmul_tflops": tflops,
        "compute_limit_tokens_per_s": limit,
        "seqs_per_step": SEQS,
        "results": [],
    }
    out = Path(os.environ.get("OUT", "/tmp"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    results = report["results"]
    functorch_defaults = torch._functorch.config.save_config()
    for name in RUNS:
        try:
            r = VARIANTS[name]()
        except Exception as err:  # one failed variant (e.g. no compiler for torch.compile) must not lose the others
            r = {
                "name": name,
                "error": f"{type(err).__name__}: {err}"[:2000],
                "tokens_per_s": float("nan"),
                "supervised_tokens_per_s": float("nan"),
                "s_per_step": float("nan"),
                "peak_gib": float("nan"),
            }
            print(f"{name} failed: {r['error']}", flush=True)
        finally:  # what a variant changed process-wide (cuDNN's SDPA, compiler settings), failed or not, goes back
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch._functorch.config.load_config(functorch_defaults)
        r["fraction_of_compute_limit"] = r["tokens_per_s"] / (limit * WORLD) if limit else None
        if name == "peer" or (results and results[0]["name"].startswith("peer")):
            r["speedup_vs_peer"] = r["tokens_per_s"] / (results or [r])[0]["tokens_per_s"]
        results.append(r)
        if rank0:
            (out / REPORT).write_text(json.dumps(report, indent=2))  # after each run: a timeout keeps the rest
            print(json.dumps(r), flush=True)
    if rank0:
        print(
            f"{'run':28} {'procs':>5} {'tok/s':>9} {'sup tok/s':>9} {'s/step':>7} {'median':>7} {'peak GiB':>8} {'x peer':>7}"
        )
        for r in results:
            print(
                f"{r['name']:28} {r.get('processes', 1):5} {r['tokens_per_s']:9.0f} {r['supervised_tokens_per_s']:9.0f} "
                f"{r['s_per_step']:7.2f} {r.get('s_per_step_median', float('nan')):7.2f} {r['peak_gib']:8.2f} {r.get('speedup_vs_peer', float('nan')):7.2f}"
            )


if __name__ == "__main__":
    main()
