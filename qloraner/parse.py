"""Model responses -> entities. `parse_response` is pure and total: it never raises.

Accepted: our canonical `[TYPE] mention` lines (tried first when the answer starts with one); the sentence
rewritten inline with `[TYPE mention]` brackets (up to the first blank line); a JSON object or Python dict repr (the
first `{...}` in the text), a value a list or one comma-joined string; lines of the forms `TYPE: a, b` (several such
groups on a line, split by `;` or `|`), `TYPE - a`, `mention (TYPE)`. A type is LOC/MISC/ORG/PER or a full-word name
for one (`Person`, `organisations`, `Location names`) in any case. Line parsing stops at the first blank line after an
entity line, so chatter after the answer is ignored.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence

from qloraner import ENTITY_TYPES
from qloraner.bio import Entities, bio_to_entities, entities_to_bio, spans

MAX_CHARS = 20_000  # responses are bounded by max_new_tokens; this bounds pathological input
EMPTY_ANSWER = "[NONE]"
SYNONYMS = {
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
_CANONICAL = re.compile(r"^\s*\[\s*([A-Za-z]+)\s*\]\s*(.*?)\s*$")
_LABEL = r"[A-Za-z*\"'][A-Za-z*\"' ]{0,30}?"  # a type name, maybe of a few words ("Person names")
_TYPE_FIRST = re.compile(rf"^\s*({_LABEL})\s*(?::|\s-|=)\s*(.*?)\s*$")
_GROUPS = re.compile(rf"\s*[;|]\s*(?=(?:{_LABEL})\s*:)")  # `PER: a; LOC: b | ORG: c`: where a new group starts
_LABEL_TAIL = re.compile(r"\s+(?:NAMES?|ENTIT(?:Y|IES))$")  # "Person names", "ORG entities"
_INLINE = re.compile(r"\[([A-Za-z]+) ([^\n]+?)\](?=\s|$)")  # `[PER Peter Blackburn]`, the `]` ending a word
_TYPE_LAST = re.compile(r"^\s*(.+?)\s*\(\s*([A-Za-z]+)\s*\)\s*[.,;]?\s*$")


def canonical_type(name: object) -> str | None:
    """LOC/MISC/ORG/PER for a type name or synonym in any case, with or without a trailing 'names'/'entities',
    else None.

    >>> [canonical_type(n) for n in ("per", "Organisations", "Location names", "date")]
    ['PER', 'ORG', 'LOC', None]
    """
    if not isinstance(name, str):
        return None
    key = " ".join(name.strip(_QUOTES).upper().split())
    return SYNONYMS.get(key) or SYNONYMS.get(_LABEL_TAIL.sub("", key))


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


def _from_structure(obj: object, out: Entities) -> None:
    """Walk dicts and lists: {TYPE: mentions} pairs, or {type: T, text: m} records."""
    if isinstance(obj, dict):
        kind = next((canonical_type(obj[k]) for k in ("type", "label", "entity_type") if k in obj), None)
        text = next((obj[k] for k in ("text", "entity", "name", "mention", "word") if k in obj), None)
        if kind and text is not None:
            for mention in _values(text):
                out.add(kind, mention)
            return
        for key, value in obj.items():
            type_ = canonical_type(key)
            if type_:
                for mention in _values(value):
                    out.add(type_, mention)
            else:
                _from_structure(value, out)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _from_structure(item, out)


def _split_values(text: str) -> list[str]:
    if text.startswith("["):
        parsed = _literal(text)
        if isinstance(parsed, list):
            return _values(parsed)
    return _values(text)


def _line_entities(line: str) -> list[tuple[str, str]]:
    """Entities on one line, in any accepted line form (canonical first)."""
    line = _BULLET.sub("", line)
    if m := _CANONICAL.match(line):
        type_, mention = canonical_type(m[1]), " ".join(m[2].split())  # kept verbatim: it is our format
        return [(type_, mention)] if type_ and mention else []
    groups = _GROUPS.split(line)
    if len(groups) > 1 and all((m := _TYPE_FIRST.match(g)) and canonical_type(m[1]) for g in groups):
        return [pair for g in groups for pair in _line_entities(g)]
    if (m := _TYPE_FIRST.match(line)) and (type_ := canonical_type(m[1])):
        return [(type_, v) for v in _split_values(m[2])]
    if (m := _TYPE_LAST.match(line)) and (type_ := canonical_type(m[2])) and (mention := _clean(m[1])):
        return [(type_, mention)]
    return []


def parse_response(text: str) -> Entities:
    r"""Entities by type (only LOC, MISC, ORG, PER), mentions in listed order. Never raises.

    >>> dict(parse_response("[ORG] EU\n[MISC] German\n[MISC] British\n\nThese are all."))
    {'ORG': ['EU'], 'MISC': ['German', 'British']}
    >>> dict(parse_response("[ORG EU] rejects [MISC German] call to boycott [MISC British] lamb ."))
    {'ORG': ['EU'], 'MISC': ['German', 'British']}
    """
    out = Entities()
    if not isinstance(text, str):
        return out
    text = text[:MAX_CHARS]
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    if not _CANONICAL.match(first_line):  # our own formats win over braces inside a mention
        for type_, mention in _INLINE.findall(text.strip().split("\n\n")[0]):
            if (canonical := canonical_type(type_)) is not None and mention.strip():
                out.add(canonical, mention.strip())
        if out:
            return out
        braced = _first_braced(text)
        if braced is not None and isinstance(structure := _literal(braced), (dict, list)):
            _from_structure(structure, out)
            if out or not text[: text.find("{")].strip():
                return out
    for line in text.splitlines():
        if not line.strip():
            if out:
                break  # a blank line after the answer: what follows is chatter
            continue
        for type_, mention in _line_entities(line):
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


def render_lines(entities: Entities) -> str:
    """`[TYPE] mention` per line, in listed order; EMPTY_ANSWER when there are none."""
    return "\n".join(f"[{t}] {m}" for t, m in entities.listed) or EMPTY_ANSWER


def render_json(entities: Entities) -> str:
    """{"TYPE": [mentions in order], ...}, types in order of first mention; {} when there are none."""
    return json.dumps(dict(entities), ensure_ascii=False)


_OPENERS = {f"[{t}": t for t in ENTITY_TYPES}  # the words that open a mention in an inline answer
_LOOK_ALIKE = re.compile(r"\[+(?:" + "|".join(ENTITY_TYPES) + ")")


def _inline_word(token: str) -> str:
    """A token as an inline answer writes it: with one `[` more when it reads as an opener (`[PER` -> `[[PER`, `[[PER`
    -> `[[[PER`), so that no token can pass for the start of a mention, and one answer has one reading."""
    return "[" + token if _LOOK_ALIKE.fullmatch(token) else token


def render_inline(tokens: Sequence[str], tags: Sequence[str]) -> str:
    """The sentence with each entity bracketed as `[TYPE mention]`; EMPTY_ANSWER when there are none. A token that
    reads as an opener (`[PER`) gets one `[` more (see _inline_word).

    >>> render_inline("EU rejects German call".split(), ["B-ORG", "O", "B-MISC", "O"])
    '[ORG EU] rejects [MISC German] call'
    """
    words = [_inline_word(t) for t in tokens]
    found = spans(tags)
    for type_, start, end in found:
        words[start] = f"[{type_} {words[start]}"
        words[end - 1] += "]"
    return " ".join(words) if found else EMPTY_ANSWER


# Response formats a model can be trained to give, from a sentence's tokens and gold tags; parse_response reads all.
RENDERERS: dict[str, Callable[[Sequence[str], Sequence[str]], str]] = {
    "lines": lambda tokens, tags: render_lines(bio_to_entities(tokens, tags)),  # canonical: sentence order
    "json": lambda tokens, tags: render_json(bio_to_entities(tokens, tags)),  # grouped by type: order across lost
    "inline": render_inline,  # the sentence itself, every mention aligned to its tokens
}


def render_response(tokens: Sequence[str], tags: Sequence[str], response_format: str = "lines") -> str:
    """The training target for a sentence with gold `tags` in one of RENDERERS' formats."""
    return RENDERERS[response_format](tokens, tags)


