"""The LLaMA inference forward the decoding engine uses (qloraner/decode.py), over keys and values the engine keeps.

It runs the model's own modules (LoRA layers included, NF4 or merged) in the LLaMA layout: embed, per layer
RMSNorm → q/k/v → RoPE → attention → o → RMSNorm → MLP, norm, LM head. The attention here is PyTorch's form; the
decode step's fused one is the Triton kernel of qloraner/kernels.py, launched through `fused_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qloraner import QloranerError, first_line
from qloraner.model import require_llama_layout


class Llama:
    """The modules of a LLaMA-architecture causal LM (under PEFT or merged), run over keys and values that the
    caller keeps: `hidden(ids, positions, attend)` calls `attend(layer, q, k, v, scale)` for each layer."""

    def __init__(self, model):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        require_llama_layout(model, "decoding")  # load_base already refused others: a safeguard
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        core = lm.model
        self.core, self.head, self.rope = core, lm.get_output_embeddings(), apply_rotary_pos_emb
        attn = core.layers[0].self_attn
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.head_dim = attn.head_dim
        self.layers = len(core.layers)
        self.vocab = self.head.out_features
        self.device, self.dtype = core.embed_tokens.weight.device, core.embed_tokens.weight.dtype

    def hidden(self, ids, positions, attend):
        """The final norm's output [B, S, hidden] for token ids [B, S] at RoPE positions [B, S]; each layer's
        attention is `attend(layer, q, k, v, scale)`, which also keeps that layer's keys and values."""
        h = self.core.embed_tokens(ids)
        cos, sin = self.core.rotary_emb(h, positions)
        for i, layer in enumerate(self.core.layers):
            a = layer.self_attn
            x = _rms_norm(layer.input_layernorm, h)
            shape = (*x.shape[:-1], -1, a.head_dim)
            q, k = self.rope(a.q_proj(x).view(shape).transpose(1, 2), a.k_proj(x).view(shape).transpose(1, 2), cos, sin)
            h = h + a.o_proj(attend(i, q, k, a.v_proj(x).view(shape).transpose(1, 2), a.scaling))
            h = h + layer.mlp(_rms_norm(layer.post_attention_layernorm, h))
        return _rms_norm(self.core.norm, h)

    def next_token(self, h):
        """The greedy choice: the LM head's highest-scoring token id for each hidden state."""
        return self.head(h).argmax(-1)


def _rms_norm(norm, x):
    """LLaMA's RMSNorm module `norm` applied to x as it computes it (in float, then the weight in x's dtype), through
    PyTorch's fused kernel: one kernel where the module's own forward launches eight."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype) * norm.weight


def attention(q, k, v, mask, scale: float, prefix=None):
    """q [B, H, S, D]; k, v [B, KV, L, D]; mask [B, S, L] (True: attend); prefix: keys and values [KV, P, D] that
    every query sees before its own (the shared instruction) → [B, S, H·D].

    The query heads of a group share one key head (grouped-query attention): folding them into the query rows
    lets one matmul serve them without copying the keys per head."""
    b, h, s, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv * s, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    scores = scores.view(b, kv, h // kv, s, -1).masked_fill(~mask[:, None, None], float("-inf"))
    scores = scores.view(b, kv, h // kv * s, -1)
    p = 0 if prefix is None else prefix[0].shape[1]
    if p:
        scores = torch.cat([_shared_scores(qg, prefix[0], scale), scores], -1)  # one softmax over both
    probs = scores.softmax(-1)
    out = torch.matmul(probs[..., p:].to(v.dtype), v).float()
    if p:
        out = out + _shared_values(probs[..., :p], prefix[1])
    return out.to(v.dtype).view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)


def _shared_scores(qg, pk, scale: float):
    """Queries qg [B, KV, N, D] against keys pk [KV, P, D] that every row shares: one product per key head over all
    rows' queries, reading the shared keys once rather than once per row → [B, KV, N, P] (float)."""
    b, kv, n, d = qg.shape
    flat = qg.transpose(0, 1).reshape(kv, b * n, d)
    return (flat @ pk.transpose(-1, -2)).float().view(kv, b, n, -1).transpose(0, 1) * scale


def _shared_values(probs, pv):
    """Weights probs [B, KV, N, P] over values pv [KV, P, D] that every row shares → [B, KV, N, D] (float)."""
    b, kv, n, p = probs.shape
    flat = probs.to(pv.dtype).transpose(0, 1).reshape(kv, b * n, p)
    return (flat @ pv).float().view(kv, b, n, -1).transpose(0, 1)


def prefix_cache(net: Llama, prefix: list[int]) -> tuple[list, list]:
    """Keys and values of the shared prefix, [kv, P, head_dim] per layer."""
    ks, vs = [], []
    ids = torch.tensor([prefix], device=net.device)
    mask = torch.ones((1, len(prefix), len(prefix)), dtype=torch.bool, device=net.device).tril()

    def attend(i, q, k, v, scale):
        ks.append(k[0].contiguous())
        vs.append(v[0].contiguous())
        return attention(q, k, v, mask, scale)

    if prefix:
        net.hidden(ids, torch.arange(len(prefix), device=net.device)[None], attend)
    else:
        empty = torch.zeros((net.kv_heads, 0, net.head_dim), dtype=net.dtype, device=net.device)
        ks, vs = [empty] * net.layers, [empty] * net.layers
    return ks, vs


def head_unfit(net: Llama) -> str | None:
    """Why the Triton kernel can't take this model's heads (its head size must be a power of two from 16), or None."""
    d = net.head_dim
    return f"the kernel takes head sizes that are powers of two from 16, not {d}" if d < 16 or d & (d - 1) else None


def fused_attention(net: Llama):
    """The Triton kernel's launcher (qloraner.kernels)."""
    if why := head_unfit(net):
        raise QloranerError(f"the decode step's fused attention: {why}")
    try:
        from qloraner.kernels import decode_attention
    except ImportError as err:
        raise QloranerError(f"the decode step's fused attention needs Triton ({first_line(err)})") from err
    return decode_attention
