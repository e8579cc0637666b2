"""Prepare a training run: claim the output folder, build the examples and the model (its speed choices resolved),
the optimizer and the micro-batch bound, restore the newest checkpoint, start MLflow."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from qloraner import ROOT, QloranerError, checkpoint, dist, make_dir, memory
from qloraner.compiler import compile_layers, start_compiler
from qloraner.config import TrainConfig, as_dict
from qloraner.conll import resolve_corpus
from qloraner.data import Encoded, encode, length_grouped_batches, split_step_within, training_records
from qloraner.labels import LabelSet, types_seen
from qloraner.model import add_lora, compute_dtype, load_base, load_tokenizer, use_counter_dropout
from qloraner.nf4 import dequantize_four_bit, dequantize_in_graph
from qloraner.optim import flatten_trainable
from qloraner.prompts import build_prompt, fit
from qloraner.sources import resolve_model
from qloraner.speed import Speed, choose_compile, resolve_speed
from qloraner.step import GRAPH_PADDING, PAD_MULTIPLE, MicroStepGraphs, SupervisedLoss


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
    speed: Speed = Speed(False, memory.Checkpointing(False, "set"))  # the engine's switches, resolved
    labels: dict = field(default_factory=dict)  # the label set learned (types -> descriptions), from the data

    def __post_init__(self) -> None:
        self.lengths = [len(e.input_ids) for e in self.examples]
        self.steps_per_epoch = math.ceil(len(self.examples) / self.config.batch_size)

    @property
    def main(self) -> bool:
        return self.rank == 0  # rank 0 alone logs, shows progress and writes the shared checkpoint files

    @property
    def padding(self) -> tuple[int, int]:
        """collate's multiples: the longest row eager, aligned widths compiled, coarser buckets with CUDA graphs."""
        return GRAPH_PADDING if self.graphs else (PAD_MULTIPLE, 1) if self.speed.compile else (0, 1)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def saved_settings(self) -> dict:
        """train_config.json: the settings as asked, with what ran in place of each auto (the label set learned,
        the engine's switches)."""
        return {**as_dict(self.config), "labels": self.labels, **self.speed.record()}

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


