"""Model responses -> entities. `parse_response` is pure and total: it never raises.

Accepted: our canonical `[TYPE] mention` lines (tried first when the answer starts with one); the sentence
rewritten inline with `[TYPE mention]` brackets (up to the first blank line); a JSON object or Python dict repr (the
first `{...}` in the text), a value a list or one comma-joined string; lines of the forms `TYPE: a, b` (several such
groups on a line, split by `;` or `|`), `TYPE - a`, `mention (TYPE)`. A type is one of the label set's (CoNLL-2003's
LOC/MISC/ORG/PER by default) in any case, or for a CoNLL-2003 type of the set a full-word name for it (`Person`,
`organisations`, `Location names`). Line parsing stops at the first blank line after an entity line, so chatter after
the answer is ignored. The patterns that name types are built once per label set (`_grammar`).
"""

from __future__ import annotations

import ast
import functools
import json
import re
import string
from collections.abc import Callable, Sequence
from typing import NamedTuple

from qloraner import ENTITY_TYPES
from qloraner.bio import Entities, bio_to_entities, entities_to_bio, spans
from qloraner.labels import CONLL, LabelSet

MAX_CHARS = 20_000  # responses are bounded by max_new_tokens; this bounds pathological input
EMPTY_ANSWER = "[NONE]"
SYNONYMS = {  # CoNLL-2003's types by other names: read only for those of a label set's types
    **{t: t for t in ENTITY_TYPES},
    "LOCATION": "LOC",
    "LOCATIONS": "LOC",
    "PLACE": "LOC",
    "PLACES": "LOC",
    "MISCELLANEOUS": "MISC",
    "OTHER": "MISC",
    "ORGANIZATION": "ORG",
    "ORGANISATION": "ORG",
    "ORGANIZATIONS": "ORG",
    "ORGANISATIONS": "ORG",
    "PERSON": "PER",
    "PERSONS": "PER",
    "PEOPLE": "PER",
    "PERS": "PER",
}
NULLS = {"", "none", "null", "n/a", "na", "-", "[]", "nil", "no entities", "not found"}
_QUOTES = "\"'`*“”‘’ "
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_LABEL_TAIL = re.compile(r"\s+(?:NAMES?|ENTIT(?:Y|IES))$")  # "Person names", "ORG entities"


class _Grammar(NamedTuple):
    """What reads and writes answers for one label set: its names, and the patterns built from them."""

    synonyms: dict[str, str]  # upper-cased name -> type: the types themselves, and the CoNLL synonyms of theirs
    canonical: re.Pattern  # `[TYPE] mention`
    type_first: re.Pattern  # `TYPE: a, b`, `TYPE - a`, `TYPE = a`
    groups: re.Pattern  # `PER: a; LOC: b | ORG: c`: where a new group starts
    inline: re.Pattern  # `[PER Peter Blackburn]`, the `]` ending a word
    type_last: re.Pattern  # `mention (TYPE)`
    openers: dict[str, str]  # the words that open a mention in an inline answer: `[PER` -> PER
    look_alike: re.Pattern  # a token an inline answer escapes: an opener with any number of `[` before it


@functools.lru_cache(maxsize=32)
def _grammar(labels: LabelSet) -> _Grammar:
    """The patterns for `labels`; a type name's characters beyond letters (digits, `_`, `.`, `-`) join the
    name patterns' (for CoNLL-2003's set: letters only)."""
    extra = "".join(sorted(set("".join(labels.types)) - set(string.ascii_letters)))
    name = rf"[A-Za-z{re.escape(extra)}]+"
    longest = max(30, max(map(len, labels.types)) + len(" entities"))
    label = rf"[A-Za-z{re.escape(extra)}*\"'][A-Za-z{re.escape(extra)}*\"' ]{{0,{longest}}}?"  # maybe a few words
    return _Grammar(
        synonyms={k: t for k, t in SYNONYMS.items() if t in labels.types} | {t.upper(): t for t in labels.types},
        canonical=re.compile(rf"^\s*\[\s*({name})\s*\]\s*(.*?)\s*$"),
        type_first=re.compile(rf"^\s*({label})\s*(?::|\s-|=)\s*(.*?)\s*$"),
        groups=re.compile(rf"\s*[;|]\s*(?=(?:{label})\s*:)"),
        inline=re.compile(rf"\[({name}) ([^\n]+?)\](?=\s|$)"),
        type_last=re.compile(rf"^\s*(.+?)\s*\(\s*({name})\s*\)\s*[.,;]?\s*$"),
        openers={f"[{t}": t for t in labels.types},
        look_alike=re.compile(r"\[+(?:" + "|".join(map(re.escape, labels.types)) + ")"),
    )


