"""The prompt templates, and how a prompt is fitted to a token budget (training's and evaluation's one policy)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from qloraner import QloranerError
from qloraner.labels import CONLL, LabelSet, types_seen
from qloraner.parse import RENDERERS, render_response

FORMAT_RULES = {  # `{types}`: the label set's types, listed (CoNLL-2003's: LOC, MISC, ORG, PER)
    "lines": "List each entity on its own line as [TYPE] mention, in the order they occur, with TYPE one of "
    "{types}. If there are none, answer [NONE].",
    "json": "Answer with one JSON object that maps each type ({types}) to the list of its mentions, "
    "in the order they occur; leave out types without mentions. If there are none, answer {{}}.",
    "inline": "Rewrite the sentence with each entity in brackets as [TYPE mention], with TYPE one of {types}. "
    "If there are none, answer [NONE].",
}  # one per parse.RENDERERS format
_EXAMPLE = ("EU rejects German call to boycott British lamb .".split(), "B-ORG O B-MISC O O O B-MISC O O".split())


@functools.lru_cache(maxsize=64)
def _example(labels: LabelSet, response_format: str) -> str:
    """The few-shot example (a new line, then the sentence and its answer in `response_format`) where its types
    (ORG, MISC) are all of the label set; else nothing: an example must not tag a type the model does not learn,
    nor leave one of its mentions untagged."""
    if not set(types_seen([_EXAMPLE[1]])) <= set(labels.types):
        return ""
    answer = render_response(*_EXAMPLE, response_format, labels)
    return f"\nExample sentence: {' '.join(_EXAMPLE[0])}\nExample answer:\n{answer}"


# The prompt ends in a newline, so no tokenizer merges its last token with the response's first.
# A change to a template or rule: bump data.FORMAT_VERSION, so cached instruction data is rebuilt.
_ASK = "### Instruction:\nExtract named entities from the sentence. {rules}"
_TAIL = "\n\n### Sentence:\n{sentence}\n\n### Response:\n"
TEMPLATES = {
    "simple": _ASK + _TAIL,
    "typed": _ASK + "\n{types}" + _TAIL,
    "fewshot": _ASK + "\n{types}{example}" + _TAIL,
    # the neighbouring sentences of the same document, for the names they share with it; answer for the sentence
    "context": _ASK + " Answer for the sentence only.\n\n### Context:\n{context}" + _TAIL,
}


def build_prompt(
    tokens: tuple[str, ...] | list[str],
    template: str,
    response_format: str = "lines",
    context: str = "",
    labels: LabelSet = CONLL,
) -> str:
    """The prompt for one sentence; its rules (and the few-shot example's answer) ask for `response_format` and the
    types of `labels` (their descriptions in `typed` and `fewshot`). `context` (its document's neighbouring
    sentences) shows only in the `context` template."""
    if template not in TEMPLATES:
        raise QloranerError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if response_format not in RENDERERS:
        raise QloranerError(f"unknown response format {response_format!r}; choose one of {', '.join(RENDERERS)}")
    return TEMPLATES[template].format(
        rules=FORMAT_RULES[response_format].format(types=labels.listed),
        types=labels.describe(),
        example=_example(labels, response_format),
        sentence=" ".join(tokens),
        context=context or "(none)",
    )


Built = TypeVar("Built")  # what a fit builds: prompt ids (evaluation), an encoded example (training)


class Fitted(NamedTuple, Generic[Built]):
    """fit's answer: what was built last, and from what."""

    built: Built
    words: int  # the sentence's words it holds, from the first
    context: bool  # whether it holds the document context


def fit(build: Callable[[int, bool], Built], words: int, context: bool, budget: int, fewest: int = 0) -> Fitted[Built]:
    """The one fit-to-length policy of training and evaluation: a sequence over `budget` tokens first drops its
    document context (where `context` says it has one), then has its sentence cut, down to `fewest` words.

    `build(n, with_context)` makes the sequence (anything with a length in tokens) of the sentence's first n of
    `words` words. A cut keeps words in proportion to the budget over the length, at least one fewer each time.
    Training passes fewest = words (its answer names every word: a sentence is never cut) and truncates what is
    still over; evaluation cuts as far as none (the cut words score O). Over budget only at `fewest` words without
    context."""
    n, keep = words, context
    built = build(n, keep)
    if len(built) > budget and keep:
        keep = False
        built = build(n, keep)
    while len(built) > budget and n > fewest:
        n = max(fewest, min(n - 1, n * budget // len(built)))
        built = build(n, keep)
    return Fitted(built, n, keep)


@dataclass(frozen=True)
class Prompting:
    """How a model is asked and how it answers: what an adapter was trained with (evaluation and tagging use it)."""

    prompt: str = "simple"
    """The prompt template, a name in TEMPLATES."""
    response_format: str = "lines"
    """The answer the model learned, a name in parse.RENDERERS."""
    labels: LabelSet | None = CONLL
    """The entity types it names; None for a base model until the evaluated data gives them."""

    def text(self, tokens: tuple[str, ...] | list[str], context: str = "") -> str:
        """The prompt for one sentence (build_prompt)."""
        return build_prompt(tokens, self.prompt, self.response_format, context, self.labels or CONLL)

    def record(self) -> dict:
        """As metrics.json and MLflow record it: the label set as its types."""
        return {"prompt": self.prompt, "response_format": self.response_format, "labels": list(self.labels.types)}

    def ids(self, tokenizer, tokens: tuple[str, ...] | list[str], context: str = "") -> list[int]:
        """The token ids of one sentence's prompt."""
        return tokenizer(self.text(tokens, context))["input_ids"]

    def fitted(self, tokenizer, tokens: tuple[str, ...] | list[str], context: str, budget: int) -> Fitted[list[int]]:
        """The prompt's ids fitted to `budget` tokens (fit): an over-long prompt drops its context, then has its
        sentence cut, as far as no word; `words` says how many it keeps."""
        return fit(
            lambda n, with_context: self.ids(tokenizer, tokens[:n], context if with_context else ""),
            len(tokens),
            bool(context),
            budget,
        )
