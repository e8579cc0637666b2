"""The label set: the entity types a model learns to tag (read from its training data) and the one-line descriptions
its prompt gives them. A value, passed explicitly: the prompt, the parser, the tagger and the metrics each take one."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from qloraner import ENTITY_TYPES, QloranerError

TYPE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")  # a letter first: `[TYPE` must read as a word of the answer
RESERVED = ("NONE",)  # `[NONE]` is the empty answer
# CoNLL-2003's types in the words today's prompts use, in the order the `typed` and `fewshot` prompts give them.
CONLL_MEANINGS = (
    ("LOC", "locations (countries, cities, regions, rivers)"),
    ("ORG", "organisations (companies, teams, institutions, agencies)"),
    ("PER", "people"),
    ("MISC", "other names (nationalities, events, languages, products, works)"),
)


def name_errors(names: Iterable[object]) -> list[str]:
    """One error per type name that a prompt and its answers cannot carry: not a word of letters, digits, `_`, `.`
    and `-` starting with a letter (at most 40), the empty answer's NONE, or another name but for its letter case."""
    errors, seen = [], {}
    for name in names:
        if not isinstance(name, str) or not TYPE_NAME.fullmatch(name):
            errors.append(f"entity type {name!r}: use a letter, then letters, digits, _, . or - (at most 40)")
        elif name.upper() in RESERVED:
            errors.append(f"entity type {name!r}: reserved ([{name.upper()}] is the empty answer)")
        elif name.upper() in seen and seen[name.upper()] != name:
            errors.append(f"entity types {seen[name.upper()]!r} and {name!r} differ only in letter case")
        else:
            seen[name.upper()] = name
    return errors


def description_errors(descriptions: object) -> list[str]:
    """Errors of a recipe's `[labels]` section: a table of type names to one-line descriptions ("": none)."""
    if not isinstance(descriptions, Mapping):
        return [f'labels: a table of TYPE = "description" lines, not {type(descriptions).__name__}']
    errors = [f"labels: {e}" for e in name_errors(descriptions)]
    errors += [
        f"labels: {name} = {text!r} is not one line of text"
        for name, text in descriptions.items()
        if not isinstance(text, str) or "\n" in text or "\r" in text
    ]
    return errors


def types_seen(tag_rows: Iterable[Sequence[str]]) -> tuple[str, ...]:
    """The entity types that IOB tags name, sorted.

    >>> types_seen([["B-PER", "I-PER", "O"], ["B-LOC", "B-PER"]])
    ('LOC', 'PER')
    """
    return tuple(sorted({tag[2:] for row in tag_rows for tag in row if tag != "O"}))


@dataclass(frozen=True)
class LabelSet:
    """Entity types and the descriptions the prompt gives them; hashable, so derived regexes can be cached on it."""

    types: tuple[str, ...]  # sorted: the order the prompt's rules list them in
    meanings: tuple[tuple[str, str], ...] = ()  # (type, one-line description), in the order the prompt gives them

    def __post_init__(self) -> None:
        errors = name_errors(self.types)
        if not self.types:
            errors.append("no entity types (every tag is O)")
        if tuple(sorted(set(self.types))) != self.types:
            errors.append(f"types {self.types!r} are not sorted and distinct")
        errors += [f"a description of {t!r}, not one of the types" for t, _ in self.meanings if t not in self.types]
        if errors:
            raise QloranerError("label set: " + "; ".join(errors))

    @classmethod
    def from_data(cls, types: Iterable[str], descriptions: Mapping[str, str] | None = None) -> LabelSet:
        """The label set of the types seen in training data: each described by `descriptions` (a recipe's
        `[labels]`, in its order) where it names the type, else, for a CoNLL-2003 type, by today's words for it.
        Descriptions of types the data lacks are left out."""
        kept = tuple(sorted(set(types)))
        given = {t: d for t, d in (descriptions or {}).items() if t in kept}
        defaults = {t: d for t, d in CONLL_MEANINGS if t in kept and t not in given}
        return cls(kept, tuple({**given, **defaults}.items()))

    @classmethod
    def from_saved(cls, saved: Mapping[str, str] | None) -> LabelSet:
        """The label set an adapter's settings recorded (to_saved's form); None, from an adapter that predates
        label sets, is CoNLL-2003's."""
        if saved is None:
            return CONLL
        return cls(tuple(sorted(saved)), tuple((t, d) for t, d in saved.items() if d))

    def to_saved(self) -> dict[str, str]:
        """{type: description} for every type, the described first in the prompt's order, "" for none (JSON keeps
        the order)."""
        return dict(self.meanings) | {t: "" for t in self.types if t not in dict(self.meanings)}

    @property
    def listed(self) -> str:
        """The types as the prompt's rules list them: `LOC, MISC, ORG, PER`."""
        return ", ".join(self.types)

    def describe(self) -> str:
        """The `typed` and `fewshot` prompts' line of types: each described one as `TYPE = description`, then the
        others by name."""
        described = dict(self.meanings)
        parts = [f"{t} = {d}" for t, d in self.meanings] + [t for t in self.types if t not in described]
        return "Types: " + "; ".join(parts) + "."


CONLL = LabelSet(ENTITY_TYPES, CONLL_MEANINGS)  # CoNLL-2003's four types: the default, and old adapters' set
