"""Instruction examples: the instruction-data file of the training splits, token ids and label masks, batches."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qloraner import QloranerError
from qloraner.conll import DEFAULT_READING, Corpus, Sentence, as_corpus
from qloraner.labels import CONLL, LabelSet, name_errors, types_seen
from qloraner.parse import RENDERERS, render_response
from qloraner.prompts import build_prompt

FORMAT_VERSION = 1  # bump when a template or the response format changes: old files get rebuilt
BUDGET_SLACK = 1  # response_budget's tokens past the longest answer: the EOS that ends it
IGNORE_INDEX = -100  # label value the loss skips


def build_record(sentence: Sentence, template: str, response_format: str = "lines", labels: LabelSet = CONLL) -> dict:
    """One training example: the single `text` (prompt + response) and its parts."""
    prompt = build_prompt(sentence.tokens, template, response_format, sentence.context, labels)
    response = render_response(sentence.tokens, sentence.tags, response_format, labels)
    return {
        "text": prompt + response,
        "prompt": prompt,
        "response": response,
        "tokens": list(sentence.tokens),
        "tags": list(sentence.tags),
    }


def _worst_tags(n: int, types: tuple[str, ...], tokenizer) -> list[list[str]]:
    """Tags of the longest perfect answers a sentence of n tokens can have: every token a one-token mention, all of
    one type (each type's name tokenizes differently), or the types in turn (JSON: a group per type, each naming its
    type), in the label set's order and longest name first (with fewer tokens than types, the longest names)."""
    orders = [types, _longest_names_first(tokenizer, types)]
    return [[f"B-{t}"] * n for t in types] + [[f"B-{order[i % len(order)]}" for i in range(n)] for order in orders]


@functools.lru_cache(maxsize=16)
def _longest_names_first(tokenizer, types: tuple[str, ...]) -> tuple[str, ...]:
    """The types ordered by the tokens their JSON key takes, most first: once per tokenizer and label set, not per
    sentence (evaluation asks a budget for each)."""
    cost = dict(zip(types, map(len, tokenizer([f'"{t}": [' for t in types], add_special_tokens=False)["input_ids"])))
    return tuple(sorted(types, key=lambda t: -cost[t]))


def response_budget(
    tokenizer,
    tokens: tuple[str, ...] | list[str],
    cap: int | None = None,
    response_format: str | None = None,
    labels: LabelSet = CONLL,
) -> int:
    """New tokens a perfect answer to the sentence may need in `response_format` (None: any of RENDERERS) with the
    types of `labels`, its stop included: the longest answer it can have, tokenized, plus BUDGET_SLACK; `cap` (> 0)
    only lowers it."""
    formats = [response_format] if response_format else list(RENDERERS)
    worst = _worst_tags(len(tokens), labels.types, tokenizer)
    answers = [RENDERERS[f](list(tokens), tags, labels) for f in formats for tags in worst]
    need = max(map(len, tokenizer(answers, add_special_tokens=False)["input_ids"])) + BUDGET_SLACK
    return min(cap, need) if cap else need


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_sha256(data: Corpus | Path, splits: tuple[str, ...]) -> str:
    """What a run's checkpoints are tied to: the train file's checksum, or one over each split file's, in order.
    Files read otherwise than a column file by the default columns (a span file, --tag-column...) fold in how they
    read: the same bytes read by other columns are other data. CoNLL-2003's checksums stay what they were."""
    corpus = as_corpus(data)
    shas = [sha256_of(corpus.path(split)) for split in splits]
    shas += [json.dumps(corpus.reading(s), sort_keys=True) for s in splits if corpus.reading(s) != DEFAULT_READING]
    return shas[0] if len(shas) == 1 else hashlib.sha256(" ".join(shas).encode()).hexdigest()


def label_set_of(source: Path, tags: list, descriptions: Mapping[str, str] | None) -> LabelSet:
    """The label set of the types that a training file's tags name, described by a recipe's `[labels]`; a name no
    prompt can carry is an error naming the file."""
    types = types_seen(tags)
    errors = name_errors(types) or ([] if types else ["no entity tags (every tag is O)"])
    if errors:
        raise QloranerError(f"{source}: " + "; ".join(errors))
    return LabelSet.from_data(types, descriptions)


def _cache_key(corpus: Corpus, template: str, response_format: str, descriptions: Mapping[str, str] | None) -> dict:
    """What the instruction-data file is current for: the train file's checksum and how it reads, template, response
    format and format version, and the recipe's type descriptions where it gives any."""
    key = {
        "source_sha256": sha256_of(corpus.path("train")),
        "reading": corpus.reading("train"),
        "template": template,
        "response_format": response_format,
        "format_version": FORMAT_VERSION,
    }
    return key | ({"label_descriptions": dict(descriptions)} if descriptions else {})


