"""./run_tag.sh: tag text, JSONL or CoNLL files (or standard input) with a trained adapter; JSONL or CoNLL out."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qloraner import QloranerError, run_main
from qloraner.config import DecodeSettings, opt, parser_for, raise_if
from qloraner.conll import quote
from qloraner.startup import STOPWATCH, stopwatch
from qloraner.text import Token, entities_of, is_space, sentences

STDIN = "<stdin>"


@dataclass(frozen=True)
class TagConfig(DecodeSettings):
    input_format: str = opt(
        "text",
        'text: each file one document, split into sentences and tokens; jsonl: a {"text": ...} or '
        '{"tokens": [...]} object per line, other keys passed through; conll: a token per line (first column), a '
        "blank line after each sentence, -DOCSTART- between documents",
        choices=("text", "jsonl", "conll"),
    )
    output_format: str = opt(
        "jsonl",
        "jsonl: per record its text and entities with character offsets (and tokens and tags where it came as "
        "tokens); conll: a token and its tag per line, a blank line after each sentence",
        choices=("jsonl", "conll"),
        flag="format",
    )
    progress: bool = opt(True, "show the decoding's progress on standard error")
    verbose: bool = opt(False, "print where the start-up's seconds went, as one line on standard error")

    def __post_init__(self) -> None:
        errors = self.decode_errors()
        raise_if(errors)


@dataclass(frozen=True)
class Document:
    """One record of the input: its text, its sentences' tokens (offsets into the text), what to pass through."""

    text: str
    sentences: list[list[Token]]
    given_tokens: bool = False  # it came as tokens (JSONL tokens, CoNLL): the output shows them and their tags
    extra: dict = field(default_factory=dict)  # a JSONL record's other keys
    docstart: bool = False  # CoNLL output: a -DOCSTART- line goes before it


def _from_tokens(tokens: list[list[str]], **kw) -> Document:
    """A document of given sentences: its text is their tokens joined by spaces, the sentences by newlines."""
    text, out = "", []
    for sentence in tokens:
        text += "\n" if out else ""
        row = []
        for t in sentence:
            text += " " if row else ""
            row.append(Token(t, len(text), len(text) + len(t)))
            text += t
        out.append(row)
    return Document(text, out, given_tokens=True, **kw)


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is no part of the text
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise QloranerError(f"{name}:{line}: not UTF-8 ({err.reason} at byte {err.start})") from None


def read_source(name: str) -> str:
    """The text of a file, or of standard input for STDIN, exactly as written (CRLF kept)."""
    if name == STDIN:
        return _decode(name, sys.stdin.buffer.read())
    try:
        return _decode(name, Path(name).read_bytes())
    except FileNotFoundError:
        raise QloranerError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise QloranerError(f"{name}: a folder, not a file") from None
    except OSError as err:
        raise QloranerError(f"{name}: cannot read it ({err.strerror})") from None


def _tokens_of(value: object, where: str) -> list[str]:
    ok = isinstance(value, list) and all(isinstance(t, str) and t and not any(map(is_space, t)) for t in value)
    if not ok:
        raise QloranerError(f'{where}: "tokens" must be a list of non-empty strings without whitespace')
    return value


def jsonl_record(line: str, where: str) -> Document:
    """One JSONL line: {"text": ...} or {"tokens": [...]}, other keys kept."""
    try:
        record = json.loads(line)
    except ValueError as err:
        raise QloranerError(f"{where}: not JSON ({err.args[0].split(':')[0]}): {quote(line)}") from None
    if not isinstance(record, dict) or ("text" in record) == ("tokens" in record):
        raise QloranerError(f'{where}: expected an object with "text" or "tokens" (one of them): {quote(line)}')
    if "tokens" in record:
        return _from_tokens([_tokens_of(record.pop("tokens"), where)], extra=record)
    text = record.pop("text")
    if not isinstance(text, str):
        raise QloranerError(f'{where}: "text" must be a string, not {type(text).__name__}')
    return Document(text, sentences(text), extra=record)


