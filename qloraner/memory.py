"""How many padded tokens a training micro-batch may hold, and whether activations are recomputed in backward
(checkpointing): the memory this process can use over what a token costs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
# What a padded token of a micro-batch costs to train, in elements of the compute dtype, fitted to the peak resident
# memory of the default model's forward and backward on a CPU (benchmarks/RESULTS.md, table "Training memory"):
# per decoder layer, HIDDEN_SAVED tensors of the hidden size and MLP_SAVED of the MLP's width, plus LORA_SAVED per
# input and output feature of every LoRA-wrapped linear layer (its dropout's output and mask, its A product).
HIDDEN_SAVED, MLP_SAVED, LORA_SAVED = 8.3, 4.0, 1.8
ESTIMATE_MARGIN = 1.15  # the estimate errs high: under-estimating gets the process killed
CHECKPOINTED_SHARE = 0.6  # with checkpointing the peak falls (RESULTS.md, table "Training memory"): it keeps less
CPU_SHARE = 0.25  # of a CPU machine's available memory: wider micro-batches run no faster on a CPU (RESULTS.md,
# table "Training memory"), and the rest stays free for the machine
GPU_SHARE = 0.85  # of the card's free memory: the card is this process's
RESERVE = GIB // 2  # allocator slack, the LM head's logits and the loss, beside the optimizer's state
LORA_BYTES = 4  # an fp32 adapter weight (add_lora): AdamW keeps two moments of each
# With the bound left to memory, checkpointing stays off where this many rows of the longest sequence fit without
# it: the width a micro-batch needs to run at full speed. A CPU trains no faster on wider micro-batches (RESULTS.md,
# table "Training memory": 1, 4 and 8 rows of 256 tokens ran at 85, 91 and 58 tokens/s), so one row is enough and
# recomputing would only cost time. A GPU's kernels want wide ones: 4 rows of the longest sentence are already some
# thousands of tokens (the 7B recipe fills an H100 with micro-batches of 2,560); with room for fewer, checkpointing's
# 1 / CHECKPOINTED_SHARE = 1.7 times wider micro-batches are worth its recompute.
ROWS_AT_FULL_SPEED = {"cpu": 1, "cuda": 4}


@dataclass(frozen=True)
class MemoryPlan:
    """The micro-batch bound a run trains with, and where it came from (the plan line and MLflow show both)."""

    tokens: int  # most padded tokens per forward pass; 0 = no bound
    source: str  # "set" (a flag or the recipe), "--micro-batch-size set", or the budget it was computed from
    token_bytes: int = 0  # the estimated cost of one padded token (computed bounds only)
    fits_one_row: bool = True  # False: even one sequence of the longest length is estimated not to fit

    def describe(self) -> str:
        bound = f"at most {self.tokens:,} padded tokens" if self.tokens else "no token bound"
        cost = f", about {self.token_bytes / 2**20:.2f} MiB a token" if self.token_bytes else ""
        return f"micro-batches of {bound} ({self.source}{cost})"

    def warning(self, longest: int) -> str:
        """The line shown before the first step when even one sequence of the longest length may not fit."""
        need = self.token_bytes * longest / GIB
        return (
            f"qloraner: warning: one sequence of {longest} tokens needs about {need:.1f} GiB to train, more than "
            f"{self.source}; the run may be killed for memory: lower --max-length, add --gradient-checkpointing, "
            "or set --memory-gib or --micro-batch-tokens yourself"
        )


@dataclass(frozen=True)
class Checkpointing:
    """Whether a run recomputes activations in backward, and why (the plan line and MLflow show both)."""

    on: bool
    source: str  # "set" (a flag or the recipe), or the estimate against the budget that chose it

    def describe(self) -> str:
        return f"checkpointing {'on' if self.on else 'off'} ({self.source})"


def lora_features(model, targets: list[str] | str | None = None) -> int:
    """Input plus output features of every linear layer LoRA wraps: a PEFT model's (targets None), or those that
    add_lora's `targets` (module names, or all-linear: every linear layer but the LM head) will wrap in a base."""
    if targets is None:
        return sum(m.in_features + m.out_features for m in model.modules() if hasattr(m, "lora_A"))
    head = model.get_output_embeddings()
    return sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)  # bitsandbytes' Linear4bit among them
        and m is not head
        and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)
    )


def token_bytes(model, dtype: torch.dtype, checkpointing: bool, targets: list[str] | str | None = None) -> int:
    """Estimated bytes one padded token of a micro-batch needs through forward and backward (activations kept for
    backward, LoRA's dropout copies), for a LLaMA-architecture PEFT model, or for a base model once LoRA wraps
    `targets` (see lora_features)."""
    cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    per_layer = HIDDEN_SAVED * cfg.hidden_size + MLP_SAVED * cfg.intermediate_size
    elements = cfg.num_hidden_layers * per_layer + LORA_SAVED * lora_features(model, targets)
    share = CHECKPOINTED_SHARE if checkpointing else 1.0
    return math.ceil(elements * torch.finfo(dtype).bits / 8 * share * ESTIMATE_MARGIN)


