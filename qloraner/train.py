"""The training loop: one function, read top to bottom (after karpathy/nanoGPT's train.py)."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from qloraner import QloranerError, dist, run_main
from qloraner.config import TrainConfig, as_dict, from_args
from qloraner.conll import resolve_data_dir
from qloraner.data import IGNORE_INDEX, Encoded, encode, instruction_data, length_grouped_batches, split_step
from qloraner.model import add_lora, compile_layers, load_base, load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1; run again to resume
_STEP_DIR = re.compile(r"^step-(\d{6})$")
RECOMPUTE_IN_GRAPH_ON = ("cuda",)  # with --compile, checkpointing recomputes inside the compiled graphs (replayable RNG)
_CKPT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng-0.pt", "trainer_state.json")


def get_lr(step: int, *, max_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to max_lr over `warmup` steps, then cosine decay to min_ratio * max_lr at `total`."""
    if step >= total:  # the end wins, even over an unfinished warm-up
        return max_lr * min_ratio
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    step: int
    final: Path | None  # the final/ adapter, or None when preempted
    run_id: str
    preempted: bool = False


def collate(examples: list[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row with EOS; pads are masked out of attention and labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


class SupervisedLoss(torch.nn.Module):
    """The PEFT model with the training loss as its forward, so that DDP wraps the whole forward pass."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token loss, running the LM head only where a label exists."""
        inner = self.model.get_base_model()  # LlamaForCausalLM with the LoRA layers injected
        hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = inner.lm_head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum")


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, optimizer, state: dict, config: TrainConfig, rank: int = 0) -> Path:
    """Adapter-only checkpoint, written to a temp folder and renamed, so it appears whole or not at all.

    Every rank writes its RNG state; rank 0 writes the rest (the adapter and optimizer are the same on all).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-{rank}.pt")
    dist.barrier()
    if rank == 0:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "train_config.json").write_text(json.dumps(as_dict(config), indent=2))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # last: marks the folder complete
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():  # final/ of an earlier run: move it aside, then swap
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    dist.barrier()
    return path


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete step-NNNNNN/ checkpoint; half-written folders are skipped."""
    found = []
    for d in Path(output_dir).glob("step-*"):
        m = _STEP_DIR.match(d.name)
        if m and all((d / f).is_file() for f in _CKPT_FILES):
            try:
                found.append((json.loads((d / "trainer_state.json").read_text())["step"], d))
            except (ValueError, KeyError):
                continue
    return max(found)[1] if found else None


def _check_compatible(ckpt: Path, config: TrainConfig) -> None:
    saved = {"response_format": "lines", **json.loads((ckpt / "train_config.json").read_text())}  # older: lines
    keys = ("model", "lora_r", "lora_alpha", "target_modules", "prompt", "response_format", "batch_size", "seed", "limit")
    diff = [f"{k}={saved.get(k)!r} (now {getattr(config, k)!r})" for k in keys if saved.get(k) != getattr(config, k)]
    if diff:
        raise QloranerError(f"{ckpt}: incompatible checkpoint, trained with {', '.join(diff)}; use another --output-dir or --no-resume")


def _restore(ckpt: Path, model, optimizer, rank: int) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise QloranerError(f"{ckpt}: adapter does not fit this model (unexpected {result.unexpected_keys[0]})")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    rng_file = ckpt / f"rng-{rank}.pt"
    if rng_file.is_file():  # absent when the world size grew: that rank keeps its fresh seed
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())


