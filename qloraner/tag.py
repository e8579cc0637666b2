"""Tag any text with a trained adapter: entities with character offsets, decoded as the evaluator decodes.

tagger = Tagger.load("outputs/run/final")
tagger.tag(["Peter Blackburn flew to Bonn."])  # per text: [Entity(start, end, label, text), ...]
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from qloraner.config import DecodeSettings, EvalConfig
from qloraner.conll import Sentence, _context
from qloraner.evaluate import batch_size_for, load_for_eval, respond
from qloraner.prompts import Prompting
from qloraner.text import Entity, entities_of, sentences


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Tagger:
    """A trained adapter on its NF4 base, with the prompt template and response format it was trained with.

    Every call decodes all its sentences in one batched pass of the engine, through evaluate.respond: the same
    prompts (the `context` template's neighbours from the same text or document), response budget and parsing as
    ./run_eval.sh, so that on CoNLL-2003 sentences it gives the evaluator's tags.
    """

    def __init__(self, model, tokenizer, prompting: Prompting, config: EvalConfig, progress: bool = True) -> None:
        self.model, self.tokenizer, self.prompting, self.config = model, tokenizer, prompting, config
        self.progress = progress

    @classmethod
    def load(
        cls,
        adapter_dir: str | Path,
        device: str | torch.device | None = None,
        batch_size: int | str = "auto",
        *,
        model: str | None = None,
        max_new_tokens: int = 0,
        max_prompt_tokens: int = 1024,
        cuda_graphs: bool = True,
        progress: bool = True,
    ) -> Tagger:
        """The adapter in `adapter_dir` on its base (or on `model`), loaded as evaluate.load_for_eval loads it;
        `progress` shows a progress line on standard error while a long call decodes."""
        config = EvalConfig(
            model=model,
            adapter=str(adapter_dir),
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            cuda_graphs=cuda_graphs,
        )
        net, tokenizer, prompting, _ = load_for_eval(config, torch.device(device) if device else _default_device())
        return cls(net, tokenizer, prompting, config, progress)

    @classmethod
    def from_settings(cls, settings: DecodeSettings, progress: bool = True) -> Tagger:
        """The Tagger that ./run_tag.sh and ./run_serve.sh decode with: their shared settings' adapter, base and
        engine settings."""
        return cls.load(
            settings.adapter,
            batch_size=settings.batch_size,
            model=settings.model,
            max_new_tokens=settings.max_new_tokens,
            max_prompt_tokens=settings.max_prompt_tokens,
            cuda_graphs=settings.cuda_graphs,
            progress=progress,
        )

    @property
    def types(self) -> tuple[str, ...]:
        """The entity types the adapter was trained on (its training data's), the only labels it gives."""
        return self.prompting.labels.types

    def tag(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Per text, its entities in character offsets of that text; each text is one document (its sentences
        are each other's context)."""
        split = [sentences(text) for text in texts]
        tags = self.tag_documents([[[t.text for t in s] for s in doc] for doc in split])
        return [entities_of(text, doc, doc_tags) for text, doc, doc_tags in zip(texts, split, tags)]

    def tag_tokens(self, sentences: Sequence[Sequence[str]], documents: Sequence[int] | None = None) -> list[list[str]]:
        """IOB2 tags per tokenized sentence. `documents`: per sentence, its document's number (neighbouring
        sentences of one document are each other's context, as -DOCSTART- divides CoNLL files); default: each
        sentence its own."""
        ids = list(documents) if documents is not None else list(range(len(sentences)))
        if len(ids) != len(sentences):
            raise ValueError(f"{len(ids)} document numbers for {len(sentences)} sentences")
        grouped: list[list[Sequence[str]]] = []
        for i, sentence in enumerate(sentences):
            if i == 0 or ids[i] != ids[i - 1]:
                grouped.append([])
            grouped[-1].append(sentence)
        return [tags for doc in self.tag_documents(grouped) for tags in doc]

    def tag_documents(self, documents: Sequence[Sequence[Sequence[str]]]) -> list[list[list[str]]]:
        """IOB2 tags per sentence per document of tokenized sentences; an empty sentence gets no tags."""
        flat = [Sentence(tuple(s), ("O",) * len(s)) for doc in documents for s in doc]
        docs = [d for d, doc in enumerate(documents) for _ in doc]
        with_context = [replace(s, context=_context(flat, docs, i)) for i, s in enumerate(flat)]
        tags = iter(self._decode([s for s in with_context if s.tokens]))  # in the non-empty sentences' order
        return [[next(tags) if s else [] for s in doc] for doc in documents]

    def _decode(self, sentences: list[Sentence]) -> list[list[str]]:
        """evaluate.respond's predicted tags for `sentences`; its progress goes to standard error (standard output
        may carry the tags)."""
        if not sentences:
            return []
        batch = batch_size_for(self.model, self.tokenizer, sentences, self.prompting, self.config)
        with contextlib.redirect_stdout(sys.stderr):
            rows, _ = respond(
                self.model, self.tokenizer, sentences, self.prompting, self.config, "tag", batch, self.progress
            )
        return [row["pred_tags"] for row in rows]
