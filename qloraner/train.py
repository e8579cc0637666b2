"""The training loop: a prepared run (qloraner/prepare.py), then one loop read top to bottom (after karpathy/nanoGPT's
train.py)."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qloraner import ROOT, QloranerError, checkpoint, dist, run_main
from qloraner.config import EvalConfig, TrainConfig, from_args
from qloraner.conll import resolve_corpus
from qloraner.data import data_sha256
from qloraner.model import dropout_key
from qloraner.optim import update
from qloraner.prepare import Run, prepare
from qloraner.progress import Progress
from qloraner.step import collate, forward_backward

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1/SIGHUP; run again to resume
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)  # SIGHUP: the terminal was closed


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
    seconds: float | None = None  # wall time of this invocation's steps; None when final/ was already there


@dataclass(frozen=True)
class Queued:
    """An optimizer step queued on the device, its numbers not read yet."""

    step: int  # counted from 1
    values: torch.Tensor  # the summed loss, the ranks' stop flags, the gradient norm: on the host once `ready`
    ready: torch.cuda.Event | None  # the copy to the host done (on a GPU)
    n_sup: int  # supervised tokens of the step (all ranks)
    n_tok: int  # tokens of the step (all ranks)
    micro_batches: int  # this rank's forward passes: more where --micro-batch-tokens split the step
    lr: float
    t0: float  # perf_counter when it began to be queued
    t1: float  # perf_counter when it was queued: on a CPU, which runs a step as it is queued, when it was done


def train_step(run: Run, step: int, stop_asked: bool = False) -> Queued:
    """Queue one optimizer step: this rank's micro-batches forward and backward, weighted by the step's supervised
    tokens over all ranks; the ranks' gradients summed; clip; update; zero the gradients. Nothing here waits for the
    device: its loss, gradient norm and the ranks' stop flags (`stop_asked` summed) are read by settle()."""
    t0 = time.perf_counter()
    mine, batch = run.micro_batches(step)
    n_sup = sum(run.examples[i].n_supervised for i in batch)  # all ranks' supervised tokens: the weight
    n_tok = sum(run.lengths[i] for i in batch)
    loss_sum = torch.zeros((), device=run.device)
    for micro, part in enumerate(filter(None, mine)):  # a step of fewer sequences than parts leaves some parts empty
        batch_t = collate([run.examples[i] for i in part], run.tokenizer.pad_token_id, run.device, *run.padding)
        if run.dropout_key is not None:  # this micro-step's masks (a CUDA graph reads the key at replay)
            run.dropout_key.fill_(dropout_key(run.config.seed, run.rank, step, micro))
        if run.graphs:
            loss = run.graphs(batch_t, 1 / n_sup)
        else:
            loss = forward_backward(run.net, batch_t, 1 / n_sup)
        loss_sum += loss.float()  # detached: no autograd graph outlives its micro-step
    # sum the ranks' gradients: one all-reduce of the flat gradient, in place of DDP's hooks on every LoRA tensor
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    for p in params:
        dist.sum_(p.grad)
    norm = torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm or float("inf"))
    asked = torch.full((), float(stop_asked), device=run.device)  # a fill: copying from the host would wait
    values = torch.cat([dist.sum_(torch.stack([loss_sum, asked])), norm.float()[None]])
    # to the host (pinned) as soon as they are computed: reading them then waits for this point of the stream, not
    # for the kernels queued after it
    values = values.to("cpu", non_blocking=True)
    ready = torch.cuda.Event() if run.device.type == "cuda" else None
    if ready:
        ready.record()
    update(run.optimizer)
    run.optimizer.zero_grad(set_to_none=False)  # in place: the model's gradients are views into the flat ones
    lr = run.optimizer.param_groups[0]["lr"]
    return Queued(step + 1, values, ready, n_sup, n_tok, sum(map(bool, mine)), lr, t0, time.perf_counter())