def conll_documents(text: str) -> list[Document]:
    """Documents of CoNLL columns: the token is a line's first field; -DOCSTART- starts a document."""
    docs: list[tuple[bool, list[list[str]]]] = [(False, [[]])]
    for line in text.splitlines():  # as conll.read_conll reads it: the evaluator's tokens
        fields = line.split()
        if not fields:
            docs[-1][1].append([])
        elif fields[0] == "-DOCSTART-":
            docs.append((True, [[]]))
        else:
            docs[-1][1][-1].append(fields[0])
    kept = [(start, [s for s in sents if s]) for start, sents in docs]
    return [_from_tokens(sents, docstart=start) for start, sents in kept if sents]


def read_documents(names: list[str], input_format: str) -> list[Document]:
    """Every input file's documents, in order; any bad one stops it all before the model loads."""
    docs: list[Document] = []
    for name in names:
        text = read_source(name)
        if input_format == "text":
            docs.append(Document(text, sentences(text), docstart=bool(docs)))
        elif input_format == "conll":
            docs += conll_documents(text)
        else:
            lines = text.split("\n")
            docs += [jsonl_record(line, f"{name}:{i}") for i, line in enumerate(lines, start=1) if line.strip()]
    return docs


def jsonl_out(doc: Document, tags: list[list[str]]) -> list[str]:
    """JSON lines for one document: itself, or with given tokens each sentence (one line each)."""
    if not doc.given_tokens:
        return [_json({**doc.extra, "text": doc.text, "entities": entities_of(doc.text, doc.sentences, tags)})]
    lines = []
    for sentence, sentence_tags in zip(doc.sentences, tags):
        single = _from_tokens([[t.text for t in sentence]])
        entities = entities_of(single.text, single.sentences, [sentence_tags])
        tokens = [t.text for t in sentence]
        lines.append(
            _json({**doc.extra, "tokens": tokens, "tags": sentence_tags, "text": single.text, "entities": entities})
        )
    return lines


def _json(record: dict) -> str:
    entities = [{"start": e.start, "end": e.end, "label": e.label, "text": e.text} for e in record["entities"]]
    return json.dumps({**record, "entities": entities}, ensure_ascii=False)


def conll_out(doc: Document, tags: list[list[str]]) -> list[str]:
    """CoNLL lines for one document: `token TAB tag`, a blank line after each sentence."""
    lines = ["-DOCSTART-\tO", ""] if doc.docstart else []
    for sentence, sentence_tags in zip(doc.sentences, tags):
        lines += [f"{t.text}\t{tag}" for t, tag in zip(sentence, sentence_tags)] + [""]
    return lines


def tag_files(config: TagConfig, names: list[str]) -> None:
    """Read every input, tag all its sentences in one batched pass, write the records to standard output."""
    with stopwatch("input"):
        docs = read_documents(names or [STDIN], config.input_format)
    with stopwatch("imports"):  # torch and the model code load after the input reads: a bad file fails at once
        from qloraner.tag import Tagger
    tagger = Tagger.from_settings(config, progress=config.progress)
    tags = tagger.tag_documents([[[t.text for t in s] for s in doc.sentences] for doc in docs])
    write = jsonl_out if config.output_format == "jsonl" else conll_out
    out = "".join(line + "\n" for doc, doc_tags in zip(docs, tags) for line in write(doc, doc_tags))
    sys.stdout.buffer.write(out.encode("utf-8"))
    sys.stdout.buffer.flush()
    if config.verbose:  # standard output holds the records
        print(STOPWATCH.line(), file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> tuple[TagConfig, list[str]]:
    """Settings and input files from the command line."""
    parser = parser_for(TagConfig, "Tag text with a trained adapter (./run_tag.sh); standard input without FILE")
    parser.add_argument("files", nargs="*", metavar="FILE", default=[], help="input files (default: standard input)")
    given = vars(parser.parse_args(argv))
    files = given.pop("files")
    return TagConfig(**given), files


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        STOPWATCH.begin()
        tag_files(*parse(argv))
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
