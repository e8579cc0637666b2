"""Document-level consistency rules: properties over random documents, and real cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraner.bio import is_valid_iob2, spans
from qloraner.consistency import apply, propagate, vote_types, voted_types
from tests.strategies import valid_iob2

# A few words, so that mention texts repeat within a document; capitalised and lower-case ones.
VOCAB = ("Clinton", "Bonn", "EU", "New", "York", "said", "the", "german", "of")


@st.composite
def tagged_document(draw) -> tuple[list[list[str]], list[list[str]]]:
    """A document: sentences of tokens from a small vocabulary with valid IOB2 tags."""
    lengths = draw(st.lists(st.integers(0, 8), min_size=1, max_size=5))
    tokens = [draw(st.lists(st.sampled_from(VOCAB), min_size=n, max_size=n)) for n in lengths]
    return tokens, [draw(valid_iob2(n)) for n in lengths]


def _bounds(tags_per_sentence):
    return [[(s.start, s.end) for s in spans(tags)] for tags in tags_per_sentence]


@given(tagged_document())
def test_vote_moves_no_boundary_and_leaves_one_type_per_text(doc):
    """Voting keeps every span where it was, and afterwards each mention text has one type in the document."""
    tokens, tags = doc
    voted = vote_types(tokens, tags)
    assert _bounds(voted) == _bounds(tags)
    assert all(is_valid_iob2(t) and len(t) == len(s) for t, s in zip(voted, tokens))
    seen: dict[tuple[str, ...], set[str]] = {}
    for sentence, sentence_tags in zip(tokens, voted):
        for s in spans(sentence_tags):
            seen.setdefault(tuple(sentence[s.start : s.end]), set()).add(s.type)
    assert all(len(types) == 1 for types in seen.values())


@given(tagged_document())
def test_propagation_only_adds_capitalised_mentions_of_the_voted_type(doc):
    """Propagation keeps every span and its type, adds only texts tagged elsewhere in the document (capitalised),
    with their voted type, and leaves valid IOB2."""
    tokens, tags = doc
    votes = voted_types(tokens, tags)
    out = propagate(tokens, tags)
    for sentence, before, after in zip(tokens, tags, out):
        assert is_valid_iob2(after) and len(after) == len(sentence)
        old = set(spans(before))
        assert old <= set(spans(after))
        for s in set(spans(after)) - old:
            text = tuple(sentence[s.start : s.end])
            assert votes[text] == s.type and text[0][0].isupper()


@given(tagged_document(), st.sampled_from([("vote",), ("propagate",), ("vote", "propagate")]))
def test_rules_are_idempotent(doc, rules):
    """Running the rules on their own output changes nothing."""
    tokens, tags = doc
    once = apply(tokens, [0] * len(tokens), tags, rules)
    assert apply(tokens, [0] * len(tokens), once, rules) == once


@given(st.lists(tagged_document(), min_size=1, max_size=4))
def test_documents_do_not_vote_for_each_other(docs):
    """Rules run per document: a corpus of documents gives each document's own result."""
    tokens = [s for d in docs for s in d[0]]
    tags = [t for d in docs for t in d[1]]
    ids = [i for i, d in enumerate(docs) for _ in d[0]]
    whole = apply(tokens, ids, tags, ("vote", "propagate"))
    alone = [t for d in docs for t in apply(d[0], [0] * len(d[0]), d[1], ("vote", "propagate"))]
    assert whole == alone


CASES = [
    # (sentences, tags, rules, expected) from CoNLL-2003-like documents
    (
        [["Clinton", "met", "Yeltsin"], ["Clinton", "said"], ["Clinton", "left"]],
        [["B-PER", "O", "B-PER"], ["B-ORG", "O"], ["B-PER", "O"]],
        ("vote",),
        [["B-PER", "O", "B-PER"], ["B-PER", "O"], ["B-PER", "O"]],
    ),
    (
        [["New", "York", "beat", "Boston"], ["York", "and", "New", "York"]],
        [["B-ORG", "I-ORG", "O", "B-ORG"], ["O", "O", "O", "O"]],
        ("propagate",),
        [["B-ORG", "I-ORG", "O", "B-ORG"], ["O", "O", "B-ORG", "I-ORG"]],
    ),
    (  # a tie keeps the type seen first; a lower-case mention does not travel
        [["Jordan", "german"], ["Jordan", "german"]],
        [["B-LOC", "B-MISC"], ["B-PER", "O"]],
        ("vote", "propagate"),
        [["B-LOC", "B-MISC"], ["B-LOC", "O"]],
    ),
]


@pytest.mark.parametrize("sentences, tags, rules, expected", CASES)
def test_real_cases(sentences, tags, rules, expected):
    """Named documents come out as a reader of the news would tag them."""
    assert apply(sentences, [0] * len(sentences), tags, rules) == expected
