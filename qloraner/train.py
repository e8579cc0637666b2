"""The training loop: prepare a run, then one loop read top to bottom (after karpathy/nanoGPT's train.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from qloraner import ROOT, QloranerError, checkpoint, dist, make_dir, memory, run_main
from qloraner.config import EvalConfig, TrainConfig, as_dict, from_args
from qloraner.conll import read_split, resolve_data_dir
from qloraner.data import (
    Encoded,
    build_prompt,
    build_record,
    data_sha256,
    encode,
    instruction_data,
    length_grouped_batches,
    split_step_within,
)
from qloraner.model import (
    add_lora,
    compile_layers,
    compile_unavailable,
    compute_dtype,
    dequantize_four_bit,
    dequantize_in_graph,
    dequantized_bytes,
    dropout_key,
    load_base,
    load_tokenizer,
    resolve_model,
    start_compiler,
    use_counter_dropout,
)
from qloraner.progress import Progress
from qloraner.step import GRAPH_PADDING, PAD_MULTIPLE, MicroStepGraphs, SupervisedLoss, collate, forward_backward

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1/SIGHUP; run again to resume
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)  # SIGHUP: the terminal was closed
FROZEN_COPIES_MAX_BYTES = 2**30  # --frozen-copies by default up to this size: a small model's launches and
# dequantizations dominate its steps; a large one's 4-bit weights are what makes it fit
RECOMPUTE_IN_GRAPH_ON = ("cuda",)  # with compile, checkpointing recomputes inside the compiled graphs (replayable RNG)


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


FLAT_ALIGN = 16  # elements: each view into the flat parameter starts aligned (64 bytes in fp32), as kernels expect


def flatten_trainable(model) -> list[torch.nn.Parameter]:
    """Rebind every trainable tensor of the model as a view into one flat parameter (one per dtype and device),
    and its gradient as a view into that parameter's gradient; the flat parameters, for the optimizer.

    The optimizer then updates one tensor a step instead of one per LoRA matrix: bitsandbytes' paged AdamW
    synchronizes the GPU after every tensor it updates, hundreds a step for all-linear LoRA. Backward adds into the
    gradient views in place, so the flat gradients must be zeroed, never set to None. The update is elementwise:
    the same numbers as one tensor at a time."""
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((p.dtype, p.device), []).append(p)
    flats = []
    for (dtype, device), params in groups.items():
        starts = [0]
        for p in params:
            starts.append(starts[-1] + math.ceil(p.numel() / FLAT_ALIGN) * FLAT_ALIGN)
        flat = torch.nn.Parameter(torch.zeros(starts[-1], dtype=dtype, device=device))
        flat.grad = torch.zeros_like(flat)
        for p, start in zip(params, starts):
            flat.data[start : start + p.numel()] = p.data.reshape(-1)
            p.data = flat.data[start : start + p.numel()].view_as(p)
            p.grad = flat.grad[start : start + p.numel()].view_as(p)
        flats.append(flat)
    return flats


@dataclass
class Run:
    """What a training run holds: built once by prepare(), then read by train_step() and the loop."""

    config: TrainConfig
    device: torch.device
    rank: int
    world: int
    tokenizer: object
    examples: list[Encoded]
    total: int  # optimizer steps of the whole run
    micro: int  # most sequences per forward pass in this process
    accum: int  # micro-steps per process and optimizer step
    model: torch.nn.Module  # the PEFT model (what checkpoints save)
    net: SupervisedLoss
    optimizer: torch.optim.Optimizer
    state: dict  # step (also the data position: one batch per step) and MLflow run id; saved in checkpoints
    last_good: Path | None  # the newest complete checkpoint
    lengths: list[int] = field(init=False)
    steps_per_epoch: int = field(init=False)
    _order: dict[int, list[list[int]]] = field(default_factory=dict)  # one epoch's batches at a time
    lock: object = None  # the output folder's lock file, held open by rank 0 for the run
    graphs: MicroStepGraphs | None = None  # with --cuda-graphs
    dropout_key: torch.Tensor | None = None  # CounterDropout's, set before each micro-step
    micro_plan: memory.MemoryPlan = memory.MemoryPlan(0, "no bound")  # the micro-batches' token bound

    def __post_init__(self) -> None:
        self.lengths = [len(e.input_ids) for e in self.examples]
        self.steps_per_epoch = math.ceil(len(self.examples) / self.config.batch_size)

    @property
    def main(self) -> bool:
        return self.rank == 0  # rank 0 alone logs, shows progress and writes the shared checkpoint files

    @property
    def padding(self) -> tuple[int, int]:
        """collate's multiples: the longest row eager, aligned widths compiled, coarser buckets with CUDA graphs."""
        return GRAPH_PADDING if self.graphs else (PAD_MULTIPLE, 1) if self.config.compile else (0, 1)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def micro_batches(self, step: int) -> tuple[list[list[int]], list[int]]:
        """This rank's micro-batches of the step, and the whole step's sequences."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch not in self._order:
            self._order = {epoch: length_grouped_batches(self.lengths, self.config.batch_size, self.config.seed, epoch)}
        batch = self._order[epoch][pos]
        parts = split_step_within(
            batch, self.lengths, self.world * self.accum, self.micro_plan.tokens, ranks=self.world
        )
        return [parts[i] for i in DistributedSampler(parts, self.world, self.rank, shuffle=False)], batch


def _use_compile(config: TrainConfig, device: torch.device) -> bool:
    """--compile / --no-compile as given; unset, on where it was measured to win (CUDA with Triton and a compiler)."""
    if config.compile is not None:
        return config.compile
    reason = compile_unavailable(device)
    if reason and device.type == "cuda":
        print(f"qloraner: training runs eager: {reason}", flush=True)
    return reason is None


def _use_graphs(config: TrainConfig, device: torch.device, compiled: bool) -> bool:
    """--cuda-graphs / --no-cuda-graphs as given (refused here without a GPU, by the config without --compile);
    unset, on with compiled layers on a GPU without checkpointing (with it, only when asked: a higher peak)."""
    if config.cuda_graphs and device.type != "cuda":
        raise QloranerError(f"--cuda-graphs: needs a CUDA GPU, not {device.type}")
    if config.cuda_graphs is not None:
        return config.cuda_graphs
    return device.type == "cuda" and compiled and not config.gradient_checkpointing


def _build_model(config: TrainConfig, model_path, device: torch.device, rank: int):
    """The NF4 base with a fresh LoRA adapter (the same init on every rank), compiled when asked; also whether its
    frozen weights were dequantized once and whether by the compiled layers (--frozen-copies and
    --dequantize-in-graph, resolved), and CounterDropout's key with CUDA graphs over checkpointing inside the
    compiled layers (None elsewhere: torch's dropout, whose recomputed masks replay the RNG's state)."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    in_graph = config.compile and config.gradient_checkpointing and device.type in RECOMPUTE_IN_GRAPH_ON
    model = add_lora(
        load_base(model_path, device),
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_module_list,
        checkpointing=config.gradient_checkpointing and not in_graph,
    )
    copies, dtype = config.frozen_copies, compute_dtype(device)
    if copies is None:  # small models: their steps wait on kernel launches, dequantizations among them
        copies = device.type == "cuda" and dequantized_bytes(model, dtype) <= FROZEN_COPIES_MAX_BYTES
    if copies:
        dequantize_four_bit(model, dtype)
    if config.dequantize_in_graph and copies:  # compile off never gets here: the config refuses it once resolved
        raise QloranerError(
            "--dequantize-in-graph: needs 4-bit weights, and the frozen copies (on by default for a model this "
            "small) leave none; add --no-frozen-copies"
        )
    nf4_in_graph = bool(config.compile and not copies and config.dequantize_in_graph is not False)
    if nf4_in_graph:
        dequantize_in_graph(model)
    # A CUDA graph cannot hold the RNG state replayed by the recomputed dropout: masks from a hash instead. Only
    # there: without graphs the hashed masks raised the 7B recipe's peak (docs/ENGINE.md, speed defaults).
    key = use_counter_dropout(model) if in_graph and config.cuda_graphs else None
    if config.compile:
        # The first layer's input (the frozen embedding's output) must require grad like every later layer's, or
        # the first layer gets a graph of its own; HF's checkpoint already asks for this.
        model.get_base_model().enable_input_require_grads()
        compile_layers(model, recompute_in_graph=in_graph)
    if rank:  # after the shared init, each rank its own dropout masks
        torch.manual_seed(config.seed + rank)
        random.seed(config.seed + rank)
    return model, copies, nf4_in_graph, key


