"""How many padded tokens a training micro-batch may hold: the memory this process can use over what a token costs."""

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


def token_bytes(model, dtype: torch.dtype, checkpointing: bool) -> int:
    """Estimated bytes one padded token of a micro-batch needs through forward and backward (activations kept for
    backward, LoRA's dropout copies), for a LLaMA-architecture PEFT model."""
    cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    per_layer = HIDDEN_SAVED * cfg.hidden_size + MLP_SAVED * cfg.intermediate_size
    lora = sum(m.in_features + m.out_features for m in model.modules() if hasattr(m, "lora_A"))
    elements = cfg.num_hidden_layers * per_layer + LORA_SAVED * lora
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
    """Bytes this process may use now, and what they were read from: the card's free memory on a GPU; on a CPU the
    system's available memory (MemAvailable), or the cgroup's room where that is smaller."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_SHARE), f"{GPU_SHARE:.0%} of {free / GIB:.1f} GiB free on the GPU"
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


def plan(config, model, device: torch.device, dtype: torch.dtype, longest: int, trainable_bytes: int) -> MemoryPlan:
    """The run's micro-batch bound: --micro-batch-tokens (or the recipe's) as set; none where only
    --micro-batch-size is set; else from --memory-gib or the memory available, over token_bytes."""
    if config.micro_batch_tokens is not None:
        return MemoryPlan(config.micro_batch_tokens, "set")
    if config.micro_batch_size:
        return MemoryPlan(0, "--micro-batch-size set")
    if config.memory_gib:
        budget, source = int(config.memory_gib * GIB), f"--memory-gib {config.memory_gib:g}"
    else:
        budget, source = available(device)
    per_token = token_bytes(model, dtype, config.gradient_checkpointing)
    reserve = RESERVE + 2 * trainable_bytes  # AdamW's two moments, allocated at the first update
    tokens, fits = micro_tokens(budget, reserve, per_token, longest)
    return MemoryPlan(tokens, source, per_token, fits)
