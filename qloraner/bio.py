"""IOB2 tags <-> entity mentions. Pure functions; the IOB2 rules are data, not branches."""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import NamedTuple

from qloraner import ENTITY_TYPES


class Entities(dict):
    """Mentions by type (a plain `dict[str, list[str]]`) that also keeps the order they were listed in.

    The canonical response lists mentions in sentence order; keeping that order lets the tagger
    tell apart one text tagged with two types ("Santa Fe" the place, then the company).
    """

    def __init__(self, pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]] = ()) -> None:
        super().__init__()
        self.listed: list[tuple[str, str]] = []
        for type_, mention in pairs:
            self.add(type_, mention)

    def add(self, type_: str, mention: str) -> None:
        self.setdefault(type_, []).append(mention)
        self.listed.append((type_, mention))


class Span(NamedTuple):
    type: str
    start: int  # first token
    end: int  # one past the last token


# May a tag of kind `I` with type X follow a tag of this kind whose type is (True) / is not (False) X?
# A tag that cannot continue starts a new chunk (IOB1 style); in valid IOB2 it must be a B-.
CONTINUES = {
    ("B", True): True,
    ("I", True): True,
    ("B", False): False,
    ("I", False): False,
    ("O", False): False,
}


def _split(tag: str) -> tuple[str, str]:
    return ("O", "") if tag == "O" else (tag[0], tag[2:])


def _continues(prev: str, tag: str) -> bool:
    """True when `tag` (an I- tag) continues the chunk that `prev` belongs to."""
    (prev_kind, prev_type), (_, cur_type) = _split(prev), _split(tag)
    return CONTINUES[(prev_kind, prev_kind != "O" and prev_type == cur_type)]


def to_iob2(tags: list[str] | tuple[str, ...]) -> list[str]:
    """Rewrite IOB1 (or already IOB2) tags as IOB2: an I- that starts a chunk becomes B-.

    >>> to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"])
    ['B-PER', 'I-PER', 'O', 'B-LOC', 'B-LOC']
    """
    out: list[str] = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and not _continues(prev, tag):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


_INSIDE = frozenset("BI")  # a chunk's first or middle tag, in every scheme
# Tag schemes, seqeval style: each prefix a scheme allows -> the prefixes of the tag before it that it continues
# when their types agree. A tag that continues nothing starts a chunk (B- in IOB2); E-/L- end one, S-/U- are a
# chunk of one token. IOB1 and IOB2 read alike: an IOB1 I- that starts a chunk continues nothing.
SCHEMES: dict[str, dict[str, frozenset[str]]] = {
    "iob1": {"B": frozenset(), "I": _INSIDE},
    "iob2": {"B": frozenset(), "I": _INSIDE},
    "bioes": {"B": frozenset(), "I": _INSIDE, "E": _INSIDE, "S": frozenset()},
    "bilou": {"B": frozenset(), "I": _INSIDE, "L": _INSIDE, "U": frozenset()},
}
SCHEME_OF_PREFIX = {"E": "bioes", "S": "bioes", "L": "bilou", "U": "bilou"}  # the prefixes that name their scheme
PREFIXES = "".join(sorted({p for allowed in SCHEMES.values() for p in allowed}))  # every prefix any scheme allows


def scheme_to_iob2(tags: list[str] | tuple[str, ...], scheme: str) -> list[str]:
    """Rewrite well-formed tags of `scheme` (a key of SCHEMES) as IOB2: a tag that continues the chunk of the tag
    before it becomes I-, any other B-. A chunk the scheme would not allow (an E- after O) is read leniently, as
    to_iob2 reads IOB1: it starts a chunk.

    >>> scheme_to_iob2(["S-PER", "B-LOC", "E-LOC", "E-LOC", "O", "I-ORG"], "bioes")
    ['B-PER', 'B-LOC', 'I-LOC', 'B-LOC', 'O', 'B-ORG']
    """
    continues = SCHEMES[scheme]
    out: list[str] = []
    prev_kind, prev_type = "O", ""
    for tag in tags:
        kind, type_ = _split(tag)
        if kind != "O":
            inside = prev_kind in continues[kind] and prev_type == type_
            tag = ("I-" if inside else "B-") + type_
        out.append(tag)
        prev_kind, prev_type = kind, type_
    return out