def canonical_type(name: object, labels: LabelSet = CONLL) -> str | None:
    """The type of `labels` that a name means: the type's own name in any case, or for a CoNLL-2003 type of the set
    a synonym; with or without a trailing 'names'/'entities'; else None.

    >>> [canonical_type(n) for n in ("per", "Organisations", "Location names", "date")]
    ['PER', 'ORG', 'LOC', None]
    """
    if not isinstance(name, str):
        return None
    synonyms = _grammar(labels).synonyms
    key = " ".join(name.strip(_QUOTES).upper().split())
    return synonyms.get(key) or synonyms.get(_LABEL_TAIL.sub("", key))


def _clean(value: object) -> str | None:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        return None
    text = " ".join(str(value).split()).strip(_QUOTES)
    return None if text.casefold() in NULLS else text


def _values(raw: object) -> list[str]:
    """A JSON/dict value -> mentions: a list of strings or numbers, one string (comma-joined mentions), or None."""
    items = (
        raw if isinstance(raw, (list, tuple, set)) else re.split(r"\s*[,;]\s*", raw) if isinstance(raw, str) else [raw]
    )
    return [v for v in map(_clean, items) if v is not None]


def _first_braced(text: str) -> str | None:
    """The first balanced `{...}` in text, ignoring braces inside quotes."""
    start = text.find("{")
    if start < 0:
        return None
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if escaped:
            escaped = False
        elif quote:
            escaped, quote = ch == "\\", "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "{}":
            depth += 1 if ch == "{" else -1
            if depth == 0:
                return text[start : i + 1]
    return None


