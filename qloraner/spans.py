"""Span files -> sentences: texts whose entities are character offsets, tokenised by the tag command's tokenizer.

The format comes from the extension (conll.read_file): `.jsonl` holds one record a line (doccano's export), `.json`
one JSON list of records (Label Studio's export); a record of either shape reads in either file:
- doccano: `{"text": ..., "entities": [[start, end, "TYPE"], ...]}` (or `"label"` for `"entities"`; newer
  doccano's `{"start_offset": ..., "end_offset": ..., "label": ...}` objects for the triples);
- Label Studio: `{"data": {"text": ...}, "annotations": [{"result": [{"value": {"start": ..., "end": ...,
  "labels": ["TYPE"]}}, ...]}]}`: the first annotation not cancelled is read (a task without one is skipped and
  counted); results without `labels` (relations, choices) are no spans. Where a result holds `value.text`, it must be
  the text at its offsets (Label Studio counts UTF-16 units: offsets past an emoji would tag the wrong characters).

Each record is a document: qloraner.text splits it into sentences of tokens (their neighbours make the `context`
prompt), and each span tags the tokens it covers in IOB2. The rules where a span and the tokens disagree:
- white space at either end of a span is left out (a selection that took the space after a word);
- a span that starts or ends inside a token is widened to the whole tokens it touches, and the file's count of
  widened spans is printed with the first such record;
- a span across a sentence end joins the two sentences into one;
- spans that overlap (once widened), a span of white space only, offsets outside the text, and a type that is empty
  or holds white space are errors naming the file and the record (`file:line` in a `.jsonl` file, `file: record N`
  in a `.json` one).
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace
from pathlib import Path

from qloraner import QloranerError
from qloraner.conll import QUOTE_CHARS, Sentence, _context, _decode, quote
from qloraner.text import Token, is_space
from qloraner.text import sentences as split_sentences

RawSpan = tuple[object, object, object]  # (start, end, type) as the file gives them: checked by tag_document


@dataclass(frozen=True)
class Document:
    """One record tagged."""

    sentences: tuple[tuple[tuple[Token, ...], tuple[str, ...]], ...]
    """Each sentence's tokens (with their offsets into the text) and IOB2 tags."""
    widened: int
    """How many spans cut a token and were widened to whole tokens."""


def _shown(span: RawSpan) -> str:
    """A span as the file gives it, in JSON, cut to a readable length."""
    text = json.dumps(list(span), ensure_ascii=False)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}…"


def _checked(text: str, span: RawSpan, where: str) -> tuple[int, int, str]:
    """(start, end, type) of a span that fits `text` and whose type can make a tag."""
    start, end, type_ = span
    shown = f"span {_shown(span)}"
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
        raise QloranerError(f"{where}: {shown}: start and end must be whole numbers (character offsets)")
    if not 0 <= start < end <= len(text):
        raise QloranerError(f"{where}: {shown}: offsets outside the text of {len(text)} characters, or empty")
    if not isinstance(type_, str) or not type_ or any(is_space(c) for c in type_):
        raise QloranerError(f"{where}: {shown}: the type must be a non-empty string without white space")
    return start, end, type_


def tag_document(text: str, spans: list[RawSpan], where: str) -> Document:
    """`text` as sentences of tokens with IOB2 tags from its character spans, by the rules of the module's
    docstring; `where` (file and record) names the record in errors."""
    sentences = split_sentences(text)
    tokens = [t for s in sentences for t in s]
    starts, ends = [t.start for t in tokens], [t.end for t in tokens]
    placed = []  # (first token, last token, type, the span as given)
    widened = 0
    for span in spans:
        start, end, type_ = _checked(text, span, where)
        while start < end and is_space(text[start]):
            start += 1
        while end > start and is_space(text[end - 1]):
            end -= 1
        if start == end:
            raise QloranerError(f"{where}: span {_shown(span)} holds only white space")
        first, last = bisect_right(ends, start), bisect_left(starts, end) - 1  # every non-space character is in one
        widened += starts[first] < start or ends[last] > end
        placed.append((first, last, type_, span))
    placed.sort(key=lambda p: p[:2])
    for (_, a_last, _, a), (b_first, _, _, b) in zip(placed, placed[1:]):
        if b_first <= a_last:
            raise QloranerError(f"{where}: spans {_shown(a)} and {_shown(b)} overlap (on whole tokens)")
    tags = ["O"] * len(tokens)
    begins = [False] * len(tokens)  # which tokens start a sentence
    at = 0
    for s in sentences:
        begins[at] = True
        at += len(s)
    for first, last, type_, _ in placed:
        tags[first : last + 1] = [f"B-{type_}"] + [f"I-{type_}"] * (last - first)
        begins[first + 1 : last + 1] = [False] * (last - first)  # a span across a sentence end joins the two
    cuts = [i for i, b in enumerate(begins) if b] + [len(tokens)]
    return Document(tuple((tuple(tokens[a:b]), tuple(tags[a:b])) for a, b in zip(cuts, cuts[1:])), widened)


