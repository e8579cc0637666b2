"""qloraner.text: sentences and CoNLL-2003-like tokens with exact character offsets."""

import pytest
from hypothesis import given

from qloraner.conll import read_split
from qloraner.text import is_space, sentences, tokenize
from tests.strategies import raw_text


@given(raw_text)
def test_tokens_are_exact_ordered_slices_that_cover_the_text(text):
    """For any text, every token is the slice of the text at its offsets, holds no whitespace, and the tokens come in
    order without overlapping; every character that is not whitespace lies in a token; no sentence is empty."""
    found = sentences(text)
    assert all(found)
    tokens = [t for s in found for t in s]
    covered = set()
    for before, t in zip([None, *tokens], tokens):
        assert t.text and text[t.start : t.end] == t.text
        assert not any(is_space(c) for c in t.text)
        assert before is None or before.end <= t.start
        covered.update(range(t.start, t.end))
    assert {i for i, c in enumerate(text) if not is_space(c)} == covered


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        (" \t\r\n\u00a0\u200b ", []),
        ("Peter visited the U.S. yesterday.", [["Peter", "visited", "the", "U.S.", "yesterday", "."]]),
        ("Peter's dog", [["Peter", "'s", "dog"]]),
        ("AL-AIN , United Arab Emirates 1996-12-06", [["AL-AIN", ",", "United", "Arab", "Emirates", "1996-12-06"]]),
        ("McDonald's iPhone", [["McDonald", "'s", "iPhone"]]),
        ("Don't go.", [["Do", "n't", "go", "."]]),
        ("(Reuters) [x]{y}", [["(", "Reuters", ")", "[", "x", "]", "{", "y", "}"]]),
        ("Dr. Smith met Mr. Jones in St. Louis.", [["Dr.", "Smith", "met", "Mr.", "Jones", "in", "St.", "Louis", "."]]),
        ('"Quoted." Then', [['"', "Quoted", ".", '"'], ["Then"]]),
        ("Japan won.\r\nChina lost.", [["Japan", "won", "."], ["China", "lost", "."]]),
        ("a\tb\r\nc", [["a", "b", "c"]]),
        ("First paragraph\n\nSecond one", [["First", "paragraph"], ["Second", "one"]]),
        ("I ❤️ Paris 😀", [["I", "❤️", "Paris", "😀"]]),
        ("Müller-Lüdenscheidt née Ça", [["Müller-Lüdenscheidt", "née", "Ça"]]),
        ("x\u200by\x1cz", [["x", "y", "z"]]),
    ],
)
def test_nasty_real_cases(text, expected):
    """Each case splits into these sentences and tokens, and each token sits at its offsets in the text."""
    found = sentences(text)
    assert [[t.text for t in s] for s in found] == expected
    assert all(text[t.start : t.end] == t.text for s in found for t in s)


def test_offsets_count_characters_not_bytes_or_newline_conventions():
    """Offsets index the Python string as given: an emoji before and a CRLF are one and two characters."""
    text = "😀 x\r\nBerlin"
    (berlin,) = [t for t in tokenize(text) if t.text == "Berlin"]
    assert (berlin.start, berlin.end) == (5, 11)


def test_conll_sentences_written_as_text_come_back_as_their_tokens(conll_dir):
    """CoNLL-2003 test sentences joined by spaces tokenize back into their own tokens, nearly all of them exactly:
    the adapter sees text split as it learned (the misses are CoNLL's own oddities, like a period token after an
    abbreviation's)."""
    test = read_split(conll_dir, "test")[:500]
    same = sum([t.text for t in tokenize(" ".join(s.tokens))] == list(s.tokens) for s in test)
    assert same / len(test) >= 0.95