def _literal(text: str) -> object:
    for load in (json.loads, ast.literal_eval):
        try:
            return load(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def _from_structure(obj: object, out: Entities, labels: LabelSet) -> None:
    """Walk dicts and lists: {TYPE: mentions} pairs, or {type: T, text: m} records."""
    if isinstance(obj, dict):
        kind = next((canonical_type(obj[k], labels) for k in ("type", "label", "entity_type") if k in obj), None)
        text = next((obj[k] for k in ("text", "entity", "name", "mention", "word") if k in obj), None)
        if kind and text is not None:
            for mention in _values(text):
                out.add(kind, mention)
            return
        for key, value in obj.items():
            type_ = canonical_type(key, labels)
            if type_:
                for mention in _values(value):
                    out.add(type_, mention)
            else:
                _from_structure(value, out, labels)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _from_structure(item, out, labels)


def _split_values(text: str) -> list[str]:
    if text.startswith("["):
        parsed = _literal(text)
        if isinstance(parsed, list):
            return _values(parsed)
    return _values(text)


def _line_entities(line: str, labels: LabelSet) -> list[tuple[str, str]]:
    """Entities on one line, in any accepted line form (canonical first)."""
    grammar = _grammar(labels)
    line = _BULLET.sub("", line)
    if m := grammar.canonical.match(line):
        type_, mention = canonical_type(m[1], labels), " ".join(m[2].split())  # kept verbatim: it is our format
        return [(type_, mention)] if type_ and mention else []
    groups = grammar.groups.split(line)
    if len(groups) > 1 and all((m := grammar.type_first.match(g)) and canonical_type(m[1], labels) for g in groups):
        return [pair for g in groups for pair in _line_entities(g, labels)]
    if (m := grammar.type_first.match(line)) and (type_ := canonical_type(m[1], labels)):
        return [(type_, v) for v in _split_values(m[2])]
    if (m := grammar.type_last.match(line)) and (type_ := canonical_type(m[2], labels)) and (mention := _clean(m[1])):
        return [(type_, mention)]
    return []


def parse_response(text: str, labels: LabelSet = CONLL) -> Entities:
    r"""Entities by type (only the types of `labels`), mentions in listed order. Never raises.

    >>> dict(parse_response("[ORG] EU\n[MISC] German\n[MISC] British\n\nThese are all."))
    {'ORG': ['EU'], 'MISC': ['German', 'British']}
    >>> dict(parse_response("[ORG EU] rejects [MISC German] call to boycott [MISC British] lamb ."))
    {'ORG': ['EU'], 'MISC': ['German', 'British']}
    """
    out = Entities()
    if not isinstance(text, str):
        return out
    text = text[:MAX_CHARS]
    grammar = _grammar(labels)
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    if not grammar.canonical.match(first_line):  # our own formats win over braces inside a mention
        for type_, mention in grammar.inline.findall(text.strip().split("\n\n")[0]):
            if (canonical := canonical_type(type_, labels)) is not None and mention.strip():
                out.add(canonical, mention.strip())
        if out:
            return out
        braced = _first_braced(text)
        if braced is not None and isinstance(structure := _literal(braced), (dict, list)):
            _from_structure(structure, out, labels)
            if out or not text[: text.find("{")].strip():
                return out
    for line in text.splitlines():
        if not line.strip():
            if out:
                break  # a blank line after the answer: what follows is chatter
            continue
        for type_, mention in _line_entities(line, labels):
            out.add(type_, mention)
    return out


def is_explicit_empty(text: str) -> bool:
    """The response says 'no entities' in a form we accept (so it is no parse failure)."""
    if not isinstance(text, str):
        return False
    blocks = [b.strip() for b in text.strip().split("\n\n") if b.strip()]
    head = blocks[0] if blocks else ""
    first, _, rest = head.partition("\n")
    if first.rstrip().endswith(":"):  # a preamble ('Entities:'), skipped as parse_response skips it
        head = rest.strip() or (blocks[1] if len(blocks) > 1 else "")
        if not head:
            return False  # a preamble and no answer
    return head.upper() == EMPTY_ANSWER or head.strip(".").casefold() in NULLS | {"{}"}


def ends_answer(labels: LabelSet = CONLL) -> Callable[[str], bool]:
    """The decoding engine's stop test for a blank line just written: does the text so far hold an answer with
    `labels`' types, or say there is none? (A preamble such as 'The entities are:' does not end it.)"""

    def ended(text: str) -> bool:
        return bool(parse_response(text, labels)) or is_explicit_empty(text)

    return ended


def render_lines(entities: Entities) -> str:
    """`[TYPE] mention` per line, in listed order; EMPTY_ANSWER when there are none."""
    return "\n".join(f"[{t}] {m}" for t, m in entities.listed) or EMPTY_ANSWER


def render_json(entities: Entities) -> str:
    """{"TYPE": [mentions in order], ...}, types in order of first mention; {} when there are none."""
    return json.dumps(dict(entities), ensure_ascii=False)


def _inline_word(token: str, labels: LabelSet) -> str:
    """A token as an inline answer writes it: with one `[` more when it reads as an opener (`[PER` -> `[[PER`, `[[PER`
    -> `[[[PER`), so that no token can pass for the start of a mention, and one answer has one reading."""
    return "[" + token if _grammar(labels).look_alike.fullmatch(token) else token


def render_inline(tokens: Sequence[str], tags: Sequence[str], labels: LabelSet = CONLL) -> str:
    """The sentence with each entity bracketed as `[TYPE mention]`; EMPTY_ANSWER when there are none. A token that
    reads as an opener (`[PER`) gets one `[` more (see _inline_word).

    >>> render_inline("EU rejects German call".split(), ["B-ORG", "O", "B-MISC", "O"])
    '[ORG EU] rejects [MISC German] call'
    """
    words = [_inline_word(t, labels) for t in tokens]
    found = spans(tags)
    for type_, start, end in found:
        words[start] = f"[{type_} {words[start]}"
        words[end - 1] += "]"
    return " ".join(words) if found else EMPTY_ANSWER


# Response formats a model can be trained to give, from a sentence's tokens, gold tags and label set; parse_response
# reads all.
RENDERERS: dict[str, Callable[[Sequence[str], Sequence[str], LabelSet], str]] = {
    "lines": lambda tokens, tags, labels: render_lines(bio_to_entities(tokens, tags)),  # canonical: sentence order
    "json": lambda tokens, tags, labels: render_json(bio_to_entities(tokens, tags)),  # grouped by type
    "inline": render_inline,  # the sentence itself, every mention aligned to its tokens
}


def render_response(
    tokens: Sequence[str], tags: Sequence[str], response_format: str = "lines", labels: LabelSet = CONLL
) -> str:
    """The training target for a sentence with gold `tags` in one of RENDERERS' formats; `labels` decides which
    tokens an inline answer escapes."""
    return RENDERERS[response_format](tokens, tags, labels)


def inline_tags(tokens: Sequence[str], text: str, labels: LabelSet = CONLL) -> list[str] | None:
    """Tags of an inline answer read word by word against the tokens: `[TYPE` opens a mention, a token's word with
    one `]` more closes it (render_inline's words, exactly). None when the answer is not one line that aligns so,
    or tags nothing. Tokens holding brackets stay tokens: the tokens are known, so only openers need telling apart,
    and render_inline writes no token as one.

    >>> inline_tags(["[PER", "Mary]", "said"], "[[PER [PER Mary]] said")
    ['O', 'B-PER', 'O']
    """
    openers = _grammar(labels).openers
    lines = [line for line in str(text).strip().split("\n\n")[0].splitlines() if line.strip()]
    words = lines[0].split() if len(lines) == 1 else []
    tags, kind, w = [], "", 0
    for token in (_inline_word(t, labels) for t in tokens):
        begins = not kind and w < len(words) and words[w] in openers
        if begins:
            kind, w = openers[words[w]], w + 1
        word = words[w] if w < len(words) else None
        if word not in (token, kind and token + "]"):
            return None
        tags.append(f"{'B' if begins else 'I'}-{kind}" if kind else "O")
        kind, w = ("" if word != token else kind), w + 1
    return tags if w == len(words) and not kind and any(t != "O" for t in tags) else None


def tag_response(tokens: Sequence[str], text: str, labels: LabelSet = CONLL) -> list[str]:
    """IOB2 tags of a response for the sentence's tokens, of the types of `labels`: an inline answer aligned to them
    word by word (inline_tags), else its parsed entities found in them (bio.entities_to_bio)."""
    return inline_tags(tokens, text, labels) or entities_to_bio(tokens, parse_response(text, labels), labels.types)
