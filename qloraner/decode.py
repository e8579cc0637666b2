"""The generation engine: greedy decoding of many prompts over a static KV cache.

- The prompts' common prefix (the instruction) is computed once and kept once: a row's cache holds only its own
  tokens, and attention reads the shared keys with one matrix product per key head for all rows (the instruction is
  most of a prompt, so most of the keys a decode step would read per row).
- Continuous batching: a pool of rows; a row that stops frees its slot, and waiting prompts are prefilled into the
  free slots; with none waiting, the live rows move to a smaller pool, so a long answer does not keep a big batch
  busy.
- The decode step reads and writes only device tensors (next position, last token), so on a GPU it is captured once
  as a CUDA graph per pool and replayed. There its attention is one Triton kernel a layer (qloraner/kernels.py) that
  reads each row's own positions only as far as the row has come; the PyTorch form (a CPU, or no Triton) reads every
  row up to the width the longest needs, one CUDA graph per width.
- The stop rule runs on the host every SYNC_EVERY steps, and only on rows that wrote an EOS or a newline: EOS, or
  a blank line after text that the caller's `ends_answer` accepts (the engine knows no answer format).
- On a GPU the 4-bit weights are dequantized once for the run when the copies fit (bitsandbytes dequantizes the
  whole weight at every call for all but tiny batches).

It runs the model's own modules (LoRA layers included, NF4 or merged) in the LLaMA layout: embed, per layer
RMSNorm → q/k/v → RoPE → attention → o → RMSNorm → MLP, norm, LM head.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from qloraner import QloranerError, first_line
from qloraner.compiler import compile_unavailable
from qloraner.model import require_llama_layout
from qloraner.nf4 import dequantize_four_bit, dequantized_bytes

STOP_TEXT = "\n\n"  # our responses hold no blank line: one after the answer ends it (when ends_answer agrees)
_TAIL = 4  # tokens decoded to look for STOP_TEXT; it never spans more
CPU_BATCH = 64  # `auto` on a CPU: batching past this gains nothing there
MAX_AUTO_BATCH = 1024  # `auto` on a GPU: larger batches decoded the test split no faster (RESULTS.md)
KV_MEMORY_SHARE = 0.65  # of the free accelerator memory, what `auto` gives the KV cache; the rest: activations
SYNC_EVERY = 8  # decode steps between host checks; a stopped row runs at most this many steps more (discarded)
REFILL_SHARE = 0.25  # free share of the pool's slots at which waiting prompts are prefilled into them
SHRINK_SHARE = 0.25  # with no prompt waiting, the live share of the slots under which rows move to a smaller pool
KEY_BLOCK = 64  # PyTorch attention reads the cache up to a multiple of this: few widths, so few CUDA graphs
PREFILL_TOKENS = 1 << 16  # prompt tokens per prefill pass: bounds its activations
DEQUANT_SHARE = 0.25  # of the free accelerator memory, what dequantized copies of the 4-bit weights may take
PREFILL_SHARE = 0.75  # a prefill pass takes rows down to this share of its longest: padding stays under a third


@dataclass
class Generation:
    tokens: list[list[int]]  # per prompt, in input order, without the stopping EOS
    forward_passes: int
    stats: dict = field(default_factory=dict)  # prefills, pools and CUDA graphs the engine used
    cut: list[bool] = field(default_factory=list)  # per prompt: its budget ran out before it stopped


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """Bytes the KV cache holds per token of one row: keys and values of every layer."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return 2 * model_config.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8


