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

The forward it runs, the model's own modules in the LLaMA layout, is qloraner/llama.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from qloraner import first_line
from qloraner.compiler import compile_unavailable
from qloraner.llama import Llama, attention, fused_attention, head_unfit, prefix_cache
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


class _Pool:
    """`rows` decoding slots of `length` cache positions, all state on the device: keys and values per layer, each
    row's next position (= its last token's cache position), its last token and the tokens it generated; and the
    `prefix` keys and values [KV, P, D] per layer that every row shares. A slot's layout: its prompt after the shared
    prefix at 0..len-1, then its answer; cache position c is token P + c, and a row attends to 0..its next position.
    `fused`: the Triton attention's launcher (qloraner.kernels), or None for PyTorch's."""

    def __init__(self, net: Llama, rows: int, length: int, out_len: int, prefix: tuple[list, list], fused=None):
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

    def moved(self, net: Llama, keep: list[int], rows: int) -> _Pool:
        """A pool of `rows` slots holding the rows `keep` of this one, in that order."""
        new = _Pool(net, rows, self.length, self.out_len, self.prefix, self.fused)
        idx = torch.tensor(keep, device=self.slots.device)
        for mine, theirs in zip(self._state(), new._state()):
            theirs[: len(keep)] = mine.index_select(0, idx)
        return new

    def _state(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.cur, self.tok, self.out, self.n]

    def _step(self, net: Llama, width: int) -> None:
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
            return attention(q, self.k[i][:, :, :width], self.v[i][:, :, :width], mine, scale, shared)

        nxt = net.next_token(net.hidden(self.tok[:, None], self.offset + cur[:, None], attend)[:, -1])
        self.out.index_put_((self.slots, self.n.clamp(max=self.out_len - 1)), nxt)
        self.tok.copy_(nxt)
        self.cur.add_(1)
        self.n.add_(1)

    def decode(self, net: Llama, steps: int, width: int, graphs: bool) -> int:
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


def _prefill(net: Llama, pool: _Pool, slots: list[int], suffixes: list[list[int]]) -> None:
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
        return attention(q, k, v, sees, scale, (pk[i], pv[i]))

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
    net = Llama(model)
    size = dequantized_bytes(model, net.dtype)
    if dequantize is None:
        dequantize = net.device.type == "cuda" and size <= DEQUANT_SHARE * torch.cuda.mem_get_info(net.device)[0]
    if fused is None:
        why = compile_unavailable(net.device) or head_unfit(net)
        fused = why is None
        if why and net.device.type == "cuda":
            print(f"qloraner: the decode step's attention runs in PyTorch: {why}", flush=True)
    launcher = fused_attention(net) if fused else None
    with _dequantized(model, net.dtype) if dequantize and size else nullcontext():
        gen = _generate(net, tokenizer, prompts, budgets, batch_size, progress, graphs, stop, launcher, ends_answer)
    gen.stats["dequantized_bytes"] = size if dequantize else 0
    return gen


@dataclass(frozen=True)
class _StopRule:
    """What the stop rule reads: the tokenizer, the EOS id (-1 with stop=False: no token is it), which token ids hold
    a newline (a list for _stopped, a NumPy mask for the scan; none with stop=False) and the caller's answer test."""

    tokenizer: object
    eos: int
    newline: list[bool]
    is_event: np.ndarray
    ends_answer: Callable[[str], bool] | None

    @classmethod
    def of(cls, tokenizer, vocab: int, stop: bool, ends_answer: Callable[[str], bool] | None) -> _StopRule:
        """The rule generate_greedy asks for; stop=False: rows end at their budgets only."""
        eos = tokenizer.eos_token_id if stop else -1
        newline = newline_table(tokenizer, vocab) if stop else [False] * vocab
        return cls(tokenizer, eos, newline, np.array(newline), ends_answer)

    def stops(self, row: list[int]) -> bool:
        """Whether `row` stops at its last token: _stopped under this rule."""
        return _stopped(self.tokenizer, row, self.eos, self.newline, self.ends_answer)


