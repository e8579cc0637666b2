"""Reading column files (CoNLL-2003's `token POS chunk NER` lines by default; any columns, blank lines between
sentences), and where each split's file is (`Corpus`)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qloraner import ROOT, QloranerError, refuse_empty
from qloraner.bio import PREFIXES, SCHEME_OF_PREFIX, SCHEMES, scheme_to_iob2

if TYPE_CHECKING:
    from qloraner import config

SPLITS = ("train", "valid", "test")
TAG_SCHEMES = ("auto", *SCHEMES)  # auto: BIOES or BILOU where the file holds their E-/S- or L-/U- tags, else IOB2
SPAN_READERS = {".jsonl": "read_jsonl", ".json": "read_json"}  # span files by extension: their qloraner.spans reader
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


@dataclass(frozen=True)
class Columns:
    """How a column file is read."""

    token: int = 0
    """The token's column: 0 the first; a negative one counts from the end."""
    tag: int = -1
    """The NER tag's column: -1 the last."""
    scheme: str = "auto"
    """The tags' scheme (a TAG_SCHEMES name), normalised to IOB2; auto: detected from the file's prefixes."""


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """repr(text), cut to `limit` characters so that one bad line (a file of NUL bytes) stays readable.

    >>> quote("x" * 200, limit=10)
    "'xxxxxxxxx… (200 characters)"
    """
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}… ({len(text)} characters)"


def tag_prefix(tag: str, allowed: str) -> str | None:
    """The prefix of a well-formed tag: "O", or PREFIX-TYPE with PREFIX among `allowed` and a non-empty TYPE;
    None for any other form. Any TYPE: the label set comes from the data.

    >>> [tag_prefix(t, "BI") for t in ("O", "B-PER", "I-anything-else", "S-PER", "B-", "b-org", "PER")]
    ['O', 'B', 'I', None, None, None, None]
    """
    if tag == "O":
        return "O"
    return tag[0] if len(tag) > 2 and tag[0] in allowed and tag[1] == "-" else None


def labels_of(sentences: list[Sentence]) -> tuple[str, ...]:
    """The entity types that `sentences`' tags hold, sorted.

    >>> labels_of([Sentence(("EU", "rejects", "Peter"), ("B-ORG", "O", "B-PER")), Sentence(("x",), ("B-ORG",))])
    ('ORG', 'PER')
    """
    return tuple(sorted({tag[2:] for s in sentences for tag in s.tags if tag != "O"}))