def auto_batch_size(model, row_tokens: int) -> int:
    """Rows per decoding batch: what fits KV_MEMORY_SHARE of the free accelerator memory when each row holds
    `row_tokens` tokens, at most MAX_AUTO_BATCH; CPU_BATCH on a CPU."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(param.device)
    dtype = getattr(model.config, "dtype", None) or torch.bfloat16
    per_row = kv_bytes_per_token(model.config, dtype if isinstance(dtype, torch.dtype) else torch.bfloat16) * row_tokens
    return max(1, min(MAX_AUTO_BATCH, int(free * KV_MEMORY_SHARE // per_row)))


def newline_table(tokenizer, vocab: int) -> list[bool]:
    """Per token id: its text holds a newline (ids past the tokenizer's, padding of the embedding, hold none)."""
    n = min(vocab, len(tokenizer))
    return ["\n" in t for t in tokenizer.batch_decode([[i] for i in range(n)])] + [False] * (vocab - n)


def _stopped(
    tokenizer, row: list[int], eos: int, newline: list[bool], ends_answer: Callable[[str], bool] | None
) -> bool:
    """EOS, or a blank line just written after text that `ends_answer` takes for a whole answer (not a preamble
    like 'The entities are:'); without `ends_answer`, EOS only."""
    if row[-1] == eos:
        return True
    if ends_answer is None or not newline[row[-1]] or STOP_TEXT not in tokenizer.decode(row[-_TAIL:]):
        return False
    return ends_answer(tokenizer.decode(row))


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


def _attention(q, k, v, mask, scale: float, prefix=None):
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


def _head_unfit(net: _Llama) -> str | None:
    """Why the Triton kernel can't take this model's heads (its head size must be a power of two from 16), or None."""
    d = net.head_dim
    return f"the kernel takes head sizes that are powers of two from 16, not {d}" if d < 16 or d & (d - 1) else None


def _fused_attention(net: _Llama):
    """The Triton kernel's launcher (qloraner.kernels)."""
    if why := _head_unfit(net):
        raise QloranerError(f"the decode step's fused attention: {why}")
    try:
        from qloraner.kernels import decode_attention
    except ImportError as err:
        raise QloranerError(f"the decode step's fused attention needs Triton ({first_line(err)})") from err
    return decode_attention


@contextmanager
def _dequantized(model, dtype: torch.dtype):
    """Each 4-bit linear layer replaced, while decoding, by a plain one holding its weight dequantized once.
    For batches past a few rows bitsandbytes dequantizes the whole weight at every call and multiplies in the
    compute dtype (its fused kernel serves only small batches), so this computes the same products without
    redoing that at every step. A LoRA adapter stays unmerged on top; the 4-bit layers are back on exit."""
    swapped = dequantize_four_bit(model, dtype)
    try:
        yield
    finally:
        for parent, name, layer in swapped:
            setattr(parent, name, layer)


def _rms_norm(norm, x):
    """LLaMA's RMSNorm module `norm` applied to x as it computes it (in float, then the weight in x's dtype), through
    PyTorch's fused kernel: one kernel where the module's own forward launches eight."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype) * norm.weight


class _Llama:
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
        return self.head(h).argmax(-1)


class _Pool:
    """`rows` decoding slots of `length` cache positions, all state on the device: keys and values per layer, each
    row's next position (= its last token's cache position), its last token and the tokens it generated; and the
    `prefix` keys and values [KV, P, D] per layer that every row shares. A slot's layout: its prompt after the shared
    prefix at 0..len-1, then its answer; cache position c is token P + c, and a row attends to 0..its next position.
    `fused`: the Triton attention's launcher (qloraner.kernels), or None for PyTorch's."""

    def __init__(self, net: _Llama, rows: int, length: int, out_len: int, prefix: tuple[list, list], fused=None):
        dev = net.device
        self.prefix, self.offset, self.fused = prefix, prefix[0][0].shape[1], fused
        shape = (rows, net.kv_heads, length, net.head_dim)
        self.k = [torch.zeros(shape, dtype=net.dtype, device=dev) for _ in range(net.layers)]
        self.v = [torch.zeros(shape, dtype=net.dtype, device=dev) for _ in range(net.layers)]
        self.cur = torch.zeros(rows, dtype=torch.long, device=dev)
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.out = torch.zeros((rows, out_len), dtype=torch.long, device=dev)
        self.n = torch.zeros(rows, dtype=torch.long, device=dev)  # tokens generated, the first from the prefill
        self.slots = torch.arange(rows, device=dev)
        # where each row's key head starts in the flattened cache: a decode step writes one position per (row, head)
        self.heads_at = (self.slots[:, None] * net.kv_heads + torch.arange(net.kv_heads, device=dev)) * length
        self.rows, self.length, self.out_len = rows, length, out_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.memory = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None

    def moved(self, net: _Llama, keep: list[int], rows: int) -> _Pool:
        """A pool of `rows` slots holding the rows `keep` of this one, in that order."""
        new = _Pool(net, rows, self.length, self.out_len, self.prefix, self.fused)
        idx = torch.tensor(keep, device=self.slots.device)
        for mine, theirs in zip(self._state(), new._state()):
            theirs[: len(keep)] = mine.index_select(0, idx)
        return new

    def _state(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.cur, self.tok, self.out, self.n]

    def _step(self, net: _Llama, width: int) -> None:
        """One token for every row; PyTorch's attention reads the first `width` positions of every row (the fused
        kernel reads each row's own). Device tensors only, so a CUDA graph can capture it."""
        cur = self.cur.clamp(max=self.length - 1)  # a stopped row idles until refilled: keep its writes in bounds
        at = (self.heads_at + cur[:, None]).flatten()
        seen = cur + 1  # own positions a row attends to: 0..cur, once a step rather than once a layer
        mine = None if self.fused else torch.arange(width, device=cur.device) < seen[:, None, None]  # [B, 1, width]

        def attend(i, q, k, v, scale):
            d = k.shape[-1]
            self.k[i].view(-1, d).index_copy_(0, at, k.reshape(-1, d))  # each row's keys at its own position
            self.v[i].view(-1, d).index_copy_(0, at, v.reshape(-1, d))
            shared = (self.prefix[0][i], self.prefix[1][i])
            if self.fused:
                return self.fused(q, self.k[i], self.v[i], seen, scale, shared)
            return _attention(q, self.k[i][:, :, :width], self.v[i][:, :, :width], mine, scale, shared)

        nxt = net.next_token(net.hidden(self.tok[:, None], self.offset + cur[:, None], attend)[:, -1])
        self.out.index_put_((self.slots, self.n.clamp(max=self.out_len - 1)), nxt)
        self.tok.copy_(nxt)
        self.cur.add_(1)
        self.n.add_(1)

    def decode(self, net: _Llama, steps: int, width: int, graphs: bool) -> int:
        """`steps` decode steps; on a GPU through the CUDA graph of this width, captured on first use
        after one eager step (the warm-up torch.cuda.graph asks for). Returns 1 if it captured a graph, -1 if
        capturing failed (the steps then ran eagerly; the caller stops asking for graphs), else 0."""
        if graphs and width not in self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(net, width)  # a real step, and the warm-up
            torch.cuda.current_stream().wait_stream(side)
            steps -= 1
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.memory):
                    self._step(net, width)  # recorded, not run
            except RuntimeError as err:
                print(f"qloraner: CUDA graph capture failed, decoding eagerly ({first_line(err)})", flush=True)
                self.decode(net, steps, width, graphs=False)
                return -1
            self.graphs[width] = graph
            self.decode(net, steps, width, graphs)
            return 1
        for _ in range(steps):
            self.graphs[width].replay() if graphs else self._step(net, width)
        return 0