def _build_model(
    config: TrainConfig, model_path, device: torch.device, rank: int, compiled: bool, longest: int, micro: int
) -> tuple[torch.nn.Module, Speed, torch.Tensor | None]:
    """The NF4 base with a fresh LoRA adapter (the same init on every rank), built as the engine's resolved
    switches say (resolve_speed); and CounterDropout's key where the switches want hashed masks (else None:
    torch's dropout, whose recomputed masks replay the RNG's state)."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    base = load_base(model_path, device)
    plan = resolve_speed(config, device, base, compiled, longest, micro)
    model = add_lora(
        base,
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_module_list,
        checkpointing=plan.checkpointing.on and not plan.recompute_in_graph,
    )
    if plan.frozen_copies:
        dequantize_four_bit(model, compute_dtype(device))
    if plan.nf4_in_graph:
        dequantize_in_graph(model)
    key = use_counter_dropout(model) if plan.counter_dropout else None
    if plan.compile:
        # The first layer's input (the frozen embedding's output) must require grad like every later layer's, or
        # the first layer gets a graph of its own; HF's checkpoint already asks for this.
        model.get_base_model().enable_input_require_grads()
        compile_layers(model, recompute_in_graph=plan.recompute_in_graph)
    if rank:  # after the shared init, each rank its own dropout masks
        torch.manual_seed(config.seed + rank)
        random.seed(config.seed + rank)
    return model, plan, key


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
    """The training examples as token ids and labels, each fitted to --max-length (_fitted), and the instruction
    data's manifest (its `labels`: the label set of the training split's types, which every prompt names)."""
    by_split, manifest = training_records(
        resolve_corpus(config, ROOT),
        config.train_splits,
        config.prompt,
        ROOT / "datasets" / "ner_instruct_data.json",
        config.response_format,
        config.labels,
    )
    labels = LabelSet.from_saved(manifest["labels"])
    _warn_labels(config, labels)
    for split in config.train_splits[1:]:  # a final run learns from valid too, once settings were chosen there
        _warn_labels(config, labels, split, types_seen(r["tags"] for r in by_split[split]))
    records = [r for split in config.train_splits for r in by_split[split]][: config.limit or None]
    encoded = encode(tokenizer, [r["prompt"] for r in records], [r["response"] for r in records])
    examples = [_fitted(config, tokenizer, labels, r, e) for r, e in zip(records, encoded)]
    empty = sum(e.n_supervised == 0 for e in examples)
    if empty:
        longest = max(len(e.input_ids) - e.n_supervised for e in examples)
        raise QloranerError(
            f"--max-length {config.max_length}: {empty} of {len(examples)} examples keep no response "
            f"token (prompts run to {longest} tokens); raise it above that"
        )
    return examples, manifest


def _fitted(config: TrainConfig, tokenizer, labels: LabelSet, record: dict, encoded: Encoded) -> Encoded:
    """One example fitted to --max-length by prompts.fit, as evaluation fits a prompt: an over-long context example
    loses its document context, never its answer (its sentence stays whole); what is still over is truncated."""

    def build(words: int, context: bool) -> Encoded:
        """The example with its context as encoded, else re-encoded without it (its `words` are always all)."""
        if context:
            return encoded
        prompt = build_prompt(record["tokens"], config.prompt, config.response_format, "", labels)
        return encode(tokenizer, [prompt], [record["response"]])[0]

    words = len(record["tokens"])
    e = fit(build, words, config.prompt == "context", config.max_length, fewest=words).built
    return Encoded(e.input_ids[: config.max_length], e.labels[: config.max_length])


def _warn_labels(config: TrainConfig, labels: LabelSet, split: str = "", types: tuple[str, ...] = ()) -> None:
    """One line for a recipe's [labels] description of a type the training data lacks, or for types of another
    split learned from (`split`, its `types`) that the training split lacks: prompts and answers leave them out."""
    if not split:
        unused = [t for t in config.labels or {} if t not in labels.types]
        if unused:
            print(f"qloraner: warning: [labels] describes {', '.join(unused)}, not in the training data", flush=True)
        return
    unseen = [t for t in types if t not in labels.types]
    if unseen:
        print(
            f"qloraner: warning: the {split} split's types {', '.join(unseen)} are not the train split's "
            f"({labels.listed}): the prompts do not name them, nor does evaluation read them",
            flush=True,
        )


def prepare(config: TrainConfig, device: torch.device | None = None) -> Run:
    """Data, model, optimizer and state of a run, restored from the newest checkpoint that loads; the MLflow run
    started (rank 0)."""
    rank, world, rank_device = dist.setup()
    device = device or rank_device
    compiled = choose_compile(config, device)
    lock = _claim_output_dir(config) if rank == 0 else None
    try:
        return _load(config, device, rank, world, lock, compiled)
    except BaseException:
        if lock:
            lock.close()
        raise


def _load(config: TrainConfig, device: torch.device, rank: int, world: int, lock, compiled: bool) -> Run:
    """prepare() once the output folder is claimed."""
    model_path = resolve_model(config.model)
    if compiled:
        start_compiler()  # its workers start while the data and the model load
    tokenizer = load_tokenizer(model_path)
    examples, manifest = _examples(config, tokenizer)
    micro = config.micro_batch_size or math.ceil(config.batch_size / world)
    total = config.max_steps or math.ceil(config.epochs * math.ceil(len(examples) / config.batch_size))

    longest = max(len(e.input_ids) for e in examples)
    model, plan, key = _build_model(config, model_path, device, rank, compiled, longest, micro)
    import bitsandbytes as bnb  # after the checks above: importing it prints a line about optional CPU kernels

    optimizer = bnb.optim.PagedAdamW(flatten_trainable(model), lr=config.lr, weight_decay=config.weight_decay)
    accum = math.ceil(config.batch_size / (world * micro))
    net = SupervisedLoss(model)
    state = {"step": 0, "run_id": None, "data_sha256": manifest["data_sha256"]}
    run = Run(config, device, rank, world, tokenizer, examples, total, micro, accum, model, net, optimizer, state, None)
    run.lock, run.speed, run.labels, run.dropout_key = lock, plan, manifest["labels"], key
    run.graphs = MicroStepGraphs(net, device) if plan.cuda_graphs else None
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    bound = memory.plan(config, model, device, compute_dtype(device), longest, trainable, plan.checkpointing.on)
    run.micro_plan = dataclasses.replace(bound, tokens=dist.smallest(bound.tokens, device))  # the ranks split alike
    restored = (
        checkpoint.restore_newest(run.out, config, model, optimizer, rank) if config.resume is not False else None
    )
    if restored:
        run.last_good, run.state = restored
        if run.state.setdefault("data_sha256", state["data_sha256"]) != state["data_sha256"]:
            what = " + ".join(manifest["files"])
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
                **run.speed.record(),  # what ran, in place of each auto
                "labels": ",".join(run.labels),  # the types (their descriptions: train_config.json)
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
        f"{run.speed.describe()}, recipe {config.recipe or 'none'}; {run.micro_plan.describe()}",
        flush=True,
    )
    if not run.micro_plan.fits_one_row:
        print(run.micro_plan.warning(max(run.lengths)), flush=True)
    if run.device.type == "cpu" and tokens > 1e6:
        print(
            "qloraner: training on a CPU takes hours at this size; --limit and --max-steps make a short run", flush=True
        )