def _cgroup_room() -> int | None:
    """What the process's cgroup (a container's or a SLURM job's memory limit) still allows; None without a limit."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 2**60:  # v1 writes "no limit" as a huge number
                continue
            return int(text) - int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
    return None


def available(device: torch.device) -> tuple[int, str]:
    """Bytes this process may use now, and what they were read from: the card's free memory on a GPU, or what is
    left of the process's share of the card where torch.cuda.set_per_process_memory_fraction set a smaller one; on
    a CPU the system's available memory (MemAvailable), or the cgroup's room where that is smaller."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = torch.cuda.get_per_process_memory_fraction(device)
        share = int(fraction * total) - torch.cuda.memory_reserved(device)
        where = "free on the GPU"
        if share < free:
            free, where = share, f"left of this process's {fraction:.0%} of the GPU"
        return int(free * GPU_SHARE), f"{GPU_SHARE:.0%} of {free / GIB:.1f} GiB {where}"
    room = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/meminfo") as meminfo:  # MemAvailable counts the page cache that can be dropped
        fields = dict(line.split(":", 1) for line in meminfo)
    if "MemAvailable" in fields:
        room = int(fields["MemAvailable"].split()[0]) * 1024
    where = "available"
    cgroup = _cgroup_room()
    if cgroup is not None and cgroup < room:
        room, where = cgroup, "left under the cgroup's limit"
    return int(room * CPU_SHARE), f"{CPU_SHARE:.0%} of {room / GIB:.1f} GiB {where}"


def micro_tokens(budget: int, reserve: int, per_token: int, longest: int) -> tuple[int, bool]:
    """The most padded tokens a micro-batch may hold within `budget` bytes once `reserve` is set aside, never below
    one row of the `longest` sequence (a single row always runs); and whether that row fits."""
    tokens = max(0, budget - reserve) // max(1, per_token)
    return max(tokens, longest), tokens >= longest


def budget(config, device: torch.device) -> tuple[int, str]:
    """The bytes training's micro-batches may use, and where they came from: --memory-gib, else what is available."""
    if config.memory_gib:
        return int(config.memory_gib * GIB), f"--memory-gib {config.memory_gib:g}"
    return available(device)


def checkpointing_needed(room: int, reserve: int, per_token: int, tokens: int) -> bool:
    """Whether a micro-batch of `tokens` padded tokens at `per_token` bytes (the cost without checkpointing) and the
    `reserve` overflow `room` bytes: then checkpointing is on, else off (faster)."""
    return reserve + tokens * per_token > room


def wanted_tokens(config, micro_rows: int, longest: int, device: torch.device) -> int:
    """The padded tokens of a full micro-batch as the settings want it: a set --micro-batch-tokens (at least one
    row); with no token bound, --micro-batch-size (or the step's share) rows of the longest sequence; with the bound
    left to memory, the rows of the longest sequence that run at full speed on this device (ROWS_AT_FULL_SPEED)."""
    if config.micro_batch_tokens:
        return max(config.micro_batch_tokens, longest)
    if config.micro_batch_tokens == 0 or config.micro_batch_size:
        return micro_rows * longest
    return ROWS_AT_FULL_SPEED.get(device.type, 1) * longest


def choose_checkpointing(
    config, base, device: torch.device, dtype: torch.dtype, longest: int, micro_rows: int
) -> Checkpointing:
    """--gradient-checkpointing / --no-gradient-checkpointing (or the recipe's) as set; unset, off where a full
    micro-batch (wanted_tokens) fits the budget without it after the optimizer's state and the reserve, else on.
    `base` is the model before LoRA wraps --target-modules (the choice shapes how the adapter is added)."""
    if config.gradient_checkpointing is not None:
        return Checkpointing(config.gradient_checkpointing, "set")
    room, source = budget(config, device)
    targets = config.target_module_list
    reserve = RESERVE + 2 * config.lora_r * lora_features(base, targets) * LORA_BYTES  # AdamW's two moments
    tokens = wanted_tokens(config, micro_rows, longest, device)
    per_token = token_bytes(base, dtype, False, targets)
    on = checkpointing_needed(room, reserve, per_token, tokens)
    need = (reserve + tokens * per_token) / GIB
    have = room / GIB
    verdict = (
        f"{need:.1f} GiB without it, over the {have:.1f} GiB budget" if on else f"fits {need:.1f} of {have:.1f} GiB"
    )
    return Checkpointing(on, f"auto: {verdict}: {source}")


def plan(
    config,
    model,
    device: torch.device,
    dtype: torch.dtype,
    longest: int,
    trainable_bytes: int,
    checkpointing: bool,
) -> MemoryPlan:
    """The run's micro-batch bound: --micro-batch-tokens (or the recipe's) as set; none where only
    --micro-batch-size is set; else from --memory-gib or the memory available, over token_bytes (with the run's
    resolved `checkpointing`)."""
    if config.micro_batch_tokens is not None:
        return MemoryPlan(config.micro_batch_tokens, "set")
    if config.micro_batch_size:
        return MemoryPlan(0, "--micro-batch-size set")
    budget_bytes, source = budget(config, device)
    per_token = token_bytes(model, dtype, checkpointing)
    reserve = RESERVE + 2 * trainable_bytes  # AdamW's two moments, allocated at the first update
    tokens, fits = micro_tokens(budget_bytes, reserve, per_token, longest)
    return MemoryPlan(tokens, source, per_token, fits)
