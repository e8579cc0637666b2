"""The generation engine (qloraner/decode.py) against one-prompt-at-a-time decoding with the model's own forward."""

import functools

import bitsandbytes as bnb
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qloraner.config import EvalConfig
from qloraner.conll import read_split
from qloraner.data import IGNORE_INDEX, encode, response_budget
from qloraner.decode import (
    PREFILL_SHARE,
    PREFILL_TOKENS,
    _common_prefix,
    _prefill_passes,
    _stopped,
    generate_greedy,
    kv_bytes_per_token,
    newline_table,
)
from qloraner.evaluate import load_for_eval
from qloraner.llama import attention as _attention
from qloraner.model import load_base, load_tokenizer
from qloraner.parse import RENDERERS, ends_answer, render_response
from qloraner.prompts import build_prompt
from tests.strategies import valid_iob2, word

CPU = torch.device("cpu")
ANSWER = ends_answer()  # the stop test for CoNLL-2003's types, as evaluate passes it


@pytest.fixture(scope="module")
def grouped_model(tmp_path_factory, tiny_model) -> str:
    """A random 2-layer LLaMA with grouped-query attention (4 query heads on 2 key heads) and biased projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    base = LlamaConfig.from_pretrained(tiny_model)
    config = LlamaConfig(**{**base.to_dict(), "num_key_value_heads": 2, "attention_bias": True})
    path = tmp_path_factory.mktemp("grouped-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    load_tokenizer(tiny_model).save_pretrained(path)
    return str(path)


def _prompt_ids(tok, conll_dir, n, template="simple"):
    sentences = read_split(conll_dir, "valid")[:n]
    return [tok(build_prompt(s.tokens, template))["input_ids"] for s in sentences]


def _one_at_a_time(model, prompt: list[int], budget: int, eos: int) -> list[int]:
    """The reference: the model's full forward over the whole text for every new token, no cache, no batch."""
    ids: list[int] = list(prompt)
    with torch.no_grad():
        for _ in range(budget):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                return ids[len(prompt) : -1]
    return ids[len(prompt) :]


@pytest.mark.parametrize("which", ["tiny", "grouped"])
def test_greedy_equals_one_prompt_at_a_time(which, tiny_model, grouped_model, conll_dir):
    """24 prompts of mixed length, with budgets from 4 to 26 tokens, decode to exactly the tokens of one prompt at a
    time with no cache (fp32, NF4 weights) at batch sizes 1, 5 and 24, and at 5 with the 4-bit weights dequantized
    once; the first 8 at 4 with the decode step's attention as the Triton kernel (interpreted, a program a row: the
    slowest path on a CPU, so fewer rows, still refilled and moved): the shared prefix, the slots refilled as rows end,
    the move to a smaller pool, the masks, the kernel and the dequantized copies change nothing, and the 4-bit layers
    are back afterwards. Each path is taken, with the kernel too."""
    path = tiny_model if which == "tiny" else grouped_model
    tok = load_tokenizer(path, padding_side="left")
    model = load_base(path, CPU).eval()
    prompts = _prompt_ids(tok, conll_dir, 24)
    assert len({len(p) for p in prompts}) > 10
    budgets = [4 + (7 * i) % 23 for i in range(24)]
    expected = [_one_at_a_time(model, p, b, tok.eos_token_id) for p, b in zip(prompts, budgets)]
    four_bit = [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    runs = {bs: generate_greedy(model, tok, prompts, budgets, bs) for bs in (1, 5, 24)}
    runs["5, dequantized"] = generate_greedy(model, tok, prompts, budgets, 5, dequantize=True)
    for bs, gen in runs.items():
        assert gen.tokens == expected, f"batch size {bs}"
    fused = generate_greedy(model, tok, prompts[:8], budgets[:8], 4, fused=True)
    assert fused.tokens == expected[:8]
    assert runs["5, dequantized"].stats["dequantized_bytes"] > 0 == runs[5].stats["dequantized_bytes"]
    assert [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)] == four_bit != []
    for name, gen, rows, size in ((5, runs[5], 24, 5), ("4, fused", fused, 8, 4)):
        assert gen.stats["prefill_passes"] > rows / size + 1, name  # slots were refilled as rows ended
        assert gen.stats["pools"] > 1, name  # the last rows moved to a smaller pool
        assert gen.stats["shared_prefix"] > 20, name  # the instruction was computed and kept once
    assert runs[24].stats["pools"] > 1
    assert fused.stats["attention"] == "triton" != runs[5].stats["attention"]