def _prefix_cache(net: _Llama, prefix: list[int]) -> tuple[list, list]:
    """Keys and values of the shared prefix, [kv, P, head_dim] per layer."""
    ks, vs = [], []
    ids = torch.tensor([prefix], device=net.device)
    mask = torch.ones((1, len(prefix), len(prefix)), dtype=torch.bool, device=net.device).tril()

    def attend(i, q, k, v, scale):
        ks.append(k[0].contiguous())
        vs.append(v[0].contiguous())
        return _attention(q, k, v, mask, scale)

    if prefix:
        net.hidden(ids, torch.arange(len(prefix), device=net.device)[None], attend)
    else:
        empty = torch.zeros((net.kv_heads, 0, net.head_dim), dtype=net.dtype, device=net.device)
        ks, vs = [empty] * net.layers, [empty] * net.layers
    return ks, vs


def _prefill(net: _Llama, pool: _Pool, slots: list[int], suffixes: list[list[int]]) -> None:
    """Write the prompts (the pool's shared prefix + `suffixes`) into `slots`: keys, values and next positions; and
    each row's first generated token. Suffixes are right-padded: every row's own tokens start at cache position 0."""
    pk, pv = pool.prefix
    p, dev = pool.offset, net.device
    r, s = len(suffixes), max(len(x) for x in suffixes)
    ids = torch.zeros((r, s), dtype=torch.long)
    for row, x in enumerate(suffixes):
        ids[row, : len(x)] = torch.tensor(x)
    ids, lens = ids.to(dev), torch.tensor([len(x) for x in suffixes], device=dev)
    at = torch.arange(s, device=dev)
    real = at[None] < lens[:, None]  # [r, s]
    # a suffix token sees the prefix, and the real suffix tokens up to itself; a padding one sees itself (no NaN)
    sees = (at[None, :, None] >= at[None, None, :]) & real[:, None, :] | torch.eye(s, dtype=torch.bool, device=dev)
    idx = torch.tensor(slots, device=dev)

    def attend(i, q, k, v, scale):
        pool.k[i][idx, :, :s] = k
        pool.v[i][idx, :, :s] = v
        return _attention(q, k, v, sees, scale, (pk[i], pv[i]))

    h = net.hidden(ids, p + at[None].expand(r, -1), attend)
    first = net.next_token(h[torch.arange(r, device=dev), lens - 1])
    pool.cur[idx] = lens
    pool.tok[idx] = first
    pool.out[idx, 0] = first
    pool.n[idx] = 1