def _claim_output_dir(config: TrainConfig):
    """Create --output-dir, check the tracking URI, and take the folder's lock for this run (rank 0): a second
    training on the same folder is refused; the lock dies with its owner, so a killed run leaves none behind."""
    import fcntl

    from qloraner.tracking import check_tracking

    out = make_dir(config.output_dir)
    check_tracking(out)
    lock = open(out / ".lock", "a+")  # held open for the whole run: closing it releases the lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        raise QloranerError(
            f"{out}: another training (pid {owner}) is using this folder; wait for it, or give another --output-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        newest = checkpoint.latest(out) if config.resume is not False else None
        if config.resume and newest is None:
            raise QloranerError(f"--resume: no complete checkpoint in {out}")
        if newest:
            try:  # fail before loading anything; a damaged newest checkpoint is dealt with when restoring
                checkpoint.check_compatible(newest, config)
            except checkpoint.DAMAGE:
                pass
    except BaseException:
        lock.close()
        raise
    return lock


def _examples(config: TrainConfig, tokenizer) -> tuple[list[Encoded], dict]:
    """The training examples as token ids and labels, and the instruction data's manifest."""
    data_dir = resolve_data_dir(config.data_dir, ROOT)
    records, manifest = instruction_data(
        data_dir, config.prompt, ROOT / "datasets" / "ner_instruct_data.json", None, config.response_format
    )
    for split in config.train_splits[1:]:  # a final run learns from valid too, once settings were chosen there
        records += [build_record(s, config.prompt, config.response_format) for s in read_split(data_dir, split)]
    records = records[: config.limit or None]
    manifest |= {"splits": list(config.train_splits), "data_sha256": data_sha256(data_dir, config.train_splits)}
    examples = encode(tokenizer, [r["prompt"] for r in records], [r["response"] for r in records])
    if config.prompt == "context":  # as in evaluation: an over-long example loses its document context, not its answer
        long = [i for i, e in enumerate(examples) if len(e.input_ids) > config.max_length]
        prompts = [build_prompt(records[i]["tokens"], config.prompt, config.response_format) for i in long]
        for i, e in zip(long, encode(tokenizer, prompts, [records[i]["response"] for i in long])):
            examples[i] = e
    examples = [Encoded(e.input_ids[: config.max_length], e.labels[: config.max_length]) for e in examples]
    empty = sum(e.n_supervised == 0 for e in examples)
    if empty:
        longest = max(len(e.input_ids) - e.n_supervised for e in examples)
        raise QloranerError(
            f"--max-length {config.max_length}: {empty} of {len(examples)} examples keep no response "
            f"token (prompts run to {longest} tokens); raise it above that"
        )
    return examples, manifest