def test_the_kernel_refuses_a_head_size_it_cannot_take_and_pytorch_decodes_it(tiny_model, conll_dir):
    """A model whose heads are 24 wide (not a power of two) decodes with PyTorch's attention by default, as one
    prompt at a time does, and asking for the Triton kernel is refused with the head size named."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qloraner import QloranerError

    torch.manual_seed(2)
    config = LlamaConfig.from_pretrained(tiny_model)
    model = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "hidden_size": 96, "head_dim": 24})).eval()
    tok = load_tokenizer(tiny_model, padding_side="left")
    prompts = _prompt_ids(tok, conll_dir, 3)
    gen = generate_greedy(model, tok, prompts, [6] * 3, 3)
    assert gen.tokens == [_one_at_a_time(model, p, 6, tok.eos_token_id) for p in prompts]
    assert gen.stats["attention"] == "pytorch"
    with pytest.raises(QloranerError, match="powers of two from 16, not 24"):
        generate_greedy(model, tok, prompts, [6] * 3, 3, fused=True)


def test_a_longer_shared_instruction_leaves_the_rows_caches_as_long(tiny_model, conll_dir):
    """The prompts' shared prefix is kept once, outside the rows' caches: 64 more tokens shared by every prompt make
    the shared prefix 64 longer and leave the length of the pool's cache as it was."""
    tok = load_tokenizer(tiny_model, padding_side="left")
    model = load_base(tiny_model, CPU).eval()
    prompts = _prompt_ids(tok, conll_dir, 6)
    extra = tok(" note" * 64, add_special_tokens=False)["input_ids"][:64]
    longer = [p[:1] + extra + p[1:] for p in prompts]  # after BOS, before the instruction
    short, long = (generate_greedy(model, tok, x, [8] * 6, 6, stop=False).stats for x in (prompts, longer))
    assert long["shared_prefix"] == short["shared_prefix"] + 64
    assert long["length"] == short["length"]


def test_finished_rows_never_grow_and_generation_ends_early(tiny_adapter, tiny_model, conll_dir):
    """A trained adapter stops by itself: no row grows past its stop, and passes < max_new_tokens; without the stop
    rule every row is exactly its budget long and begins with what the stopped row holds. The unmerged adapter on
    dequantized copies of the 4-bit weights answers the same."""
    model, tok, prompting, _ = load_for_eval(EvalConfig(model=str(tiny_model), adapter=str(tiny_adapter)), CPU)
    prompts = [tok(prompting.text(s.tokens))["input_ids"] for s in read_split(conll_dir, "train")[:8]]
    gen = generate_greedy(model, tok, prompts, [64] * 8, batch_size=8, ends_answer=ANSWER)
    assert gen.forward_passes < 64
    newline = newline_table(tok, len(tok))
    for row in gen.tokens:
        full = row + [tok.eos_token_id]  # the EOS that stopped it was stripped
        assert not any(_stopped(tok, full[:k], tok.eos_token_id, newline, ANSWER) for k in range(1, len(full)))
    budgets = [20 + i for i in range(8)]
    forced = generate_greedy(model, tok, prompts, budgets, batch_size=3, stop=False).tokens
    assert [len(row) for row in forced] == budgets
    assert all(f[: len(g)] == g for f, g in zip(forced, gen.tokens))
    assert generate_greedy(model, tok, prompts, [64] * 8, 8, dequantize=True, ends_answer=ANSWER).tokens == gen.tokens


@pytest.mark.parametrize(
    "answer, rest",
    [
        ("[PER] John\n[LOC] Paris\n\n", "Note: these are all."),
        ("The entities are:\n\n[PER] John\n[LOC] Paris\n\n", "I hope this helps."),  # a preamble's blank line goes on
        ("[NONE]\n\n", "Explanation: none."),
        ("Entities:\n\n[NONE]\n\n", "Explanation: none."),
        ("[ORG] U.N.\n\n", "\n\n"),
    ],
)
@pytest.mark.parametrize("which", ["smol", "llama2"])
def test_stop_rule_fires_first_at_the_blank_line_after_the_answer(
    answer, rest, which, smol_checkpoint, llama2_tokenizer_dir
):
    """Decoding token by token, the first stop is the first prefix that holds the whole answer and its blank line."""
    tok = load_tokenizer(smol_checkpoint if which == "smol" else llama2_tokenizer_dir)
    ids = tok(answer + rest, add_special_tokens=False)["input_ids"]
    newline = newline_table(tok, len(tok))
    first = next(k for k in range(1, len(ids) + 1) if _stopped(tok, ids[:k], tok.eos_token_id, newline, ANSWER))
    assert tok.decode(ids[:first]).rstrip("\n") == answer.rstrip("\n")


