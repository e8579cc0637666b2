"""Hypothesis strategies shared by the tests. Valid inputs are built directly, never filtered."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from qloraner import ENTITY_TYPES
from qloraner.labels import RESERVED, LabelSet

# No digits here: only entity heads carry digits, so no other token can equal a head.
WORD_CHARS = string.ascii_letters + string.punctuation + "éüßØ“”’"
word = st.text(alphabet=WORD_CHARS, min_size=1, max_size=6)
inline_word = st.text(alphabet=WORD_CHARS.replace("[", "").replace("]", ""), min_size=1, max_size=6)
entity_type = st.sampled_from(ENTITY_TYPES)
# Tokens holding the inline format's own brackets, as user data may: an opener's look-alike, halves of a mention.
BRACKET_TOKENS = ("[PER", "[LOC", "[MISC", "[ORG", "[[PER", "[", "]", "]]", "[PER]", "Mary]", "[Mary", "[NONE]")
bracket_word = st.one_of(word, st.sampled_from(BRACKET_TOKENS))


# Label sets of 1 to 12 types with random upper-case names (the empty answer's NONE gets a letter more).
label_type_name = st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=8).map(
    lambda n: n + "X" if n in RESERVED else n
)
label_set = st.lists(label_type_name, min_size=1, max_size=12, unique=True).map(lambda ts: LabelSet(tuple(sorted(ts))))


@st.composite
def tagged_sentence(draw, word=word, entity_type=entity_type) -> tuple[list[str], list[str]]:
    """Tokens with valid IOB2 tags whose mentions the canonical round trip must recover.

    Each distinct mention starts with a head token (letters + its own number) that appears
    nowhere else, so every mention text occurs only where that mention is tagged. Mentions
    repeat, one text may carry several types, and entities may touch (adjacent, same type). `word`: the strategy
    of one token; `entity_type`: the strategy of one type.
    """
    n_mentions = draw(st.integers(1, 5))
    mentions = [[f"{draw(word)}{i}", *draw(st.lists(word, max_size=3))] for i in range(n_mentions)]
    segments = draw(
        st.lists(
            st.one_of(
                st.tuples(st.none(), st.lists(word, min_size=1, max_size=3)),  # None: outside (a type may be "O")
                st.tuples(entity_type, st.integers(0, n_mentions - 1)),
            ),
            max_size=12,
        )
    )
    tokens: list[str] = []
    tags: list[str] = []
    for kind, value in segments:
        seg = value if kind is None else mentions[value]
        tokens += seg
        tags += ["O"] * len(seg) if kind is None else [f"B-{kind}"] + [f"I-{kind}"] * (len(seg) - 1)
    return tokens, tags


any_tag = st.one_of(st.just("O"), st.builds(lambda p, t: f"{p}-{t}", st.sampled_from("BI"), entity_type))
tag_sequence = st.lists(any_tag, max_size=30)  # IOB1 or broken IOB2 alike


@st.composite
def valid_iob2(draw, length: int | None = None, entity_type=entity_type) -> list[str]:
    """Valid IOB2 tags, built by continuing only where the rules allow it."""
    n = draw(st.integers(0, 30)) if length is None else length
    tags: list[str] = []
    for _ in range(n):
        choice = draw(st.sampled_from(("O", "B", "I")))
        if choice == "I" and tags and tags[-1] != "O":
            tags.append("I-" + tags[-1][2:])
        else:
            tags.append("O" if choice == "O" else "B-" + draw(entity_type))
    return tags


@st.composite
def gold_and_pred(draw, entity_type=entity_type) -> tuple[list[list[str]], list[list[str]]]:
    """Two corpora of valid IOB2 tags with equal sentence lengths, of the types `entity_type` draws."""
    lengths = draw(st.lists(st.integers(0, 15), min_size=1, max_size=8))
    return [draw(valid_iob2(n, entity_type)) for n in lengths], [draw(valid_iob2(n, entity_type)) for n in lengths]


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=10)
    | st.sampled_from(("LOC", "person", "Org", "misc")),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(("PER", "type", "text")), kids, max_size=4),
    max_leaves=12,
)

# Mentions end in a digit, so none is a null word ("None", "N/A") that means "no entity", and hold no separator.
mention = st.text(st.characters(categories=("L", "N")), max_size=8).map(lambda s: s + "7")
_NAMES = {
    "LOC": ["LOC", "Location", "locations", "Location names"],
    "MISC": ["MISC", "Miscellaneous", "other"],
    "ORG": ["ORG", "Organization", "organisations", "ORG entities"],
    "PER": ["PER", "Person", "people"],
}


@st.composite
def type_name(draw, type_: str) -> str:
    """A name the parser must read as `type_`: its tag or a full-word synonym, in any letter case."""
    name = draw(st.sampled_from(_NAMES[type_]))
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)


# Raw text for the sentence splitter and tokenizer: any Unicode, plus the pieces that break tokenizers (odd whitespace,
# brackets, quotes, periods, hyphens, apostrophes, emoji with joiners and variation selectors), often side by side.
_NASTY = [
    " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\u00a0", "\u2028", "\u200b", "\x1c", "\x85", "\u3000",
    "(", ")", "[", "]", "{", "}", "<", ">", "\"", "'", "’", "“", "”", ".", "...", ",", ";", ":", "!", "?", "-", "—",
    "_", "U.S.", "Dr.", "Peter", "'s", "n't", "AL-AIN", "McDonald", "1996-12-06", "😀", "❤️", "👨‍👩‍👧", "é", "\ufe0f",
]  # fmt: skip
raw_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.sampled_from(_NASTY), st.text(max_size=3)), max_size=25).map("".join),
)


# Entity types of a user's own data: any non-empty name without white space (a hyphen, lower case, digits too).
free_type = st.one_of(
    entity_type, st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=6)
)
# A chunk of `length` tokens in each tag scheme, its prefixes; `touching`: right after a chunk of its own type.
SCHEME_CHUNKS = {
    "iob2": lambda length, touching: ["B"] + ["I"] * (length - 1),
    "iob1": lambda length, touching: ["B" if touching else "I"] + ["I"] * (length - 1),
    "bioes": lambda length, touching: ["S"] if length == 1 else ["B"] + ["I"] * (length - 2) + ["E"],
    "bilou": lambda length, touching: ["U"] if length == 1 else ["B"] + ["I"] * (length - 2) + ["L"],
}


@st.composite
def scheme_tags(draw, scheme: str, length: int | None = None) -> tuple[list[str], list[str]]:
    """(IOB2 tags, the same chunks written in `scheme`): runs of O and chunks of any types, chunks often touching
    (the same type or another). `length`: the number of tags, else any up to 30."""
    n = draw(st.integers(0, 30)) if length is None else length
    iob2: list[str] = []
    written: list[str] = []
    while len(iob2) < n:
        size = draw(st.integers(1, min(4, n - len(iob2))))
        if draw(st.booleans()):
            iob2 += ["O"] * size
            written += ["O"] * size
            continue
        type_ = draw(free_type)
        touching = bool(iob2) and iob2[-1] != "O" and iob2[-1][2:] == type_
        iob2 += [f"B-{type_}"] + [f"I-{type_}"] * (size - 1)
        written += [f"{p}-{type_}" for p in SCHEME_CHUNKS[scheme](size, touching)]
    return iob2, written


@st.composite
def span_document(draw) -> tuple[str, list[tuple[int, int, str]]]:
    """A text (raw_text, or words) and spans that start and end on its tokens (qloraner.text's), none overlapping,
    some touching, some across a sentence end; sorted."""
    from qloraner.text import tokenize

    text = draw(
        st.one_of(raw_text, st.lists(st.one_of(word, st.sampled_from((". ", "\n\n"))), max_size=20).map(" ".join))
    )
    tokens = tokenize(text)
    found: list[tuple[int, int, str]] = []
    at = 0
    while at < len(tokens):
        at += draw(st.integers(0, 3))  # tokens left out
        if at >= len(tokens):
            break
        end = draw(st.integers(at + 1, min(at + 4, len(tokens))))
        found.append((tokens[at].start, tokens[end - 1].end, draw(free_type)))
        at = end
    return text, found
