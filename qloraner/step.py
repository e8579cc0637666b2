"""One micro-batch's forward and backward: the batch on the device (collate), the loss (SupervisedLoss), the backward
(forward_backward), eager or replayed as a CUDA graph (MicroStepGraphs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qloraner import QloranerError
from qloraner.data import IGNORE_INDEX, Encoded

PAD_MULTIPLE = 8  # compiled layers: Inductor guards on the length's alignment to 8 (aligned and not: two graphs)
# With CUDA graphs, one graph a batch shape: widths a multiple of 32 and supervised rows of 256 give the default
# recipe 39 shapes over its 3 epochs (12 % padded tokens) where multiples of 8 and 1 give 1,306 (5 %).
GRAPH_PADDING = (32, 256)


def collate(
    examples: list[Encoded], pad_id: int, device: torch.device, multiple: int = 0, rows_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad with EOS; pads are masked out of attention. The supervised positions come as flat indices into
    the batch's hidden states (row * width + t predicts label t + 1) with their targets, found here on the host:
    selecting them on the GPU would wait for it.

    `multiple` 0 pads to the longest row. Otherwise the width is a multiple of it (Inductor guards on the length's
    alignment) with at least one pad column: transformers dropped the mask of a batch without padding (a second
    graph) before causal_mask built it here, and the measured runs kept the column. `rows_multiple` pads the
    supervised positions with position 0 and an ignored target, for a CUDA graph's fixed shapes.
    """
    width = max(len(e.input_ids) for e in examples)
    if multiple:
        width = math.ceil((width + 1) / multiple) * multiple
    # pinned on GPUs: the copy then does not wait for the GPU to finish the previous step
    pinned = device.type == "cuda"
    host = torch.empty((2, len(examples), width), dtype=torch.long, pin_memory=pinned)
    ids, mask = host
    ids.fill_(pad_id), mask.zero_()
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    keep = labels[:, 1:] != IGNORE_INDEX
    rows, t = keep.nonzero(as_tuple=True)
    n = math.ceil(len(rows) / rows_multiple) * rows_multiple
    supervised = torch.zeros((2, n), dtype=torch.long, pin_memory=pinned)
    supervised[1].fill_(IGNORE_INDEX)
    supervised[0, : len(rows)] = rows * width + t
    supervised[1, : len(rows)] = labels[rows, t + 1]
    ids, mask = host.to(device, non_blocking=True)
    positions, targets = supervised.to(device, non_blocking=True)
    return {"input_ids": ids, "attention_mask": mask, "positions": positions, "targets": targets}


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The 4-D mask transformers builds from a padding mask ([rows, 1, query, key]: True where a query attends to
    a key at or before it that is no pad), built without the check on the host that transformers makes first
    (a wait for the GPU, and no CUDA graph can hold one)."""
    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    return causal & attention_mask.bool()[:, None, None, :]


class SupervisedLoss(torch.nn.Module):
    """The PEFT model with the training loss as its forward."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Summed next-token loss, running the LM head only at the supervised positions (collate's)."""
        inner = self.model.get_base_model()  # LlamaForCausalLM with the LoRA layers injected
        mask = causal_mask(attention_mask)
        hidden = inner.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = inner.lm_head(hidden.flatten(0, 1).index_select(0, positions)).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def forward_backward(net: SupervisedLoss, batch: dict[str, torch.Tensor], scale) -> torch.Tensor:
    """One micro-batch: its summed loss (detached), whose gradient times `scale` (a number or a 0-d tensor) is added
    to the LoRA gradients."""
    device = batch["input_ids"].device.type
    # no autocast cache: a CUDA graph must not hold casts made before its capture
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda", cache_enabled=False):
        loss = net(**batch)
    (loss * scale).backward()
    # detached: a loss that kept its autograd graph would keep the LoRA weights' gradient accumulators alive on the
    # stream that made them, and the next capture (on its own stream) would fail
    return loss.detach()


class MicroStepGraphs:
    """forward_backward as one CUDA graph a batch shape, captured at the shape's first micro-batch and replayed for
    every later one: a step's thousands of kernel launches become one, where the default recipe's steps waited on
    the host (benchmarks/RESULTS.md). collate's GRAPH_PADDING keeps the shapes to a few dozen a run; the graphs
    share one memory pool. The first micro-batch of the run runs eagerly: it compiles the layers and sets up their
    kernels, which must not happen inside a capture. A graph's loss tensor holds its value until the next replay."""

    def __init__(self, net: SupervisedLoss, device: torch.device) -> None:
        self.net, self.graphs, self.pool, self.warm = net, {}, None, False
        self.stream = torch.cuda.Stream(device)
        self.scale = torch.zeros((), device=device)

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        if not self.warm:
            self.warm = True
            return forward_backward(self.net, batch, scale)
        key = tuple(t.shape for t in batch.values())
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch)
        inputs, loss, graph = self.graphs[key]
        for name, t in batch.items():
            inputs[name].copy_(t)
        self.scale.fill_(scale)
        graph.replay()
        return loss

    def _capture(self, batch: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor, torch.cuda.CUDAGraph]:
        inputs = {name: t.clone() for name, t in batch.items()}
        graph = torch.cuda.CUDAGraph()
        # on a side stream, as torch.cuda.graph does, without its garbage collection and cache emptying at each capture
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool)
                try:
                    loss = forward_backward(self.net, inputs, self.scale)
                finally:
                    graph.capture_end()
        except RuntimeError as err:  # an operation no graph can hold (a wait for the GPU, the RNG's state)
            why = str(err).splitlines()[0]
            raise QloranerError(f"--cuda-graphs: capturing a micro-step failed ({why}); try --no-cuda-graphs") from err
        torch.cuda.current_stream().wait_stream(self.stream)
        self.pool = self.pool or graph.pool()
        return inputs, loss, graph
