"""The generation engine: batched greedy decoding with a KV cache, a stop rule, and the batch size it fits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qloraner.parse import is_explicit_empty, parse_response

STOP_TEXT = "\n\n"  # our responses hold no blank line: one after the answer ends it
_TAIL = 4  # tokens decoded to look for STOP_TEXT; it never spans more
CPU_BATCH = 64  # `auto` on a CPU: batching past this gains nothing there
MAX_AUTO_BATCH = 1024  # `auto` on a GPU: larger batches decoded the test split no faster (RESULTS.md)
KV_MEMORY_SHARE = 0.5  # of the free accelerator memory, what `auto` gives the KV cache; the rest: activations


@dataclass
class Generation:
    tokens: list[list[int]]  # per prompt, in input order, without the stopping EOS
    forward_passes: int


def response_budget(tokenizer, tokens: tuple[str, ...] | list[str], cap: int) -> int:
    """An answer can't need more than one `[MISC] token` line per token of the sentence."""
    return min(cap, len(tokenizer(" ".join(tokens), add_special_tokens=False)["input_ids"]) + 6 * len(tokens) + 4)


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


def _stopped(tokenizer, row: list[int], eos: int, newline: dict[int, bool]) -> bool:
    """EOS, or a blank line just written after an answer (not after a preamble like 'The entities are:')."""
    if row[-1] == eos:
        return True
    if row[-1] not in newline:  # most tokens hold no newline: decode only when one was just written
        newline[row[-1]] = "\n" in tokenizer.decode(row[-1:])
    if not newline[row[-1]] or STOP_TEXT not in tokenizer.decode(row[-_TAIL:]):
        return False
    text = tokenizer.decode(row)
    return bool(parse_response(text)) or is_explicit_empty(text)


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: list[list[int]], budgets: list[int], batch_size: int, progress=None
) -> Generation:
    """Greedy decoding in batches of similar length: left padding, an attention mask, a KV cache.

    A row stops at EOS or at a blank line and never grows after; a batch ends when all its
    rows have stopped or reached their budget.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory peaks early
    out: list[list[int]] = [[] for _ in prompts]
    passes = 0
    newline: dict[int, bool] = {}  # token id -> its text holds a newline
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), eos, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(idx), dtype=torch.bool)
        cache = None
        for _ in range(max(budgets[i] for i in idx)):
            step = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )  # the LM head on the last position only
            passes += 1
            cache = step.past_key_values
            nxt = step.logits[:, -1].argmax(-1).cpu()
            for row, i in enumerate(idx):
                if not done[row]:
                    out[i].append(int(nxt[row]))
                    done[row] = _stopped(tokenizer, out[i], eos, newline) or len(out[i]) >= budgets[i]
            if done.all():
                break
            nxt[done] = eos  # finished rows idle on EOS; their outputs are ignored
            ids = nxt[:, None].to(device)
            mask = torch.cat([mask, torch.ones((len(idx), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
        if progress is not None:
            progress.update(len(idx))
    for row in out:
        if row and row[-1] == eos:
            row.pop()
    return Generation(out, passes)