def _decode(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # a byte-order mark is no part of the first token
    except FileNotFoundError:
        raise QloranerError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise QloranerError(f"{path}: a folder, not a file") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise QloranerError(f"{path}:{line}: not UTF-8 ({err.reason} at byte {err.start})") from None


def _column_indices(fields: list[str], columns: Columns, where: str, line: str) -> tuple[int, int]:
    """The token's and the tag's index in a line of len(fields) columns, or an error naming the line."""
    n = len(fields)
    token, tag = (c if c >= 0 else n + c for c in (columns.token, columns.tag))
    if not (0 <= token < n and 0 <= tag < n and token != tag):
        raise QloranerError(
            f"{where}: expected at least 2 columns, with the token in column {columns.token} and the tag in column "
            f"{columns.tag} (--token-column, --tag-column), got {n}: {quote(line)}"
        )
    return token, tag


def read_conll(path: str | Path, columns: Columns = Columns()) -> list[Sentence]:
    """Read one column file: one token a line, its columns split at spaces or tabs (every line of the file as many
    as its first), blank lines between sentences, `-DOCSTART-` lines (optional) between documents; CRLF and
    trailing blanks read alike. Tags are checked for form and normalised to IOB2 from `columns.scheme` (auto: BIOES
    or BILOU where the file holds their E-/S- or L-/U- tags, else IOB1/IOB2). Errors name file:line."""
    path = Path(path)
    raw, docs, first_of_scheme = _read_rows(path, columns)
    scheme = _file_scheme(path, columns.scheme, first_of_scheme)
    sentences = [Sentence(tuple(t), tuple(scheme_to_iob2(g, scheme))) for t, g in raw]
    return [replace(s, context=_context(sentences, docs, i)) for i, s in enumerate(sentences)]


def _read_rows(path: Path, columns: Columns):
    """The file's sentences as written (tokens and tags), each sentence's document number (-DOCSTART- lines divide
    them), and the first line and tag of each scheme a tag's prefix names (E-/S-: BIOES, L-/U-: BILOU)."""
    allowed = PREFIXES if columns.scheme == "auto" else "".join(SCHEMES[columns.scheme])
    raw: list[tuple[list[str], list[str]]] = []
    docs: list[int] = []
    tokens: list[str] = []
    tags: list[str] = []
    first_of_scheme: dict[str, tuple[int, str]] = {}
    width: tuple[int, int] | None = None  # the file's columns, and the line that set them
    docs_seen = 0
    for lineno, line in enumerate([*LINE_BREAK.split(_decode(path)), ""], start=1):  # "": the last sentence ends
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                raw.append((tokens, tags))
                docs.append(docs_seen)
                tokens, tags = [], []
            docs_seen += bool(fields)
            continue
        where = f"{path}:{lineno}"
        width = width or (len(fields), lineno)
        if len(fields) != width[0]:
            raise QloranerError(
                f"{where}: expected {width[0]} columns as on line {width[1]}, got {len(fields)}: {quote(line)}"
            )
        token_at, tag_at = _column_indices(fields, columns, where, line)
        prefix = _checked_prefix(fields[tag_at], allowed, columns, where)
        if prefix in SCHEME_OF_PREFIX:
            first_of_scheme.setdefault(SCHEME_OF_PREFIX[prefix], (lineno, fields[tag_at]))
        tokens.append(fields[token_at])
        tags.append(fields[tag_at])
    return raw, docs, first_of_scheme


def _checked_prefix(tag: str, allowed: str, columns: Columns, where: str) -> str:
    """The tag's prefix (O for O); an error naming the line for a tag of another form or scheme."""
    prefix = tag_prefix(tag, allowed)
    if prefix is None:
        raise QloranerError(
            f"{where}: bad NER tag {quote(tag)} in column {columns.tag} (expected O or PREFIX-TYPE, PREFIX one of "
            f"{', '.join(allowed)}; --tag-column picks another column, --tag-scheme the scheme)"
        )
    return prefix


def _file_scheme(path: Path, scheme: str, first_of_scheme: dict[str, tuple[int, str]]) -> str:
    """The file's scheme: the one given, else the one its prefixes name (iob2 where none does: IOB1 reads alike);
    a file whose tags name two (BIOES and BILOU) is an error naming both lines."""
    if scheme != "auto":
        return scheme
    if len(first_of_scheme) > 1:
        (a, (a_line, a_tag)), (b, (b_line, b_tag)) = sorted(first_of_scheme.items(), key=lambda kv: kv[1])
        raise QloranerError(
            f"{path}:{b_line}: {b.upper()} tag {quote(b_tag)}, but line {a_line} has the {a.upper()} tag "
            f"{quote(a_tag)}: one scheme a file; give --tag-scheme"
        )
    return next(iter(first_of_scheme), "iob2")


def _context(sentences: list[Sentence], docs: list[int], i: int) -> str:
    """The text of sentence i's neighbours in its own document: the one before, then the one after."""
    near = [j for j in (i - 1, i + 1) if 0 <= j < len(sentences) and docs[j] == docs[i]]
    return "\n".join(" ".join(sentences[j].tokens) for j in near)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise QloranerError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def read_file(path: str | Path, columns: Columns = Columns()) -> list[Sentence]:
    """Read a data file of any format, chosen by its extension: `.jsonl` a span file of one record a line
    (doccano's export), `.json` a span file holding one JSON list (Label Studio's export), any other a column file
    read by `columns` (qloraner.spans says what a span record may be)."""
    from qloraner import spans  # it builds its sentences with this module's Sentence

    reader = SPAN_READERS.get(Path(path).suffix.lower())
    return getattr(spans, reader)(Path(path)) if reader else read_conll(path, columns)


def _read_nonempty(path: Path, split: str, columns: Columns) -> list[Sentence]:
    """An empty split is an error, not zero scores."""
    sentences = read_file(path, columns)
    if not sentences:
        raise QloranerError(f"{path}: the {split} split holds no sentences")
    return sentences


def read_split(data_dir: str | Path, split: str) -> list[Sentence]:
    """Read `<data_dir>/<split>.txt`; an empty split is an error, not zero scores."""
    _check_split(split)
    return _read_nonempty(Path(data_dir) / f"{split}.txt", split, Columns())


@dataclass(frozen=True)
class Corpus:
    """Where each split's file is and how column files read: a split's own file (--train-file, --valid-file,
    --test-file; any name, any format), else `<split>.txt` in the data folder (--data-dir, else $CONLL_DIR, else
    datasets/conll2003). Once any split is named by file, a split without one needs --data-dir given: not
    CoNLL-2003 by default beside a user's own data."""

    files: tuple[tuple[str, str], ...] = ()
    """(split, path) for each split named by file."""
    data_dir: str | None = None
    """--data-dir as given (None: $CONLL_DIR, else datasets/conll2003)."""
    columns: Columns = Columns()
    """How column files read."""
    root: Path = ROOT
    """The project folder, where datasets/conll2003 is."""

    def path(self, split: str) -> Path:
        """The file of `split`."""
        _check_split(split)
        named = dict(self.files)
        if split in named:
            return Path(named[split])
        if named and self.data_dir is None:
            raise QloranerError(
                f"no {split} split: give --{split}-file (the other splits are named by file: "
                f"{', '.join(f'--{s}-file' for s in named)}) or --data-dir"
            )
        return resolve_data_dir(self.data_dir, self.root) / f"{split}.txt"

    def read(self, split: str) -> list[Sentence]:
        """The sentences of `split`; an empty split is an error."""
        return _read_nonempty(self.path(split), split, self.columns)

    def reading(self, split: str) -> dict:
        """How `split`'s file reads, beside its bytes: its format, and for a column file the columns and scheme."""
        path = self.path(split)
        suffix = path.suffix.lower()
        return {"format": suffix} if suffix in SPAN_READERS else {"format": "columns", **asdict(self.columns)}


DEFAULT_READING = {"format": "columns", **asdict(Columns())}  # CoNLL-2003's, and any column file's by default


def resolve_corpus(settings: config.DataSettings, project_root: Path = ROOT) -> Corpus:
    """The Corpus that `settings` name; an empty path is an error."""
    files = tuple(
        (split, refuse_empty(getattr(settings, f"{split}_file"), f"--{split}-file"))
        for split in SPLITS
        if getattr(settings, f"{split}_file") is not None
    )
    columns = Columns(settings.token_column, settings.tag_column, settings.tag_scheme)
    return Corpus(files, refuse_empty(settings.data_dir, "--data-dir"), columns, project_root)


def as_corpus(source: Corpus | str | Path) -> Corpus:
    """`source` as a Corpus: a folder path reads as --data-dir."""
    return source if isinstance(source, Corpus) else Corpus(data_dir=str(source))


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