def prepare(config: TrainConfig, device: torch.device | None = None) -> Run:
    """Data, model, optimizer and state of a run, restored from the newest checkpoint that loads; the MLflow run
    started (rank 0)."""
    rank, world, rank_device = dist.setup()
    device = device or rank_device
    compiled = _use_compile(config, device)
    # train_config.json: what ran
    config = dataclasses.replace(config, compile=compiled, cuda_graphs=_use_graphs(config, device, compiled))
    lock = _claim_output_dir(config) if rank == 0 else None
    try:
        return _load(config, device, rank, world, lock)
    except BaseException:
        if lock:
            lock.close()
        raise


def _load(config: TrainConfig, device: torch.device, rank: int, world: int, lock) -> Run:
    """prepare() once the output folder is claimed."""
    model_path = resolve_model(config.model)
    if config.compile:
        start_compiler()  # its workers start while the data and the model load
    tokenizer = load_tokenizer(model_path)
    examples, manifest = _examples(config, tokenizer)
    micro = config.micro_batch_size or math.ceil(config.batch_size / world)
    total = config.max_steps or math.ceil(config.epochs * math.ceil(len(examples) / config.batch_size))

    model, copies, nf4_in_graph, key = _build_model(config, model_path, device, rank)
    config = dataclasses.replace(config, frozen_copies=copies, dequantize_in_graph=nf4_in_graph)  # what ran
    import bitsandbytes as bnb  # after the checks above: importing it prints a line about optional CPU kernels

    optimizer = bnb.optim.PagedAdamW(flatten_trainable(model), lr=config.lr, weight_decay=config.weight_decay)
    accum = math.ceil(config.batch_size / (world * micro))
    net = SupervisedLoss(model)
    state = {"step": 0, "run_id": None, "data_sha256": manifest["data_sha256"]}
    run = Run(config, device, rank, world, tokenizer, examples, total, micro, accum, model, net, optimizer, state, None)
    run.lock = lock
    run.graphs = MicroStepGraphs(net, device) if config.cuda_graphs else None
    run.dropout_key = key
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    plan = memory.plan(config, model, device, compute_dtype(device), max(run.lengths), trainable)
    run.micro_plan = dataclasses.replace(plan, tokens=dist.smallest(plan.tokens, device))  # the ranks split alike
    restored = (
        checkpoint.restore_newest(run.out, config, model, optimizer, rank) if config.resume is not False else None
    )
    if restored:
        run.last_good, run.state = restored
        if run.state.setdefault("data_sha256", state["data_sha256"]) != state["data_sha256"]:
            what = manifest["source"] + "".join(f" + {split}.txt" for split in config.train_splits[1:])
            raise QloranerError(
                f"{run.last_good}: trained on other data than {what} (its checksum "
                "differs); give the data it was trained on, another --output-dir, or --no-resume"
            )
    for group in optimizer.param_groups:  # every rank starts from rank 0's adapter (the shared seed made it so too)
        for flat in group["params"]:
            dist.broadcast_(flat.data)
    if run.main:
        _start_tracking(run, model_path, manifest, resumed=run.last_good)
    return run