def _triple(item: object) -> RawSpan | None:
    """A doccano span: [start, end, TYPE], or newer doccano's object; None for anything else."""
    if isinstance(item, list) and len(item) == 3:
        return item[0], item[1], item[2]
    if isinstance(item, dict) and {"start_offset", "end_offset", "label"} <= item.keys():
        return item["start_offset"], item["end_offset"], item["label"]
    return None


def _doccano(record: dict, where: str) -> tuple[object, list[RawSpan] | None]:
    items = record.get("entities", record.get("label", []))
    if not isinstance(items, list):
        raise QloranerError(f"{where}: entities must be a list of [start, end, TYPE]")
    spans = []
    for item in items:
        span = _triple(item)
        if span is None:
            raise QloranerError(f"{where}: {quote(json.dumps(item))} is not a span [start, end, TYPE]")
        spans.append(span)
    return record.get("text"), spans


def _label_studio(record: dict, where: str) -> tuple[object, list[RawSpan] | None]:
    data = record["data"]
    text = data.get("text") if isinstance(data, dict) else None
    given = record.get("annotations", record.get("completions")) or []
    done = [a for a in given if isinstance(a, dict) and not a.get("was_cancelled")] if isinstance(given, list) else []
    if not done:
        return text, None
    spans = []
    for result in done[0].get("result") or []:
        value = result.get("value") if isinstance(result, dict) else None
        if not isinstance(value, dict) or "labels" not in value:
            continue  # a relation, a choice: no span
        labels = value["labels"]
        if not (isinstance(labels, list) and len(labels) == 1):
            raise QloranerError(f"{where}: a result with labels {quote(json.dumps(labels))}: give one label a span")
        span = (value.get("start"), value.get("end"), labels[0])
        if isinstance(text, str) and "text" in value:
            start, end, _ = _checked(text, span, where)
            if text[start:end] != value["text"]:
                raise QloranerError(
                    f"{where}: span {_shown(span)} covers {quote(text[start:end])} in the text, but the "
                    f"annotation says {quote(str(value['text']))} (offsets counted in UTF-16 units?)"
                )
        spans.append(span)
    return text, spans


SHAPES = {"data": _label_studio, "text": _doccano}  # a record's shape by the key it holds (a Label Studio task first)


def _read_records(path: Path, records: list[tuple[str, object]]) -> list[Sentence]:
    """The sentences of (where, record) pairs, each record a document; the widened spans and skipped tasks
    counted on one line each."""
    out: list[Sentence] = []
    widened: list[tuple[str, int]] = []
    skipped = 0
    for where, record in records:
        shape = next((SHAPES[k] for k in SHAPES if isinstance(record, dict) and k in record), None)
        if shape is None:
            raise QloranerError(
                f'{where}: expected a doccano record {{"text": ..., "entities": [...]}} or a Label Studio task '
                f'{{"data": {{"text": ...}}, "annotations": [...]}}'
            )
        text, spans = shape(record, where)
        if not isinstance(text, str):
            raise QloranerError(f"{where}: the record holds no text (a string)")
        if spans is None:
            skipped += 1
            continue
        doc = tag_document(text, spans, where)
        if doc.widened:
            widened.append((where, doc.widened))
        sentences = [Sentence(tuple(t.text for t in tokens), tags) for tokens, tags in doc.sentences]
        out += [replace(s, context=_context(sentences, [0] * len(sentences), i)) for i, s in enumerate(sentences)]
    if widened:
        print(
            f"qloraner: {path}: {sum(n for _, n in widened)} spans cut a token and were widened to whole tokens "
            f"(the first at {widened[0][0]})",
            flush=True,
        )
    if skipped:
        print(f"qloraner: {path}: {skipped} tasks without an annotation skipped", flush=True)
    return out


def _json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise QloranerError(f"{where}: not JSON ({err.msg}, column {err.colno})") from None


def read_jsonl(path: Path) -> list[Sentence]:
    """A span file of one record a line (doccano's export); blank lines skipped; errors name file:line."""
    lines = _decode(path).splitlines()
    return _read_records(
        path, [(f"{path}:{n}", _json(line, f"{path}:{n}")) for n, line in enumerate(lines, 1) if line.strip()]
    )


def read_json(path: Path) -> list[Sentence]:
    """A span file holding one JSON list of records (Label Studio's export); errors name the file and record."""
    text = _decode(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise QloranerError(f"{path}:{err.lineno}: not JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise QloranerError(
            f"{path}: expected a JSON list of records (Label Studio's export), got {type(records).__name__}"
        )
    return _read_records(path, [(f"{path}: record {n}", r) for n, r in enumerate(records, 1)])