@dataclass
class _Book:
    """The loop's bookkeeping on the host: the prompt each pool slot holds and how far it has come, what each prompt
    produced, and the engine's stats."""

    live: dict[int, int]  # slot -> prompt index
    made: list[int]  # per slot: tokens generated so far (host mirror of pool.n)
    checked: list[int]  # per slot: tokens the stop rule has seen
    out: list[list[int]]  # per prompt: its tokens, once it stopped
    cut: list[bool]  # per prompt: its budget ran out before it stopped
    stats: dict  # Generation.stats

    @classmethod
    def start(cls, pool: _Pool, prompts: int, shared: int, attention: str) -> _Book:
        """No slot live yet, for `prompts` prompts that share `shared` tokens (computed in one pass, if any)."""
        stats = {
            "prefill_passes": 1 if shared else 0,
            "decode_steps": 0,
            "pools": 1,
            "cuda_graphs": 0,
            "shared_prefix": shared,
            "rows": pool.rows,
            "length": pool.length,
            "row_steps": 0,
            "live_row_steps": 0,
            "attention": attention,
        }
        return cls({}, [0] * pool.rows, [0] * pool.rows, [[] for _ in range(prompts)], [False] * prompts, stats)

    def decoded(self, rows: int, graphs: int) -> None:
        """Count SYNC_EVERY decode steps of a pool of `rows` slots that captured `graphs` CUDA graphs."""
        self.stats["cuda_graphs"] += graphs
        self.stats["decode_steps"] += SYNC_EVERY
        self.stats["row_steps"] += SYNC_EVERY * rows  # rows decoded, live or not
        self.stats["live_row_steps"] += SYNC_EVERY * len(self.live)
        for slot in self.live:
            self.made[slot] += SYNC_EVERY


def _refill(
    net: Llama,
    pool: _Pool,
    book: _Book,
    clock: _Clock,
    prompts: list[list[int]],
    shared: int,
    own: list[int],
    free: list[int],
    take: list[int],
) -> None:
    """Prefill the prompts `take` (indices, longest first) into the `free` slots, in passes of rows of similar
    length (_prefill_passes); each is live from there, with its first token made."""
    at = 0
    for part in _prefill_passes([own[i] for i in take]):
        _prefill(net, pool, free[at : at + part], [prompts[i][shared:] for i in take[at : at + part]])
        book.stats["prefill_passes"] += 1
        at += part
    clock.lap(book.stats, "prefill_s")
    for slot, i in zip(free, take):
        book.live[slot], book.made[slot], book.checked[slot] = i, 1, 0


def _shrink(net: Llama, pool: _Pool, book: _Book, clock: _Clock) -> _Pool:
    """The live rows moved, in slot order, to a pool of the next power of two slots that holds them."""
    keep = sorted(book.live)
    pool = pool.moved(net, keep, 1 << (len(keep) - 1).bit_length())
    book.live = {new: book.live[old] for new, old in enumerate(keep)}
    book.made = [book.made[old] for old in keep] + [0] * (pool.rows - len(keep))
    book.checked = [book.checked[old] for old in keep] + [0] * (pool.rows - len(keep))
    book.stats["pools"] += 1
    clock.lap(book.stats, "move_s")
    return pool