def _with_shared(k, v, mask, pk, pv):
    """The keys, values and mask as one row-by-row attention sees them: the shared prefix before each row's own."""
    expand = (k.shape[0], -1, -1, -1)
    shared_mask = torch.ones((*mask.shape[:-1], pk.shape[1]), dtype=torch.bool)
    return (
        torch.cat([pk.expand(expand), k], 2),
        torch.cat([pv.expand(expand), v], 2),
        torch.cat([shared_mask, mask], -1),
    )


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(1, 5), st.integers(1, 9), st.data()
)
def test_grouped_attention_equals_pytorch_sdpa(batch, kv, group, queries, keys, data):
    """Our attention (query heads folded per key head) over a shared prefix of 0-4 keys that every row sees and its
    own keys equals PyTorch's SDPA with enable_gqa over the prefix copied before each row's keys, for any mask that
    leaves every query at least one key."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    shared = data.draw(st.integers(0, 4))
    q = torch.randn(batch, kv * group, queries, 8, generator=gen)
    k, v = (torch.randn(batch, kv, keys, 8, generator=gen) for _ in range(2))
    pk, pv = (torch.randn(kv, shared, 8, generator=gen) for _ in range(2))
    mask = torch.rand(batch, queries, keys, generator=gen) < 0.5
    mask[..., data.draw(st.integers(0, keys - 1))] = True
    keys_all, values_all, mask_all = _with_shared(k, v, mask, pk, pv)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys_all, values_all, attn_mask=mask_all[:, None], enable_gqa=True
    )
    ours = _attention(q, k, v, mask, 8**-0.5, (pk, pv))
    torch.testing.assert_close(ours, expected.transpose(1, 2).reshape(batch, queries, -1), atol=1e-5, rtol=1e-5)


@given(
    st.lists(st.integers(0, 3), max_size=6), st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1)
)
def test_common_prefix_is_the_longest_shared_one_that_leaves_every_prompt_a_token(head, tails):
    """Every prompt starts with the first n tokens, each keeps at least one of its own, and n can't grow."""
    prompts = [head + t for t in tails]
    n = _common_prefix(prompts)
    assert all(p[:n] == prompts[0][:n] and len(p) > n for p in prompts)
    assert n == min(len(p) for p in prompts) - 1 or len({tuple(p[: n + 1]) for p in prompts}) > 1


def test_kv_cache_bytes_follow_the_model_shape():
    """KV bytes per token: keys and values, every layer, every KV head, in the cache dtype (LLaMA-2-7B: 0.5 MiB)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    assert kv_bytes_per_token(config, torch.bfloat16) == 2**19
    grouped = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_bytes_per_token(grouped, torch.float32) == 2**18  # a quarter of the heads, twice the bytes


@given(st.lists(st.integers(1, 4000), min_size=1, max_size=300).map(lambda xs: sorted(xs, reverse=True)))
def test_prefill_passes_cover_every_row_once_with_bounded_padding(lengths):
    """Passes split the rows (sorted longest first) in order, each row once; in a pass every row is at least
    PREFILL_SHARE of the first, and the padded tokens stay within PREFILL_TOKENS unless one row alone exceeds it."""
    passes = _prefill_passes(lengths)
    assert sum(passes) == len(lengths) and min(passes) >= 1
    start = 0
    for n in passes:
        part = lengths[start : start + n]
        assert part[-1] >= PREFILL_SHARE * part[0]
        assert n == 1 or n * part[0] <= PREFILL_TOKENS
        start += n


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 2), st.sampled_from([1, 3]), st.integers(1, 150), st.data())
def test_decode_attention_kernel_equals_pytorch_sdpa(batch, kv, group, keys, data):
    """The Triton kernel (interpreted): each row's one query over a shared prefix of 0-70 keys and its own first
    n_own positions (1 to 150: across several of its blocks) equals PyTorch's SDPA over the prefix copied before each
    row's keys up to n_own; positions past n_own are never read (NaN there changes nothing)."""
    from qloraner.kernels import decode_attention

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    shared = data.draw(st.integers(0, 70))
    n_own = torch.tensor(data.draw(st.lists(st.integers(1, keys), min_size=batch, max_size=batch)))
    q = torch.randn(batch, kv * group, 1, 16, generator=gen)
    k, v = (torch.randn(batch, kv, keys + 3, 16, generator=gen) for _ in range(2))
    mine = torch.arange(keys + 3)[None] < n_own[:, None]
    k, v = k.masked_fill(~mine[:, None, :, None], float("nan")), v.masked_fill(~mine[:, None, :, None], float("nan"))
    pk, pv = (torch.randn(kv, shared, 16, generator=gen) for _ in range(2))
    keys_all, values_all, mine_all = _with_shared(k.nan_to_num(), v.nan_to_num(), mine[:, None], pk, pv)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys_all, values_all, attn_mask=mine_all[:, None], enable_gqa=True
    )
    ours = decode_attention(q, k, v, n_own, 16**-0.5, (pk, pv))
    torch.testing.assert_close(ours, expected.transpose(1, 2).reshape(batch, 1, -1), atol=1e-5, rtol=1e-5)