class _Clock:
    """Wall seconds per phase, into stats; a lap waits for the device first, so each phase gets its own time."""

    def __init__(self, device: torch.device):
        self.device, self.last = device, time.perf_counter()

    def lap(self, stats: dict, key: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        stats[key] = round(stats.get(key, 0.0) + now - self.last, 3)
        self.last = now


def _prefill_passes(lengths: list[int]) -> list[int]:
    """Rows per prefill pass over suffixes sorted longest first: a pass pads its rows to its first (longest), so
    it takes rows down to PREFILL_SHARE of that length, and at most PREFILL_TOKENS padded tokens."""
    passes, start = [], 0
    for i, n in enumerate(lengths):
        if i > start and (n < PREFILL_SHARE * lengths[start] or (i - start + 1) * lengths[start] > PREFILL_TOKENS):
            passes.append(i - start)
            start = i
    return passes + [len(lengths) - start]


def _common_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (its last logits come from it)."""
    first, shortest = prompts[0], min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: list[list[int]],
    budgets: list[int],
    batch_size: int,
    progress=None,
    graphs: bool = True,
    stop: bool = True,
    dequantize: bool | None = None,
    fused: bool | None = None,
    ends_answer: Callable[[str], bool] | None = None,
) -> Generation:
    """Greedy decoding of `prompts` with at most `batch_size` rows at a time; row i stops at EOS, at a blank line
    after text that `ends_answer` accepts (the caller's answer format: evaluate passes parse.ends_answer), or after
    budgets[i] tokens, and what it generated after that is dropped.

    graphs: capture the decode step as CUDA graphs (on a GPU). stop=False decodes exactly budgets[i] tokens.
    dequantize: decode with the 4-bit weights dequantized once (see _dequantized); default: on a GPU when the
    copies fit DEQUANT_SHARE of its free memory.
    fused: the decode step's attention as one Triton kernel (qloraner.kernels); default: where Triton can build it (a
    CUDA GPU with Triton and a C compiler). On a CPU it runs only under TRITON_INTERPRET=1 (the tests).
    """
    if not prompts:
        return Generation([], 0)
    net = _Llama(model)
    size = dequantized_bytes(model, net.dtype)
    if dequantize is None:
        dequantize = net.device.type == "cuda" and size <= DEQUANT_SHARE * torch.cuda.mem_get_info(net.device)[0]
    if fused is None:
        why = compile_unavailable(net.device) or _head_unfit(net)
        fused = why is None
        if why and net.device.type == "cuda":
            print(f"qloraner: the decode step's attention runs in PyTorch: {why}", flush=True)
    launcher = _fused_attention(net) if fused else None
    with _dequantized(model, net.dtype) if dequantize and size else nullcontext():
        gen = _generate(net, tokenizer, prompts, budgets, batch_size, progress, graphs, stop, launcher, ends_answer)
    gen.stats["dequantized_bytes"] = size if dequantize else 0
    return gen


def _generate(
    net: _Llama, tokenizer, prompts, budgets, batch_size, progress, graphs, stop, fused, ends_answer
) -> Generation:
    """generate_greedy's loop: prefill into free slots, decode SYNC_EVERY steps, apply the stop rule, repeat."""
    graphs = graphs and net.device.type == "cuda"
    eos = tokenizer.eos_token_id if stop else -1
    newline = newline_table(tokenizer, net.vocab) if stop else [False] * net.vocab
    is_event = np.array(newline)
    p = _common_prefix(prompts)
    waiting = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory peaks early
    own = [len(x) - p for x in prompts]  # a row's own prompt tokens, after the shared prefix
    length = _round_up(max(n + b for n, b in zip(own, budgets)) + SYNC_EVERY, KEY_BLOCK)  # and its answer
    prefix = _prefix_cache(net, prompts[0][:p])
    pool = _Pool(net, min(batch_size, len(prompts)), length, max(budgets) + 1, prefix, fused)
    live: dict[int, int] = {}  # slot -> prompt index
    made = [0] * pool.rows  # per slot: tokens generated so far (host mirror of pool.n)
    checked = [0] * pool.rows  # per slot: tokens the stop rule has seen
    out: list[list[int]] = [[] for _ in prompts]
    cut = [False] * len(prompts)
    stats = {
        "prefill_passes": 1 if p else 0,
        "decode_steps": 0,
        "pools": 1,
        "cuda_graphs": 0,
        "shared_prefix": p,
        "rows": pool.rows,
        "length": pool.length,
        "row_steps": 0,
        "live_row_steps": 0,
        "attention": "triton" if fused else "pytorch",
    }
    clock = _Clock(net.device)
    while waiting or live:
        free = [slot for slot in range(pool.rows) if slot not in live]
        if waiting and (not live or len(free) >= REFILL_SHARE * pool.rows):
            take, waiting = waiting[: len(free)], waiting[len(free) :]
            at = 0
            for part in _prefill_passes([own[i] for i in take]):
                _prefill(net, pool, free[at : at + part], [prompts[i][p:] for i in take[at : at + part]])
                stats["prefill_passes"] += 1
                at += part
            clock.lap(stats, "prefill_s")
            for slot, i in zip(free, take):
                live[slot], made[slot], checked[slot] = i, 1, 0
        elif not waiting and len(live) <= SHRINK_SHARE * pool.rows and pool.rows > 1:
            keep = sorted(live)
            pool = pool.moved(net, keep, 1 << (len(keep) - 1).bit_length())
            live = {new: live[old] for new, old in enumerate(keep)}
            made = [made[old] for old in keep] + [0] * (pool.rows - len(keep))
            checked = [checked[old] for old in keep] + [0] * (pool.rows - len(keep))
            stats["pools"] += 1
            clock.lap(stats, "move_s")
        width = 0  # the kernel needs none: one CUDA graph a pool
        if not fused:  # PyTorch's attention reads every row as far as the furthest live one gets in these steps
            reach = max(own[i] + made[slot] + SYNC_EVERY for slot, i in live.items())
            width = min(_round_up(reach, KEY_BLOCK), pool.length)
        captured = pool.decode(net, SYNC_EVERY, width, graphs)
        graphs = graphs and captured >= 0
        stats["cuda_graphs"] += max(captured, 0)
        stats["decode_steps"] += SYNC_EVERY
        stats["row_steps"] += SYNC_EVERY * pool.rows  # rows decoded, live or not
        stats["live_row_steps"] += SYNC_EVERY * len(live)
        for slot in live:
            made[slot] += SYNC_EVERY
        # the stop rule, on the host: Python only where a row wrote an EOS or a newline, or reached its budget
        # (NumPy: small single-threaded arrays; torch's CPU thread pool costs more than the work here)
        slots = sorted(live)
        tokens = pool.out.cpu().numpy()[slots]  # waits for the chunk
        clock.lap(stats, "decode_s")
        lo = np.array([checked[slot] for slot in slots])
        budget = np.array([budgets[live[slot]] for slot in slots])
        hi = np.minimum(np.array([made[slot] for slot in slots]), budget)
        cols = np.arange(pool.out_len)
        hits = ((tokens == eos) | is_event[tokens]) & (cols >= lo[:, None]) & (cols < hi[:, None])
        ended = hi >= budget
        done = []
        for k in np.flatnonzero(hits.any(1) | ended).tolist():
            slot, row = slots[k], tokens[k, : hi[k]].tolist()
            marks = np.flatnonzero(hits[k]).tolist()
            length = next((j + 1 for j in marks if _stopped(tokenizer, row[: j + 1], eos, newline, ends_answer)), None)
            if length is not None or ended[k]:
                out[live[slot]] = row[: length or len(row)]
                cut[live[slot]] = length is None
                done.append(slot)
        for slot, upto in zip(slots, hi.tolist()):
            checked[slot] = upto
        for slot in done:
            del live[slot]
        if progress is not None and done:
            progress.update(len(done))
        clock.lap(stats, "host_s")
    for row in out:
        if row and row[-1] == eos:
            row.pop()
    return Generation(out, stats["prefill_passes"] + stats["decode_steps"], stats, cut)