def _apply_stop_rule(rule: _StopRule, book: _Book, budgets, slots: list[int], tokens: np.ndarray) -> int:
    """The stop rule over the live `slots`, whose pool rows are `tokens`: a row that stopped or reached its budget
    gives its prompt's tokens and frees its slot. Returns how many did.

    Python only where a row wrote an EOS or a newline, or reached its budget (NumPy: small single-threaded arrays;
    torch's CPU thread pool costs more than the work here)."""
    lo = np.array([book.checked[slot] for slot in slots])
    budget = np.array([budgets[book.live[slot]] for slot in slots])
    hi = np.minimum(np.array([book.made[slot] for slot in slots]), budget)
    cols = np.arange(tokens.shape[1])
    hits = ((tokens == rule.eos) | rule.is_event[tokens]) & (cols >= lo[:, None]) & (cols < hi[:, None])
    ended = hi >= budget
    done = []
    for k in np.flatnonzero(hits.any(1) | ended).tolist():
        slot, row = slots[k], tokens[k, : hi[k]].tolist()
        marks = np.flatnonzero(hits[k]).tolist()
        length = next((j + 1 for j in marks if rule.stops(row[: j + 1])), None)
        if length is not None or ended[k]:
            book.out[book.live[slot]] = row[: length or len(row)]
            book.cut[book.live[slot]] = length is None
            done.append(slot)
    for slot, upto in zip(slots, hi.tolist()):
        book.checked[slot] = upto
    for slot in done:
        del book.live[slot]
    return len(done)


def _generate(
    net: Llama, tokenizer, prompts, budgets, batch_size, progress, graphs, stop, fused, ends_answer
) -> Generation:
    """generate_greedy's loop: prefill into free slots, decode SYNC_EVERY steps, apply the stop rule, repeat."""
    graphs = graphs and net.device.type == "cuda"
    rule = _StopRule.of(tokenizer, net.vocab, stop, ends_answer)
    p = _common_prefix(prompts)
    waiting = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory peaks early
    own = [len(x) - p for x in prompts]  # a row's own prompt tokens, after the shared prefix
    length = _round_up(max(n + b for n, b in zip(own, budgets)) + SYNC_EVERY, KEY_BLOCK)  # and its answer
    prefix = prefix_cache(net, prompts[0][:p])
    pool = _Pool(net, min(batch_size, len(prompts)), length, max(budgets) + 1, prefix, fused)
    book = _Book.start(pool, len(prompts), p, "triton" if fused else "pytorch")
    clock = _Clock(net.device)
    while waiting or book.live:
        # waiting prompts fill the free slots once REFILL_SHARE of them are free (or none is live): a prefill pass
        # serves many rows at once
        free = [slot for slot in range(pool.rows) if slot not in book.live]
        if waiting and (not book.live or len(free) >= REFILL_SHARE * pool.rows):
            take, waiting = waiting[: len(free)], waiting[len(free) :]
            _refill(net, pool, book, clock, prompts, p, own, free, take)
        # with none waiting, few live rows move to a smaller pool: a long answer does not keep a big batch busy
        elif not waiting and len(book.live) <= SHRINK_SHARE * pool.rows and pool.rows > 1:
            pool = _shrink(net, pool, book, clock)
        width = 0  # the kernel needs none: one CUDA graph a pool
        if not fused:  # PyTorch's attention reads every row as far as the furthest live one gets in these steps
            reach = max(own[i] + book.made[slot] + SYNC_EVERY for slot, i in book.live.items())
            width = min(_round_up(reach, KEY_BLOCK), pool.length)
        captured = pool.decode(net, SYNC_EVERY, width, graphs)
        graphs = graphs and captured >= 0  # a failed capture: the steps run eagerly from here on
        book.decoded(pool.rows, max(captured, 0))
        # the stop rule, on the host every SYNC_EVERY steps rather than every step: the host waits for the device
        # that rarely (a stopped row runs at most SYNC_EVERY steps more, discarded)
        slots = sorted(book.live)
        tokens = pool.out.cpu().numpy()[slots]  # waits for the chunk
        clock.lap(book.stats, "decode_s")
        done = _apply_stop_rule(rule, book, budgets, slots, tokens)
        if progress is not None and done:
            progress.update(done)
        clock.lap(book.stats, "host_s")
    for row in book.out:
        if row and row[-1] == rule.eos:
            row.pop()
    return Generation(book.out, book.stats["prefill_passes"] + book.stats["decode_steps"], book.stats, book.cut)