def inline_tags(tokens: Sequence[str], text: str) -> list[str] | None:
    """Tags of an inline answer read word by word against the tokens: `[TYPE` opens a mention, a token's word with
    one `]` more closes it (render_inline's words, exactly). None when the answer is not one line that aligns so,
    or tags nothing. Tokens holding brackets stay tokens: the tokens are known, so only openers need telling apart,
    and render_inline writes no token as one.

    >>> inline_tags(["[PER", "Mary]", "said"], "[[PER [PER Mary]] said")
    ['O', 'B-PER', 'O']
    """
    lines = [line for line in str(text).strip().split("\n\n")[0].splitlines() if line.strip()]
    words = lines[0].split() if len(lines) == 1 else []
    tags, kind, w = [], "", 0
    for token in map(_inline_word, tokens):
        begins = not kind and w < len(words) and words[w] in _OPENERS
        if begins:
            kind, w = _OPENERS[words[w]], w + 1
        word = words[w] if w < len(words) else None
        if word not in (token, kind and token + "]"):
            return None
        tags.append(f"{'B' if begins else 'I'}-{kind}" if kind else "O")
        kind, w = ("" if word != token else kind), w + 1
    return tags if w == len(words) and not kind and any(t != "O" for t in tags) else None


def tag_response(tokens: Sequence[str], text: str) -> list[str]:
    """IOB2 tags of a response for the sentence's tokens: an inline answer aligned to them word by word
    (inline_tags), else its parsed entities found in them (bio.entities_to_bio)."""
    return inline_tags(tokens, text) or entities_to_bio(tokens, parse_response(text))
