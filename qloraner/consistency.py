"""Document-level consistency: one mention text, one type, within a document. Pure functions over IOB2 tags.

A document names the same thing many times ("Clinton ... Clinton said"), and a sentence-level tagger may type it
differently each time or miss it in one sentence. Two rules, each usable alone:
- `vote_types`: every mention text gets, everywhere in its document, the type it got most often there (ties: the
  type it got first). Boundaries never move, only types.
- `propagate`: a mention text tagged somewhere in the document is tagged wherever else it occurs as whole,
  untagged tokens, with its voted type. Longer texts claim tokens first; only texts that start with a capital
  letter travel (a lower-case word tagged once, "german" say, is too often a plain word elsewhere).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from qloraner.bio import spans

Tokens = Sequence[str]


def _mentions(doc_tokens: Sequence[Tokens], doc_tags: Sequence[Sequence[str]]) -> list[tuple[tuple[str, ...], str]]:
    """Every (mention tokens, type) of a document, in reading order."""
    return [
        (tuple(tokens[s.start : s.end]), s.type)
        for tokens, tags in zip(doc_tokens, doc_tags)
        for s in spans(list(tags))
    ]


def voted_types(doc_tokens: Sequence[Tokens], doc_tags: Sequence[Sequence[str]]) -> dict[tuple[str, ...], str]:
    """Per mention text of a document, the type it got most often (ties: the one it got first)."""
    counts: dict[tuple[str, ...], Counter[str]] = {}
    for text, type_ in _mentions(doc_tokens, doc_tags):
        counts.setdefault(text, Counter())[type_] += 1  # Counter keeps first-seen order among equal counts
    return {text: c.most_common(1)[0][0] for text, c in counts.items()}


def _retag(tags: list[str], start: int, end: int, type_: str) -> None:
    tags[start:end] = [f"B-{type_}"] + [f"I-{type_}"] * (end - start - 1)


def vote_types(doc_tokens: Sequence[Tokens], doc_tags: Sequence[Sequence[str]]) -> list[list[str]]:
    """The document's tags with each mention typed by `voted_types`; the spans stay where they were."""
    votes = voted_types(doc_tokens, doc_tags)
    out = []
    for tokens, tags in zip(doc_tokens, doc_tags):
        new = list(tags)
        for s in spans(list(tags)):
            _retag(new, s.start, s.end, votes[tuple(tokens[s.start : s.end])])
        out.append(new)
    return out


def propagate(doc_tokens: Sequence[Tokens], doc_tags: Sequence[Sequence[str]]) -> list[list[str]]:
    """The document's tags plus every capitalised mention text tagged elsewhere in it, where it occurs untagged."""
    votes = {text: t for text, t in voted_types(doc_tokens, doc_tags).items() if text[0][:1].isupper()}
    by_length = sorted(votes, key=len, reverse=True)
    out = []
    for tokens, tags in zip(doc_tokens, doc_tags):
        new = list(tags)
        for text in by_length:
            n = len(text)
            for start in range(len(tokens) - n + 1):
                if tuple(tokens[start : start + n]) == text and all(t == "O" for t in new[start : start + n]):
                    _retag(new, start, start + n, votes[text])
        out.append(new)  # valid IOB2 still: a placed span starts with B-, and in IOB2 an O is never followed by I-
    return out


RULES = {"vote": vote_types, "propagate": propagate}  # --consistency names, applied in this order


def apply(
    sentences: Sequence[Tokens], documents: Sequence[int], tags: Sequence[Sequence[str]], rules: Sequence[str]
) -> list[list[str]]:
    """Per sentence, its tags after `rules` (names in RULES, in RULES' order) ran over each document in turn.
    `documents`: per sentence, its document's number; a document's sentences are consecutive."""
    out = [list(t) for t in tags]
    for name in [r for r in RULES if r in rules]:
        start = 0
        while start < len(sentences):
            end = start
            while end < len(sentences) and documents[end] == documents[start]:
                end += 1
            out[start:end] = RULES[name](sentences[start:end], out[start:end])
            start = end
    return out
