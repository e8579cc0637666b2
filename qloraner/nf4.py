"""The 4-bit base's weights: its NF4 layers, copies dequantized once, and NF4Linear, which compiled layers
dequantize themselves."""

from __future__ import annotations

import torch


def four_bit_layers(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, layer) for every bitsandbytes 4-bit linear layer of the model."""
    import bitsandbytes as bnb

    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, bnb.nn.Linear4bit)
    ]


def dequantized_bytes(model, dtype: torch.dtype) -> int:
    """Bytes that copies of the model's 4-bit weights take once dequantized to `dtype`."""
    return sum(layer.in_features * layer.out_features for _, _, layer in four_bit_layers(model)) * dtype.itemsize


def dequantize_four_bit(model, dtype: torch.dtype) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace each 4-bit linear layer by a frozen plain one holding its NF4 weight dequantized once to `dtype`;
    the replaced (parent, name, layer), to put back. LoRA layers around them stay as they are.

    bitsandbytes multiplies a batch of more than a few rows by dequantizing the whole weight to the compute dtype
    and calling a plain matmul (forward, and again for the input's gradient), so the copies give the same products
    without redoing that dequantization at every call."""
    import bitsandbytes as bnb

    swapped = four_bit_layers(model)
    for parent, name, layer in swapped:
        plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        plain.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            plain.bias = torch.nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        setattr(parent, name, plain)
    return swapped


class NF4Linear(torch.nn.Module):
    """A frozen NF4 linear layer (double-quantized scales, as load_base makes them) that dequantizes its weight with
    plain tensor operations at every call: each weight is code[its 4 bits] * its block's scale in fp32, the scale
    being code2[its byte] * its block's absmax2 + offset, rounded once to the layer's dtype (bitsandbytes' values).

    Inside a compiled layer those operations fuse into one kernel a weight that the graph launches itself, where
    bitsandbytes' own operations are opaque calls the compiled code makes through Python, hundreds a step (the 7B
    recipe's steps waited on them: benchmarks/RESULTS.md). Eager, they would build temporaries of the weight's size:
    use it only under torch.compile."""

    def __init__(self, layer) -> None:
        super().__init__()
        state = layer.weight.quant_state
        if state.quant_type != "nf4" or not state.nested:
            raise ValueError(
                f"NF4Linear takes NF4 with double quantization, not {state.quant_type} (nested: {state.nested})"
            )
        self.out_features, self.in_features = state.shape
        self.blocksize, self.blocksize2, self.dtype = state.blocksize, state.state2.blocksize, state.dtype
        quantized = dict(
            packed=layer.weight.data.view(-1),  # two 4-bit codes a byte, the first in the high bits
            scales=state.absmax,  # one byte a block of `blocksize` weights
            code=state.code,
            absmax2=state.state2.absmax,  # fp32, one a block of `blocksize2` scales
            code2=state.state2.code,
            offset=state.offset,
        )
        for name, tensor in quantized.items():
            self.register_buffer(name, tensor, persistent=False)
        self.bias = layer.bias

    def weight(self) -> torch.Tensor:
        i = torch.arange(self.out_features * self.in_features, device=self.packed.device)
        byte = self.packed[i // 2].long()
        bits = torch.where(i % 2 == 0, byte >> 4, byte & 15)
        block = i // self.blocksize
        scale = self.code2[self.scales[block].long()] * self.absmax2[block // self.blocksize2] + self.offset
        return (self.code[bits] * scale).to(self.dtype).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight().to(x.dtype), self.bias)


def dequantize_in_graph(model) -> None:
    """Replace each 4-bit linear layer by an NF4Linear holding the same quantized tensors (no copy). A layer whose
    rows are not whole blocks of 64 weights (no LLaMA shape) stays with bitsandbytes, whose kernels differ there."""
    for parent, name, layer in four_bit_layers(model):
        if layer.in_features % layer.weight.quant_state.blocksize == 0:
            setattr(parent, name, NF4Linear(layer))
