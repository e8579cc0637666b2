"""Raw text -> sentences of CoNLL-2003-like tokens, each with its character offsets into the original string.

syntok segments and tokenizes: a small pure-Python library (one dependency, `regex`) made for this, whose tokens carry
their offsets and whose sentence splitter knows abbreviations, where spaCy would bring a large stack and nltk data
downloads. Its tokens are finer than CoNLL-2003's in a few places, which `_conll_like` merges back: a hyphen inside a
word (`AL-AIN`, `German-born`), a lower-upper case change (`McDonald`, `iPhone`), an abbreviation's final period
(`U.S.`, `Dr.`), a lone `'s` and a decimal without its zero (`.778`). Whatever syntok does, every token is an exact
slice of the text without whitespace, and every character that is not whitespace lies in exactly one token (`_cover`
adds any that syntok left out). `entities_of` goes back: per-token tags to entities at the text's character offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from syntok import segmenter
from syntok.tokenizer import Tokenizer

from qloraner.bio import spans

_SPACES = frozenset("\u200b")  # syntok splits at the zero-width space as at whitespace: so do we
_HYPHENS = frozenset(Tokenizer._hyphens + "_")  # what syntok drops between a word's parts (not its tokens)
_APOSTROPHES = frozenset(Tokenizer._apostrophes)
_CONTRACTIONS = frozenset(("s", "re", "ve", "ll", "d", "m"))  # the tails CoNLL-2003 writes as one token: 's 're


@dataclass(frozen=True)
class Token:
    text: str
    start: int  # offset of its first character in the original text
    end: int  # one past its last character


def is_space(char: str) -> bool:
    """Whitespace as Python sees it, and the zero-width space: what separates tokens and lies in none."""
    return char.isspace() or char in _SPACES


def sentences(text: str) -> list[list[Token]]:
    """The sentences of `text`, each a non-empty list of tokens, in order. Total: any string, the empty one too.

    >>> [[t.text for t in s] for s in sentences("Peter's AL-AIN visit to the U.S. ended.\\r\\nHe left.")]
    [['Peter', "'s", 'AL-AIN', 'visit', 'to', 'the', 'U.S.', 'ended', '.'], ['He', 'left', '.']]
    """
    tokenizer = Tokenizer(replace_not_contraction=False)  # keep "n't" as written, not "not"
    found: list[list[Token]] = []
    # syntok's own analyze() pads each paragraph with spaces up to its offset: quadratic on long documents
    for offset, paragraph in segmenter.preprocess_with_offsets(text):
        for sentence in segmenter.segment(tokenizer.tokenize(paragraph)):
            tokens = [_token(text, offset + t.offset, len(t.value)) for t in sentence if t.value]
            found.append(_conll_like(text, tokens))
    return _cover(text, found)


def tokenize(text: str) -> list[Token]:
    """All tokens of `text`, in order, sentence after sentence."""
    return [t for s in sentences(text) for t in s]


def _token(text: str, start: int, length: int) -> Token:
    return Token(text[start : start + length], start, start + length)


def _joins(text: str, a: Token, b: Token, after: Token | None) -> bool:
    """Whether syntok's neighbouring tokens a and b (`after` the one after b in its sentence) make one CoNLL-2003
    token."""
    gap = text[a.end : b.start]
    if len(gap) == 1 and gap in _HYPHENS:  # AL-AIN: syntok drops the hyphen between the parts
        return a.text[-1].isalnum() and b.text[0].isalnum()
    if gap:
        return False
    if a.text == "." and b.text[0].isdigit() and (a.start == 0 or is_space(text[a.start - 1])):
        return True  # .778: a decimal without its zero
    if a.text in _APOSTROPHES and b.text.lower() in _CONTRACTIONS:  # Miura 's: syntok's split of a lone 's
        return True
    if b.text == ".":  # U.S., or Dr. before a word: syntok's splitter saw no sentence end there
        return a.text[-1].isalnum() and ("." in a.text or (after is not None and after.text[0].isalnum()))
    letters = a.text[-1].isalpha() and b.text[0].isalpha()
    return letters and not (_APOSTROPHES & set(a.text + b.text))  # McDonald, iPhone; not Do|n't


def _conll_like(text: str, tokens: list[Token]) -> list[Token]:
    """syntok's tokens of one sentence, merged where CoNLL-2003 keeps one token, split at any whitespace left."""
    merged: list[Token] = []
    for i, t in enumerate(tokens):
        if merged and _joins(text, merged[-1], t, tokens[i + 1] if i + 1 < len(tokens) else None):
            merged[-1] = Token(text[merged[-1].start : t.end], merged[-1].start, t.end)
        else:
            merged.append(t)
    return [piece for t in merged for piece in _split_at_spaces(text, t.start, t.end)]


def _split_at_spaces(text: str, start: int, end: int) -> list[Token]:
    """The runs of non-space characters in text[start:end] as tokens (syntok's whitespace is narrower than ours)."""
    out, run = [], None
    for i in range(start, end):
        if is_space(text[i]):
            if run is not None:
                out.append(Token(text[run:i], run, i))
            run = None
        elif run is None:
            run = i
    if run is not None:
        out.append(Token(text[run:end], run, end))
    return out


def _cover(text: str, found: list[list[Token]]) -> list[list[Token]]:
    """`found` with a token added for each run of non-space characters that no token holds, in the sentence of the
    token after it (the last sentence at the end): the tokens then cover the text."""
    out: list[list[Token]] = []
    at = 0
    for sentence in filter(None, found):
        filled: list[Token] = []
        for t in sentence:
            filled += [*_split_at_spaces(text, at, t.start), t]
            at = t.end
        out.append(filled)
    tail = _split_at_spaces(text, at, len(text))
    if out:
        out[-1] += tail
    elif tail:
        out.append(tail)
    return out


@dataclass(frozen=True)
class Entity:
    start: int  # character offset of its first character in the text
    end: int  # one past its last character
    label: str  # one of the adapter's types (Tagger.types): LOC, MISC, ORG or PER for CoNLL-2003
    text: str  # text[start:end]


def entities_of(text: str, tokens: Sequence[Sequence[Token]], tags: Sequence[Sequence[str]]) -> list[Entity]:
    """The entities that per-sentence tags mark over `text`'s tokens, each from its first token's start to its last
    token's end, in order."""
    found = []
    for sentence, sentence_tags in zip(tokens, tags):
        for span in spans(list(sentence_tags)):
            start, end = sentence[span.start].start, sentence[span.end - 1].end
            found.append(Entity(start, end, span.type, text[start:end]))
    return found