def _start_tracking(run: Run, model_path, manifest: dict, resumed: Path | None) -> None:
    """Start (or continue) the MLflow run; a fresh run logs its settings and data manifest. Print the plan."""
    import mlflow

    from qloraner.tracking import git_revision, start_run

    config = run.config
    run.state["run_id"] = start_run(run.out, config.experiment, run_id=run.state["run_id"]).info.run_id
    if not resumed:
        mlflow.log_params(
            {
                **as_dict(config),
                "model_path": str(model_path),
                "git_revision": git_revision(),
                "train_examples": len(run.examples),
                "total_steps": run.total,
                "world_size": run.world,
                "micro_batch_per_process": run.micro,
                "accumulation_per_process": run.accum,
                "micro_batch_tokens_used": run.micro_plan.tokens,
                "micro_batch_tokens_source": run.micro_plan.source,
            }
        )
        (run.out / "instruction_manifest.json").write_text(json.dumps(manifest, indent=2))
        mlflow.log_artifact(str(run.out / "instruction_manifest.json"))
    tokens = run.total * config.batch_size * sum(run.lengths) / len(run.lengths)
    where = f"{run.world} x {torch.cuda.get_device_name(run.device)}" if run.device.type == "cuda" else "CPU"
    if resumed:
        print(f"qloraner: resuming from {resumed} at step {run.state['step']}", flush=True)
    print(
        f"qloraner: training {len(run.examples)} "
        f"sequences, {run.total} steps of {config.batch_size} (about {tokens / 1e6:.2f}M tokens) on {where}, "
        f"compile {'on' if config.compile else 'off'}, "
        f"frozen weights {_frozen_form(config)}, recipe {config.recipe or 'none'}; {run.micro_plan.describe()}",
        flush=True,
    )
    if not run.micro_plan.fits_one_row:
        print(run.micro_plan.warning(max(run.lengths)), flush=True)
    if run.device.type == "cpu" and tokens > 1e6:
        print(
            "qloraner: training on a CPU takes hours at this size; --limit and --max-steps make a short run", flush=True
        )


def _frozen_form(config: TrainConfig) -> str:
    if config.frozen_copies:
        return "dequantized once"
    return "NF4 (dequantized in the compiled layers)" if config.dequantize_in_graph else "NF4"


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


