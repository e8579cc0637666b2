"""The decode step's attention as one Triton kernel (imported only where Triton is installed).

In PyTorch that attention is some forty kernels a layer (products, masks, the softmax, the shared prefix's part,
casts), and it reads every row's cache up to a width shared by the batch. Here one program per (row, key head) runs
over the shared prefix and then the row's own keys up to its own length, with an online softmax (FlashAttention's
running max and sum): one launch a layer, and a row whose answer is short reads only its own positions. The lengths
are read on the device, so the step stays capturable as one CUDA graph whatever they are.

Under TRITON_INTERPRET=1 (set by the tests) the kernel runs on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# keys per iteration, warps and pipeline stages a program: the fastest of a sweep on an H200 at the 7B and SmolLM2
# shapes (RESULTS.md); one warp a (row, key head) leaves the most programs in flight
BLOCK, WARPS, STAGES = 32, 1, 3


@triton.jit
def _keys(qt, k, v, pos, limit, top, total, acc, scale, D: tl.constexpr):
    """Fold the keys and values at positions `pos` (< limit; D contiguous values a position) into the running max
    `top`, sum `total` and weighted values `acc` of the query heads `qt`."""
    live = pos < limit
    d = tl.arange(0, D)
    kt = tl.load(k + pos[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    scores = tl.where(live[None, :], tl.dot(qt, tl.trans(kt)) * scale, float("-inf"))
    new_top = tl.maximum(top, tl.max(scores, 1))
    weights = tl.exp(scores - new_top[:, None])
    fade = tl.exp(top - new_top)  # what the old max's terms are worth under the new one
    vt = tl.load(v + pos[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    return new_top, total * fade + tl.sum(weights, 1), acc * fade[:, None] + tl.dot(weights.to(vt.dtype), vt)


@triton.jit
def _decode_attention_kernel(
    q, k, v, pk, pv, n_own, out, scale, shared, q_row, q_head, k_row, k_head, p_head, o_row, o_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row, head = tl.program_id(0), tl.program_id(1)
    g, d, j = tl.arange(0, GROUP_PAD), tl.arange(0, D), tl.arange(0, BLOCK)
    heads = head * GROUP + g  # the query heads that share this key head (padded: a product needs 16 rows)
    real = (g < GROUP)[:, None]
    qt = tl.load(q + row * q_row + heads[:, None] * q_head + d[None, :], mask=real, other=0.0)
    top = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for start in range(0, shared, BLOCK):  # the prefix every row shares
        top, total, acc = _keys(
            qt, pk + head * p_head, pv + head * p_head, start + j, shared, top, total, acc, scale, D
        )
    n = tl.load(n_own + row)
    mine = row * k_row + head * k_head
    for start in range(0, n, BLOCK):  # the row's own positions, as far as it has come
        top, total, acc = _keys(qt, k + mine, v + mine, start + j, n, top, total, acc, scale, D)
    result = (acc / total[:, None]).to(out.dtype.element_ty)
    tl.store(out + row * o_row + heads[:, None] * o_head + d[None, :], result, mask=real)


def decode_attention(q, k, v, n_own, scale: float, prefix) -> torch.Tensor:
    """One query per row: q [B, H, 1, D] over the shared prefix keys and values [KV, P, D] and the row's own
    positions [0, n_own) of k, v [B, KV, L, D] (contiguous) → [B, 1, H·D]: what llama.attention computes over the
    prefix and the first n_own positions."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    pk, pv = prefix
    out = torch.empty((b, h, d), dtype=v.dtype, device=v.device)
    group = h // kv
    _decode_attention_kernel[(b, kv)](
        q, k, v, pk, pv, n_own, out, scale, pk.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), pk.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, BLOCK=BLOCK,
        num_warps=WARPS, num_stages=STAGES,
    )  # fmt: skip
    return out.view(b, 1, h * d)