def _cached_records(out_path: Path, key: dict) -> list[dict] | None:
    """The records of the file at `out_path` where its manifest matches `key`; None where it is missing, damaged
    or stale."""
    if not out_path.is_file():
        return None
    try:
        stored = json.loads(out_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return stored["records"] if all(stored.get("manifest", {}).get(k) == v for k, v in key.items()) else None


def _write_records(out_path: Path, manifest: dict, records: list[dict]) -> None:
    """The instruction-data file, written to a temp file and renamed: a kill leaves no half file."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"manifest": manifest, "records": records}, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out_path)


def instruction_data(
    data: Corpus | Path,
    template: str,
    out_path: Path,
    limit: int | None = None,
    response_format: str = "lines",
    descriptions: Mapping[str, str] | None = None,
) -> tuple[list[dict], dict]:
    """Records for the train split, from `out_path` when it is current, else rebuilt and written.

    The file's manifest records the source checksum and how it reads, template, response format and format version
    (and the recipe's type descriptions, where it gives any); any change makes the file stale. The returned manifest
    adds `labels`, the label set the prompts were built with (LabelSet.to_saved's form): the types of the split's tags.
    """
    corpus = as_corpus(data)
    source = corpus.path("train")
    if not source.is_file():
        raise QloranerError(f"{source}: file not found")
    key = _cache_key(corpus, template, response_format, descriptions)
    manifest = {"source": str(source), **key}
    records = _cached_records(out_path, key)
    if records is None:
        sentences = corpus.read("train")
        labels = label_set_of(source, [s.tags for s in sentences], descriptions)
        records = [build_record(s, template, response_format, labels) for s in sentences]
        _write_records(out_path, {**manifest, "records": len(records)}, records)
    else:
        labels = label_set_of(source, [r["tags"] for r in records], descriptions)
    manifest |= {"records": len(records), "labels": labels.to_saved()}
    return (records[:limit] if limit else records), manifest


def training_records(
    data: Corpus | Path,
    splits: tuple[str, ...],
    template: str,
    out_path: Path,
    response_format: str = "lines",
    descriptions: Mapping[str, str] | None = None,
) -> tuple[dict[str, list[dict]], dict]:
    """The records of each split a run learns from (train, then any other: valid for a final run), and the manifest.

    The train split's come from instruction_data (its cached file); every prompt names the train split's label set,
    which the manifest's `labels` records. The manifest adds the `splits`, their `files` and `data_sha256` (what
    the run's checkpoints are tied to).
    """
    corpus = as_corpus(data)
    train, manifest = instruction_data(corpus, template, out_path, None, response_format, descriptions)
    labels = LabelSet.from_saved(manifest["labels"])
    by_split = {"train": train}
    for split in splits[1:]:
        by_split[split] = [build_record(s, template, response_format, labels) for s in corpus.read(split)]
    manifest |= {
        "splits": list(splits),
        "files": [str(corpus.path(split)) for split in splits],
        "data_sha256": data_sha256(corpus, splits),
    }
    return by_split, manifest


@dataclass(frozen=True)
class Encoded:
    """One training example as token ids and the labels the loss reads."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX over the prompt; the response's ids and a final EOS

    def __len__(self) -> int:
        """Its length in tokens (what prompts.fit measures)."""
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode(tokenizer, prompts: list[str], responses: list[str]) -> list[Encoded]:
    """Token ids of prompt + response + EOS for each pair; only the response and the EOS are labels.

    pad = eos, so the final EOS must stay a label or the model never learns to stop.
    """
    if not prompts:  # fast tokenizers fail on an empty batch
        return []
    prompt_ids = tokenizer(prompts)["input_ids"]
    full_ids = tokenizer([p + r for p, r in zip(prompts, responses)])["input_ids"]
    out = []
    for prompt, p_ids, f_ids in zip(prompts, prompt_ids, full_ids):
        if f_ids[: len(p_ids)] != p_ids:
            raise QloranerError(f"the tokenizer merges the prompt's end into the response: {prompt[-40:]!r}")
        ids = f_ids + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(p_ids) + ids[len(p_ids) :]
        out.append(Encoded(ids, labels))
    return out


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 64
) -> list[list[int]]:
    """Indices in batches of similar length, deterministic for (seed, epoch).

    Shuffle, sort within windows of `group` batches so padding stays short, then shuffle
    the batches so lengths do not rise through the epoch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def split_step(batch: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """One step's sequences as `parts` micro-batches of neighbouring lengths, sizes differing by at most one.

    Sorting first keeps padding short; dealing the parts round-robin to ranks then mixes long and short.
    """
    order = sorted(batch, key=lambda i: (lengths[i], i))
    size, extra = divmod(len(order), parts)
    cuts = [k * size + min(k, extra) for k in range(parts + 1)]
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]


def padded_tokens(part: list[int], lengths: list[int]) -> int:
    """What a micro-batch costs in memory: its rows times its longest row (the batch is padded to it)."""
    return len(part) * max((lengths[i] for i in part), default=0)


def split_step_within(
    batch: list[int], lengths: list[int], parts: int, max_tokens: int, ranks: int = 1
) -> list[list[int]]:
    """split_step into `parts` micro-batches, or into the fewest more, `ranks` at a time (every rank then runs as
    many), that keep each within `max_tokens` padded tokens; a single row over it still makes its own micro-batch.
    `max_tokens` 0 is no bound. The peak memory follows the longest micro-batch: a few steps of long sentences
    split, the others keep their full width."""
    n = parts
    while True:
        split = split_step(batch, lengths, n)
        if not max_tokens or all(padded_tokens(p, lengths) <= max_tokens or len(p) <= 1 for p in split):
            return split
        n += ranks