@torch.no_grad()
def update(optimizer) -> None:
    """bitsandbytes' PagedAdamW.step without its waits for the whole device (one after each tensor, one at the end):
    the update and its pages' prefetch are queued on the stream behind the backward, and the host goes on to the
    next step. The state is managed memory that the host reads directly: checkpoint.save waits for the device."""
    if not optimizer.initialized:
        optimizer.check_overrides()
        optimizer.to_gpu()
        optimizer.initialized = True
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            if p.grad is not None:
                if not optimizer.state[p]:
                    optimizer.init_state(group, p, gindex, pindex)
                optimizer.prefetch_state(p)
                optimizer.update_step(group, p, gindex, pindex)


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
    if run.config.compile:
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
    data_dir = resolve_data_dir(config.data_dir, ROOT)
    present = all((data_dir / f"{split}.txt").is_file() for split in config.train_splits)
    data_sha = data_sha256(data_dir, config.train_splits) if present else None  # missing: prepare() says so
    final = checkpoint.finished(Path(config.output_dir), config, data_sha) if config.resume is not False else None
    if not (data_sha and final):
        return None
    state = json.loads((final / "trainer_state.json").read_text())
    print(f"qloraner: {final} already holds this run's adapter (step {state['step']}); not training again", flush=True)
    return TrainResult(state["step"], final, state["run_id"])


def train_adapter(config: TrainConfig, device: torch.device | None = None, on_step=None) -> TrainResult:
    """Fine-tune a LoRA adapter on the NF4 base; resumable, preemptible, logged to MLflow.

    Under torchrun every rank runs this: each step's `batch_size` sequences are split into micro-batches
    the same way on all ranks and dealt out by a DistributedSampler, so what a step computes does not
    depend on the number of processes; the ranks sum their LoRA gradients (the frozen base is never sent).
    """
    import mlflow

    from qloraner.tracking import end_run

    if done := _already_trained(config):
        return done
    run = prepare(config, device)
    config, stop, start = run.config, _StopFlag(), time.perf_counter()
    progress = Progress(run.total, "train", "steps", initial=run.state["step"], enabled=run.main)
    run.model.train()
    settled, first = start, run.state["step"]

    def record(queued: Queued) -> bool:
        """Read a queued step's numbers, log them and show progress; whether a rank asked to stop."""
        nonlocal settled
        metrics, asked = settle(run, queued, settled)
        settled = time.perf_counter()
        if run.main and (queued.step % config.log_every == 0 or queued.step == run.total):
            mlflow.log_metrics(metrics, step=queued.step, synchronous=False)  # written by MLflow's thread
        progress.update(1, **{k: metrics[k] for k in ("loss", "tokens_per_s", "gpu_mem_gib") if k in metrics})
        if run.main and run.device.type == "cpu" and queued.step == first + 1:
            print(_pace_line(metrics["step_s"], run.total - first), flush=True)
        if on_step:
            on_step(queued.step, metrics)
        return asked

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
                run.last_good = checkpoint.save(
                    checkpoint.step_dir(run.out, step), run.model, run.optimizer, run.state, config, run.rank
                )
            if stopping:
                if run.main:
                    print(f"qloraner: stopped at step {step}: saved {run.last_good}; run again to resume", flush=True)
                    end_run(status="KILLED")
                return TrainResult(step, None, run.state["run_id"], True, time.perf_counter() - start)
        final = checkpoint.save(run.out / "final", run.model, run.optimizer, run.state, config, run.rank)
        if run.main:
            mlflow.log_artifacts(str(final), artifact_path="adapter")
            end_run()
        return TrainResult(run.state["step"], final, run.state["run_id"], False, time.perf_counter() - start)
    except BaseException:
        if run.main:
            end_run(status="FAILED")
        raise
    finally:
        progress.close()
        stop.restore()
        if run.lock:
            run.lock.close()  # releases the output folder for the next run in this process


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
        config = from_args(TrainConfig, argv, "QLoRA fine-tuning for CoNLL-2003 NER (run via ./run_train.sh)")
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
                data_dir=config.data_dir,
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