def settle(run: Run, queued: Queued, since: float) -> tuple[dict[str, float], bool]:
    """A queued step's metrics, and whether any rank asked to stop: its numbers read from the device (the loop's one
    wait for it, a step behind). A non-finite loss or gradient norm stops the run here, before any checkpoint holds
    its update. On a GPU its time runs from `since` (when the step before was read) or from its start, whichever is
    later."""
    if queued.ready:
        queued.ready.synchronize()
    loss_total, stops, grad_norm = queued.values.tolist()
    if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
        raise QloranerError(
            f"non-finite {'loss' if not math.isfinite(loss_total) else 'gradient norm'} at step {queued.step}; "
            f"stopped before saving its update. Last good checkpoint: {run.last_good or 'none'}"
        )
    # a GPU's step ends when its numbers are read; a CPU ran it while it was queued (and the next one since)
    dt = time.perf_counter() - max(since, queued.t0) if queued.ready else queued.t1 - queued.t0
    metrics = {
        "loss": loss_total / queued.n_sup,
        "grad_norm": grad_norm,
        "lr": queued.lr,
        "tokens_per_s": queued.n_tok / dt,
        "supervised_tokens_per_s": queued.n_sup / dt,
        "step_s": dt,
        "micro_batches": queued.micro_batches,
    }
    if run.device.type == "cuda":
        metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    if run.speed.compile:
        from torch._dynamo.utils import counters

        metrics["compiled_graphs"] = counters["stats"]["unique_graphs"]  # grows with every (re)compile
    return metrics, stops > 0


def _pace_line(step_s: float, steps: int) -> str:
    """After a CPU run's first step: how long all its steps would take at that pace, and how to make a short run."""
    hours, rest = divmod(round(step_s * steps), 3600)
    return (
        f"qloraner: the first step took {step_s:.0f} s: {steps} steps would take about {hours}:{rest // 60:02d} "
        "(h:mm) at this pace; --limit N and --max-steps N make a short run"
    )