@functools.cache
def _tokenizer(path):
    return load_tokenizer(path)


def _trained_answer_length(tok, tokens, tags, response_format: str) -> int:
    """Tokens a model is trained to generate for this sentence: the perfect answer as it follows the prompt, then
    the EOS (the labels of data.encode)."""
    prompt = build_prompt(tokens, "simple", response_format)
    (example,) = encode(tok, [prompt], [render_response(tokens, tags, response_format)])
    return sum(label != IGNORE_INDEX for label in example.labels)


@pytest.mark.parametrize("which", ["smol", "llama2"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_perfect_answer_always_fits_its_budget(which, data, smol_checkpoint, llama2_tokenizer_dir):
    """For any tokens (brackets, quotes and backslashes included) and any valid tags, the perfect answer in every
    response format, with its EOS, fits the budget derived from the sentence alone; a cap only lowers it."""
    tok = _tokenizer(smol_checkpoint if which == "smol" else llama2_tokenizer_dir)
    tokens = data.draw(st.lists(word, min_size=1, max_size=25))
    tags = data.draw(valid_iob2(len(tokens)))
    for response_format in RENDERERS:
        budget = response_budget(tok, tokens, response_format=response_format)
        assert _trained_answer_length(tok, tokens, tags, response_format) <= budget
        assert response_budget(tok, tokens, 3, response_format) == min(3, budget)


@pytest.mark.parametrize(
    ("which", "tokens", "tags", "response_format"),
    [
        ("smol", [":", ":"], ["B-MISC", "B-ORG"], "json"),  # two groups, the longer names: Hypothesis found it
        ("smol", ["a", "b", "c"], ["B-MISC", "B-ORG", "B-PER"], "json"),
        ("llama2", [":", ":"], ["B-MISC", "B-ORG"], "json"),
        ("llama2", ['"', "]", "\\"], ["B-PER", "B-MISC", "B-ORG"], "inline"),
    ],
)
def test_real_perfect_answers_fit_their_budget(
    which, tokens, tags, response_format, smol_checkpoint, llama2_tokenizer_dir
):
    """Cases that once needed more than their budget: answers whose groups name the types with the longest names."""
    tok = _tokenizer(smol_checkpoint if which == "smol" else llama2_tokenizer_dir)
    need = _trained_answer_length(tok, tokens, tags, response_format)
    assert need <= response_budget(tok, tokens, response_format=response_format)


def test_every_perfect_answer_to_the_test_split_fits_its_budget(conll_dir, smol_checkpoint):
    """Each gold answer of the test split (its longest sentence: 124 tokens, whose inline answer needs more than
    256) in each response format, with its EOS, fits the budget derived from its sentence."""
    tok = _tokenizer(smol_checkpoint)
    for s in read_split(conll_dir, "test"):
        for response_format in RENDERERS:
            need = _trained_answer_length(tok, s.tokens, s.tags, response_format)
            assert need <= response_budget(tok, s.tokens, response_format=response_format), (s.tokens, response_format)


def test_an_answer_is_cut_exactly_when_its_budget_ends_before_its_stop(tiny_adapter, tiny_model, conll_dir):
    """Generation.cut marks a row exactly when its budget ran out before it stopped: when no prefix of the budget's
    tokens, decoded without the stop rule, stops (EOS, or a blank line after an answer)."""
    model, tok, prompting, _ = load_for_eval(EvalConfig(model=str(tiny_model), adapter=str(tiny_adapter)), CPU)
    prompts = [tok(prompting.text(s.tokens))["input_ids"] for s in read_split(conll_dir, "train")[:8]]
    budgets = [1, 2, 4, 8, 16, 32, 48, 64]
    gen = generate_greedy(model, tok, prompts, budgets, batch_size=3, ends_answer=ANSWER)
    forced = generate_greedy(model, tok, prompts, budgets, batch_size=3, stop=False).tokens
    newline = newline_table(tok, len(tok))
    cut = [
        not any(_stopped(tok, row[:k], tok.eos_token_id, newline, ANSWER) for k in range(1, len(row) + 1))
        for row in forced
    ]
    assert gen.cut == cut
    assert True in cut and False in cut  # both kinds are checked
