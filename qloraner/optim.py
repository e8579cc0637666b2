"""The optimizer's side of a step: the LoRA matrices as views into one flat parameter, and bitsandbytes' paged AdamW
update without its waits for the device (its internals as of bitsandbytes 0.50.2, the version setup.cfg pins)."""

from __future__ import annotations

import math

import torch

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
