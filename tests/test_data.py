import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraner.bio import entities_to_bio
from qloraner.conll import Sentence, read_split
from qloraner.data import (
    IGNORE_INDEX,
    build_record,
    encode,
    instruction_data,
    length_grouped_batches,
    padded_tokens,
    split_step,
    split_step_within,
)
from qloraner.model import load_tokenizer
from qloraner.parse import parse_response
from qloraner.prompts import TEMPLATES


def test_records_hold_text_and_parts(conll_dir, tmp_path):
    """Each record's text is prompt + response, and its response tags back to its gold tags."""
    out = tmp_path / "ner.json"
    records, manifest = instruction_data(conll_dir, "typed", out, limit=50)
    assert manifest["records"] == 14041 and len(records) == 50
    for r in records:
        assert r["text"] == r["prompt"] + r["response"]
        assert r["prompt"].endswith("\n") and r["response"] and not r["response"].endswith("\n")
        assert entities_to_bio(r["tokens"], parse_response(r["response"])) == r["tags"]


def test_instruction_file_rebuilt_only_when_stale(conll_dir, tmp_path):
    """The file is reused while source, template and format match, rebuilt when one changes."""
    out = tmp_path / "ner.json"
    instruction_data(conll_dir, "simple", out)
    stamp = out.stat().st_mtime_ns
    instruction_data(conll_dir, "simple", out)
    assert out.stat().st_mtime_ns == stamp
    records, _ = instruction_data(conll_dir, "fewshot", out)
    assert json.loads(out.read_text())["manifest"]["template"] == "fewshot"
    assert all("Example answer" in r["prompt"] for r in records[:10])


def test_json_records_tag_back_and_rebuild_the_file(conll_dir, tmp_path):
    """JSON-format records' responses tag back to their gold tags, and a new format rebuilds the file."""
    out = tmp_path / "ner.json"
    instruction_data(conll_dir, "simple", out)
    records, _ = instruction_data(conll_dir, "simple", out, limit=200, response_format="json")
    assert json.loads(out.read_text())["manifest"]["response_format"] == "json"
    for r in records:
        assert r["response"].startswith("{") and "JSON object" in r["prompt"]
        assert entities_to_bio(r["tokens"], parse_response(r["response"])) == r["tags"]


def test_templates_differ_and_carry_the_sentence(conll_dir):
    """The templates give as many prompts, each holding the sentence; only `context` holds its document's
    neighbouring sentences, and says (none) for a sentence alone in its document."""
    sentences = read_split(conll_dir, "valid")
    s = sentences[5]
    prompts = {t: build_record(s, t)["prompt"] for t in TEMPLATES}
    assert len(set(prompts.values())) == len(TEMPLATES) and all(" ".join(s.tokens) in p for p in prompts.values())
    assert s.context and [t for t, p in prompts.items() if s.context in p] == ["context"]
    alone = Sentence(s.tokens, s.tags)  # no neighbours
    assert "### Context:\n(none)\n" in build_record(alone, "context")["prompt"]


@given(st.lists(st.integers(1, 200), max_size=300), st.integers(1, 17), st.integers(0, 5), st.integers(0, 3))
def test_length_grouped_batches_partition(lengths, batch_size, seed, epoch):
    """Batches cover every index exactly once, hold at most batch_size, and repeat for one seed and epoch."""
    batches = length_grouped_batches(lengths, batch_size, seed, epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(0 < len(b) <= batch_size for b in batches)
    assert batches == length_grouped_batches(lengths, batch_size, seed, epoch)


@given(
    st.lists(st.integers(1, 200), min_size=1, max_size=64).flatmap(
        lambda lengths: st.tuples(st.just(lengths), st.permutations(range(len(lengths))), st.integers(1, 12))
    )
)
def test_split_step_partitions_evenly_by_length(case):
    """The parts cover the step's sequences once, differ in size by at most one, and never overlap in length order."""
    lengths, batch, parts = case
    split = split_step(list(batch), lengths, parts)
    assert len(split) == parts
    assert sorted(i for part in split for i in part) == sorted(batch)
    assert max(map(len, split)) - min(map(len, split)) <= 1
    filled = [part for part in split if part]
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(filled, filled[1:]))


@given(
    st.lists(st.integers(1, 200), min_size=1, max_size=64).flatmap(
        lambda lengths: st.tuples(
            st.just(lengths),
            st.permutations(range(len(lengths))),
            st.integers(1, 4),
            st.integers(1, 3),
            st.integers(0, 3000),
        )
    )
)
def test_split_step_within_uses_the_fewest_micro_batches_that_fit(case):
    """Bounded by max_tokens, the step splits into split_step's parts for the fewest count (the base count plus a
    multiple of the ranks) whose micro-batches each fit or hold one row; no bound gives the base count."""
    lengths, batch, per_rank, ranks, max_tokens = case
    base = per_rank * ranks
    split = split_step_within(list(batch), lengths, base, max_tokens, ranks=ranks)
    n = len(split)
    assert split == split_step(list(batch), lengths, n)
    assert n >= base and (n - base) % ranks == 0
    if not max_tokens:
        assert n == base
    else:
        assert all(padded_tokens(p, lengths) <= max_tokens or len(p) <= 1 for p in split)
        if n > base:  # one split fewer would not have fitted
            fewer = split_step(list(batch), lengths, n - ranks)
            assert any(padded_tokens(p, lengths) > max_tokens and len(p) > 1 for p in fewer)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "llama2"])
def test_masks_on_every_train_sentence_and_template(which, conll_dir, smol_checkpoint, llama2_tokenizer_dir):
    """For all 14,041 train sentences, every template and the JSON and inline formats: the prompt's ids prefix the full
    ids, and the labels are exactly the response's ids plus a final EOS (so EOS is learned although pad = eos)."""
    tok = load_tokenizer(smol_checkpoint if which == "smollm2" else llama2_tokenizer_dir)
    sentences = read_split(conll_dir, "train")
    assert len(sentences) == 14041
    for template, response_format in [(t, "lines") for t in TEMPLATES] + [("fewshot", "json"), ("simple", "inline")]:
        records = [build_record(s, template, response_format) for s in sentences]
        prompts, responses = [r["prompt"] for r in records], [r["response"] for r in records]
        prompt_ids = tok(prompts)["input_ids"]
        for r, p_ids, enc in zip(records, prompt_ids, encode(tok, prompts, responses)):
            n_prompt = len(p_ids)
            assert enc.input_ids[:n_prompt] == p_ids
            assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
            supervised = enc.labels[n_prompt:]
            assert IGNORE_INDEX not in supervised and supervised[-1] == tok.eos_token_id
            assert supervised == enc.input_ids[n_prompt:]
            assert tok.decode(supervised[:-1]) == r["response"]