class _StopFlag:
    """SIGTERM/SIGUSR1 ask the loop to checkpoint at the end of the current step and exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def _set(self, signum, _frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def train_adapter(config: TrainConfig, device: torch.device | None = None, on_step=None) -> TrainResult:
    """Fine-tune a LoRA adapter on the NF4 base; resumable, preemptible, logged to MLflow.

    Under torchrun every rank runs this: each step's `batch_size` sequences are split into micro-batches
    the same way on all ranks and dealt out by a DistributedSampler, so what a step computes does not
    depend on the number of processes; only the LoRA parameters are in DDP.
    """
    import bitsandbytes as bnb
    import mlflow

    from qloraner.tracking import git_revision, start_run

    rank, world, rank_device = dist.setup()
    device = device or rank_device
    main = rank == 0  # rank 0 alone logs, shows progress and writes the shared checkpoint files
    micro = config.micro_batch_size or math.ceil(config.batch_size / world)
    accum = math.ceil(config.batch_size / (world * micro))  # micro-steps per process and optimizer step
    out = Path(config.output_dir)
    ckpt = latest_checkpoint(out) if config.resume is not False else None
    if config.resume and ckpt is None:
        raise QloranerError(f"--resume: no complete checkpoint in {out}")
    if ckpt:
        _check_compatible(ckpt, config)
    data_dir = resolve_data_dir(config.data_dir, ROOT)
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    records, manifest = instruction_data(data_dir, config.prompt, ROOT / "datasets" / "ner_instruct_data.json", config.limit,
                                         config.response_format)
    examples = encode(tokenizer, [r["prompt"] for r in records], [r["response"] for r in records], config.max_length)
    lengths = [len(e.input_ids) for e in examples]
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)

    torch.manual_seed(config.seed)  # the same LoRA init on every rank
    random.seed(config.seed)
    in_graph = config.compile and config.gradient_checkpointing and device.type in RECOMPUTE_IN_GRAPH_ON
    model = add_lora(load_base(model_path, device), r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                     target_modules=config.target_module_list, checkpointing=config.gradient_checkpointing and not in_graph)
    if config.compile:
        compile_layers(model, recompute_in_graph=in_graph)
    if rank:  # after the shared init, each rank its own dropout masks
        torch.manual_seed(config.seed + rank)
        random.seed(config.seed + rank)
    params = list(_trainable(model).values())
    optimizer = bnb.optim.PagedAdamW(params, lr=config.lr, weight_decay=config.weight_decay)  # 32-bit states
    state = {"step": 0, "run_id": None}  # the step is also the data position (one batch per step)
    if ckpt:
        state = _restore(ckpt, model, optimizer, rank)
        if main:
            print(f"qloraner: resuming from {ckpt} at step {state['step']}", flush=True)
    if main:
        run = start_run(out, config.experiment, run_id=state["run_id"])
        state["run_id"] = run.info.run_id
        if not ckpt:
            mlflow.log_params({**as_dict(config), "model_path": str(model_path), "git_revision": git_revision(),
                               "train_examples": len(examples), "total_steps": total, "world_size": world,
                               "micro_batch_per_process": micro, "accumulation_per_process": accum})
            (out / "instruction_manifest.json").write_text(json.dumps(manifest, indent=2))
            mlflow.log_artifact(str(out / "instruction_manifest.json"))

    net = dist.wrap_lora(SupervisedLoss(model), device)
    epoch_batches: dict[int, list[list[int]]] = {}

    def my_micro_batches(step: int) -> tuple[list[list[int]], list[int]]:
        """This rank's micro-batches of the step, and the whole step's sequences."""
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches.clear()  # one epoch's order at a time
            epoch_batches[epoch] = length_grouped_batches(lengths, config.batch_size, config.seed, epoch)
        batch = epoch_batches[epoch][pos]
        parts = split_step(batch, lengths, world * accum)
        return [parts[i] for i in DistributedSampler(parts, world, rank, shuffle=False)], batch

    stop = _StopFlag()
    model.train()
    last_good = ckpt
    bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", dynamic_ncols=True, disable=None if main else True)
    try:
        while state["step"] < total:
            step = state["step"]
            lr = get_lr(step, max_lr=config.lr, warmup=config.warmup_steps, total=total, min_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            mine, batch = my_micro_batches(step)
            n_sup = sum(examples[i].n_supervised for i in batch)  # all ranks' supervised tokens: the weight
            n_tok = sum(lengths[i] for i in batch)
            loss_sum = torch.zeros((), device=device)
            for k, part in enumerate(mine):
                weight = 1.0 if part else 0.0  # a step of fewer sequences than parts: a rank still joins the sync
                batch_t = collate([examples[i] for i in part or batch[:1]], tokenizer.pad_token_id, device)
                with dist.no_sync(net, last=k == len(mine) - 1):  # one all-reduce per step, in the last backward
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        loss = net(**batch_t) * weight
                    (loss * (world / n_sup)).backward()  # DDP averages over ranks: undo it to get the token sum
                loss_sum += loss.detach().float()
            if not torch.isfinite(dist.sum_(loss_sum)):  # NaN on any rank reaches every rank
                raise QloranerError(f"non-finite loss at step {step + 1}; stopped before the update. "
                                    f"Last good checkpoint: {last_good or 'none'}")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            dt = time.perf_counter() - t0
            metrics = {"loss": loss_sum.item() / n_sup, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_tok / dt,
                       "supervised_tokens_per_s": n_sup / dt, "step_s": dt}
            if device.type == "cuda":
                metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if main and (step % config.log_every == 0 or step == total):
                mlflow.log_metrics(metrics, step=step)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "lr", "tokens_per_s", "gpu_mem_gib")}, refresh=False)
            bar.update(1)
            if on_step:
                on_step(step, metrics)
            stopping = dist.any_(stop.signal is not None, device)  # all ranks stop at the same step
            if stopping or (config.save_every and step % config.save_every == 0 and step < total):
                last_good = save_checkpoint(out / f"step-{step:06d}", model, optimizer, state, config, rank)
            if stopping:
                if main:
                    print(f"qloraner: signal at step {step}: saved {last_good}; run again to resume", flush=True)
                    mlflow.end_run(status="KILLED")
                return TrainResult(step, None, state["run_id"], preempted=True)
        final = save_checkpoint(out / "final", model, optimizer, state, config, rank)
        if main:
            mlflow.log_artifacts(str(final), artifact_path="adapter")
            mlflow.end_run()
        return TrainResult(state["step"], final, state["run_id"])
    except BaseException:
        if main:
            mlflow.end_run(status="FAILED")
        raise
    finally:
        bar.close()
        stop.restore()


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        config = from_args(TrainConfig, argv, "QLoRA fine-tuning for CoNLL-2003 NER (run via ./run_train.sh)")
        result = train_adapter(config)
        if result.preempted:
            return EXIT_PREEMPTED
        if dist.setup()[0] == 0:
            print(f"qloraner: trained {result.step} steps; adapter in {result.final}", flush=True)
        if config.eval_after:
            from qloraner.evaluate import main as evaluate_main

            return evaluate_main(["--adapter", str(result.final), "--output-dir", str(Path(config.output_dir) / "eval"),
                                  "--experiment", config.experiment, "--limit", str(config.eval_limit)]
                                 + (["--data-dir", config.data_dir] if config.data_dir else []))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