class _StopFlag:
    """SIGTERM, SIGUSR1, SIGHUP (the terminal closed) and a first Ctrl-C ask the loop to checkpoint at the end of
    the current step and exit; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old = {s: signal.signal(s, self._set) for s in (*PREEMPT_SIGNALS, signal.SIGINT)}

    def _set(self, signum, _frame) -> None:
        self.signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print(
                "\nqloraner: interrupted; saving a checkpoint after this step (Ctrl-C again stops at once)", flush=True
            )

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _already_trained(config: TrainConfig) -> TrainResult | None:
    """The finished run in --output-dir when final/ holds an adapter of these settings and data (a rerun after a
    stop during evaluation goes straight to evaluating it)."""
    corpus = resolve_corpus(config, ROOT)
    present = all(corpus.path(split).is_file() for split in config.train_splits)
    data_sha = data_sha256(corpus, config.train_splits) if present else None  # missing: prepare() says so
    final = checkpoint.finished(Path(config.output_dir), config, data_sha) if config.resume is not False else None
    if not (data_sha and final):
        return None
    state = json.loads((final / "trainer_state.json").read_text())
    print(f"qloraner: {final} already holds this run's adapter (step {state['step']}); not training again", flush=True)
    return TrainResult(state["step"], final, state["run_id"])


@dataclass
class _Reader:
    """Reads queued steps' numbers (a step behind on a GPU): logs them to MLflow, shows progress, tells a CPU run's
    pace after its first step; whether any rank asked to stop."""

    run: Run
    progress: Progress
    on_step: Callable[[int, dict], None] | None
    settled: float  # when the step before was read
    first: int  # the step this invocation started from

    def __call__(self, queued: Queued) -> bool:
        import mlflow

        run = self.run
        metrics, asked = settle(run, queued, self.settled)
        self.settled = time.perf_counter()
        if run.main and (queued.step % run.config.log_every == 0 or queued.step == run.total):
            mlflow.log_metrics(metrics, step=queued.step, synchronous=False)  # written by MLflow's thread
        self.progress.update(1, **{k: metrics[k] for k in ("loss", "tokens_per_s", "gpu_mem_gib") if k in metrics})
        if run.main and run.device.type == "cpu" and queued.step == self.first + 1:
            print(_pace_line(metrics["step_s"], run.total - self.first), flush=True)
        if self.on_step:
            self.on_step(queued.step, metrics)
        return asked


def train_adapter(config: TrainConfig, device: torch.device | None = None, on_step=None) -> TrainResult:
    """Fine-tune a LoRA adapter on the NF4 base; resumable, preemptible, logged to MLflow. Under torchrun every rank
    runs this, and a step computes the same whatever the number of processes (Run.micro_batches, train_step)."""
    from qloraner.tracking import end_run

    if done := _already_trained(config):
        return done
    run = prepare(config, device)
    config, stop, start = run.config, _StopFlag(), time.perf_counter()
    progress = Progress(run.total, "train", "steps", initial=run.state["step"], enabled=run.main)
    record = _Reader(run, progress, on_step, start, run.state["step"])
    run.model.train()
    try:
        pending = None  # the step before, still on the device
        while run.state["step"] < run.total:
            step = run.state["step"]
            # determine and set the learning rate of this step
            lr = get_lr(
                step, max_lr=config.lr, warmup=config.warmup_steps, total=run.total, min_ratio=config.min_lr_ratio
            )
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            # forward, backward, clip and update, queued on the device
            queued = train_step(run, step, stop_asked=stop.signal is not None)
            run.state["step"] = step = step + 1
            # logging and progress of the step before, read now that this one is queued behind it: the host waits only
            # for numbers a step old, so the device has this step's kernels while it finishes that one
            stopping = pending is not None and record(pending)
            pending = queued
            # checkpoint every save_every steps, and on a signal, then stop, this step's numbers read first (no
            # checkpoint holds a non-finite update): under torchrun the ranks learn of a stop from the numbers
            # (all stop after the same step, a step or two after the signal)
            stopping = stopping or (run.world == 1 and stop.signal is not None)
            due = config.save_every and step % config.save_every == 0 and step < run.total
            if stopping or due or step == run.total:
                stopping, pending = record(pending) or stopping, None
            if stopping or due:
                run.last_good = _save(run, checkpoint.step_dir(run.out, step))
            if stopping:
                return _stopped(run, step, start)
        return _finished(run, start)
    except BaseException:
        if run.main:
            end_run(status="FAILED")
        raise
    finally:
        progress.close()
        stop.restore()
        if run.lock:
            run.lock.close()  # releases the output folder for the next run in this process


def _save(run: Run, folder: Path) -> Path:
    """The adapter, optimizer, RNG, data position and settings (what ran) into `folder`, atomically."""
    return checkpoint.save(folder, run.model, run.optimizer, run.state, run.saved_settings, run.rank)


def _stopped(run: Run, step: int, start: float) -> TrainResult:
    """A run stopped by a signal after saving `step`: say so, and mark its MLflow run KILLED."""
    from qloraner.tracking import end_run

    if run.main:
        print(f"qloraner: stopped at step {step}: saved {run.last_good}; run again to resume", flush=True)
        end_run(status="KILLED")
    return TrainResult(step, None, run.state["run_id"], True, time.perf_counter() - start)


def _finished(run: Run, start: float) -> TrainResult:
    """The final adapter saved to final/ and logged; the MLflow run ended."""
    import mlflow

    from qloraner.tracking import end_run

    final = _save(run, run.out / "final")
    if run.main:
        mlflow.log_artifacts(str(final), artifact_path="adapter")
        end_run()
    return TrainResult(run.state["step"], final, run.state["run_id"], False, time.perf_counter() - start)


class _Preempted(Exception):
    """SIGTERM, SIGUSR1 or SIGHUP arrived while the trained adapter was being evaluated."""


def _evaluate_preemptibly(config: EvalConfig) -> dict | None:
    """evaluate_model, or None when SIGTERM/SIGUSR1/SIGHUP stops it: final/ is complete, so a rerun goes straight to
    evaluating it."""
    from qloraner.evaluate import evaluate_model

    def preempt(_signum, _frame):
        raise _Preempted

    old = {s: signal.signal(s, preempt) for s in PREEMPT_SIGNALS}
    try:
        return evaluate_model(config)
    except _Preempted:
        print(f"qloraner: stopped while evaluating {config.adapter}; run again to evaluate it", flush=True)
        return None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        config = from_args(TrainConfig, argv, "QLoRA fine-tuning for NER (run via ./run_train.sh)")
        result = train_adapter(config)
        if result.preempted:
            return EXIT_PREEMPTED
        main_rank = dist.setup()[0] == 0
        if main_rank and result.seconds is not None:
            print(
                f"qloraner: trained {result.step} steps in {result.seconds:.0f} s; adapter in {result.final}",
                flush=True,
            )
        if not config.eval_after:
            return 0
        results = _evaluate_preemptibly(
            EvalConfig(
                adapter=str(result.final),
                **config.data_settings,
                experiment=config.experiment,
                limit=config.eval_limit,
                split=config.eval_split,
                compare_base=config.compare_base,
            )
        )
        if results is None:
            return EXIT_PREEMPTED
        if main_rank:
            m = results["fine-tuned"]
            print(
                f"qloraner: done: F1 {100 * m['f1']:.2f} (P {100 * m['precision']:.2f}, R {100 * m['recall']:.2f}) on "
                f"{m['sentences']} {config.eval_split} sentences; trained {result.seconds or 0:.0f} s, "
                f"evaluated {m['seconds']:.0f} s "
                f"({m['sentences_per_s']:.1f} sentences/s); recipe {config.recipe or 'none'}"
                + (f"; {m['cut_answers']} answers cut at their token budget" if m["cut_answers"] else "")
                + (f"; base model F1 {100 * results['base']['f1']:.2f}" if "base" in results else ""),
                flush=True,
            )
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