def is_valid_iob2(tags: list[str] | tuple[str, ...]) -> bool:
    """Every I-X directly follows B-X or I-X."""
    return all(not t.startswith("I-") or _continues(p, t) for p, t in zip(["O", *tags], tags))


def spans(tags: list[str] | tuple[str, ...]) -> list[Span]:
    """Chunks of IOB2 (or IOB1) tags, in sentence order."""
    found: list[Span] = []
    for i, tag in enumerate(to_iob2(tags)):
        kind, type_ = _split(tag)
        if kind == "B":
            found.append(Span(type_, i, i + 1))
        elif kind == "I":
            found[-1] = found[-1]._replace(end=i + 1)
    return found


def bio_to_entities(tokens: list[str] | tuple[str, ...], tags: list[str] | tuple[str, ...]) -> Entities:
    """Mentions by type, in sentence order, duplicates kept; tokens joined by one space."""
    return Entities([(s.type, " ".join(tokens[s.start : s.end])) for s in spans(tags)])


_PUNCT = string.punctuation + "“”‘’«»"


def _exact(text: str) -> str:
    return " ".join(text.split())


def _loose(text: str) -> str:
    return "".join(text.split()).casefold()


def _bare(text: str) -> str:
    return _loose(text).strip(_PUNCT)


# Ways to compare a mention with a token span, tried in this order: exact, then case and
# white space ignored, then also punctuation at either end ignored.
MATCHERS: tuple[tuple[Callable[[str], str], str], ...] = ((_exact, " "), (_loose, ""), (_bare, ""))


def _find(tokens: list[str], mention: str, claimed: list[bool]) -> Span | None:
    """First unclaimed token span matching `mention`, by the strictest matcher that finds one."""
    for norm, joiner in MATCHERS:
        target = norm(mention)
        if not target:
            return None
        for start in range(len(tokens)):
            text = ""
            for end in range(start + 1, len(tokens) + 1):
                if claimed[end - 1]:
                    break
                text = norm(joiner.join(tokens[start:end]))
                if text == target:
                    return Span("", start, end)
                if len(text) > len(target):
                    break
    return None


def entities_to_bio(
    tokens: list[str] | tuple[str, ...], entities: dict[str, list[str]], types: Sequence[str] = ENTITY_TYPES
) -> list[str]:
    """Tag each mention of one of `types` (a label set's; CoNLL-2003's by default) at its first unclaimed
    occurrence; longer mentions claim tokens first.

    Among mentions of equal length, the one listed first claims first: in `Entities.listed`
    order, else type by type in `types` order. Always returns len(tokens) valid IOB2
    tags. Repeated mentions tag successive occurrences; a mention found nowhere is dropped.

    >>> entities_to_bio("Peter Blackburn of the EU".split(), {"PER": ["Peter Blackburn"], "ORG": ["EU", "UN"]})
    ['B-PER', 'I-PER', 'O', 'O', 'B-ORG']
    """
    tokens = list(tokens)
    if isinstance(entities, Entities):
        listed = entities.listed
    else:
        listed = [(t, m) for t in types if isinstance(entities.get(t), (list, tuple)) for m in entities[t]]
    queue = [(t, m, rank) for rank, (t, m) in enumerate(listed) if t in types and isinstance(m, str)]
    queue.sort(key=lambda m: (-len(_loose(m[1])), m[2]))
    claimed = [False] * len(tokens)
    tags = ["O"] * len(tokens)
    for type_, mention, _ in queue:
        span = _find(tokens, mention, claimed)
        if span is None:
            continue
        for i in range(span.start, span.end):
            claimed[i] = True
            tags[i] = ("B-" if i == span.start else "I-") + type_
    return tags
