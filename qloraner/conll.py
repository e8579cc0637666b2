"""Reading CoNLL-2003 files: `token POS chunk NER` lines, blank lines between sentences."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from qloraner import ENTITY_TYPES, QloranerError, refuse_empty
from qloraner.bio import to_iob2

SPLITS = ("train", "valid", "test")
TAGS = ("O", *(f"{p}-{t}" for t in ENTITY_TYPES for p in "BI"))  # the CoNLL-2003 scheme, IOB1 or IOB2
QUOTE_CHARS = 80  # of a bad line quoted in an error: enough to recognise it
# One line end: LF, CRLF, CR CR LF (a CRLF file converted once more), or a lone CR (old Mac files): a blank line
# is two of them. Not str.splitlines: it reads CR CR LF as a blank line (every token a sentence), and splits at
# characters (NEL, U+2028) that a token may hold.
LINE_BREAK = re.compile(r"\r*\n|\r")


@dataclass(frozen=True)
class Sentence:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]  # IOB2
    context: str = ""  # the sentence before it and the one after it in its document, one per line, as text


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """repr(text), cut to `limit` characters so that one bad line (a file of NUL bytes) stays readable.

    >>> quote("x" * 200, limit=10)
    "'xxxxxxxxx… (200 characters)"
    """
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}… ({len(text)} characters)"


def _check_tag(tag: str, where: str) -> None:
    if tag != "O" and not re.fullmatch(r"[BI]-\S+", tag):  # any entity type (#41); the label set checks its names
        raise QloranerError(f"{where}: bad NER tag {quote(tag)} (O, or B-TYPE / I-TYPE as in {', '.join(TAGS)})")


def read_conll(path: str | Path) -> list[Sentence]:
    """Read one CoNLL file; IOB1 tags are normalised to IOB2. Errors name file:line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is no part of the first token
    except FileNotFoundError:
        raise QloranerError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise QloranerError(f"{path}:{line}: not UTF-8 ({err.reason} at byte {err.start})") from None
    sentences: list[Sentence] = []
    docs: list[int] = []  # per sentence: its document's number (-DOCSTART- lines divide them)
    tokens: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if tokens:
            sentences.append(Sentence(tuple(tokens), tuple(to_iob2(tags))))
            docs.append(docs_seen)
            tokens.clear()
            tags.clear()

    docs_seen = 0
    for lineno, line in enumerate(LINE_BREAK.split(text), start=1):
        fields = line.split()
        if not fields:
            flush()
        elif fields[0] == "-DOCSTART-":
            flush()
            docs_seen += 1
        elif len(fields) != 4:
            raise QloranerError(
                f"{path}:{lineno}: expected 4 columns (token POS chunk NER), got {len(fields)}: {quote(line)}"
            )
        else:
            _check_tag(fields[3], f"{path}:{lineno}")
            tokens.append(fields[0])
            tags.append(fields[3])
    flush()
    return [replace(s, context=_context(sentences, docs, i)) for i, s in enumerate(sentences)]


def _context(sentences: list[Sentence], docs: list[int], i: int) -> str:
    """The text of sentence i's neighbours in its own document: the one before, then the one after."""
    near = [j for j in (i - 1, i + 1) if 0 <= j < len(sentences) and docs[j] == docs[i]]
    return "\n".join(" ".join(sentences[j].tokens) for j in near)


def read_split(data_dir: str | Path, split: str) -> list[Sentence]:
    """Read `<data_dir>/<split>.txt`; an empty split is an error, not zero scores."""
    if split not in SPLITS:
        raise QloranerError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(data_dir) / f"{split}.txt"
    sentences = read_conll(path)
    if not sentences:
        raise QloranerError(f"{path}: the {split} split holds no sentences")
    return sentences


def resolve_data_dir(cli_value: str | None, project_root: Path) -> Path:
    """--data-dir, else $CONLL_DIR, else datasets/conll2003 (fetched there by datasets/fetch_conll2003.sh)."""
    default = project_root / "datasets" / "conll2003"
    chosen = refuse_empty(cli_value, "--data-dir") or os.environ.get("CONLL_DIR")
    fetch = project_root / "datasets" / "fetch_conll2003.sh"
    if chosen is None and not default.is_dir() and fetch.is_file():
        if subprocess.run(["bash", str(fetch)], check=False).returncode != 0:
            raise QloranerError(
                f"no CoNLL-2003 data: {fetch.name} could not fetch it; set CONLL_DIR or pass --data-dir"
            )
    path = Path(chosen or default)
    if not path.is_dir():
        raise QloranerError(
            f"CoNLL-2003 directory not found: {path}. Pass --data-dir or set CONLL_DIR to a folder "
            "holding train.txt, valid.txt and test.txt"
        )
    return path
