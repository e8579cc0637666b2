"""Reading CoNLL-2003 files: `token POS chunk NER` lines, blank lines between sentences."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qloraner import QloranerError
from qloraner.bio import to_iob2

SPLITS = ("train", "valid", "test")
_VALID_TAG_PREFIXES = ("B-", "I-")


@dataclass(frozen=True)
class Sentence:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]  # IOB2


def _check_tag(tag: str, where: str) -> None:
    if tag == "O" or (tag[:2] in _VALID_TAG_PREFIXES and len(tag) > 2):
        return
    raise QloranerError(f"{where}: bad NER tag {tag!r} (expected O, B-TYPE or I-TYPE)")


def read_conll(path: str | Path) -> list[Sentence]:
    """Read one CoNLL file; IOB1 tags are normalised to IOB2. Errors name file:line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise QloranerError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise QloranerError(f"{path}:{line}: not UTF-8 ({err.reason} at byte {err.start})") from None
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if tokens:
            sentences.append(Sentence(tuple(tokens), tuple(to_iob2(tags))))
            tokens.clear()
            tags.clear()

    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            flush()
        elif fields[0] == "-DOCSTART-":
            flush()
        elif len(fields) != 4:
            raise QloranerError(
                f"{path}:{lineno}: expected 4 columns (token POS chunk NER), got {len(fields)}: {line!r}"
            )
        else:
            _check_tag(fields[3], f"{path}:{lineno}")
            tokens.append(fields[0])
            tags.append(fields[3])
    flush()
    return sentences


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
    chosen = cli_value or os.environ.get("CONLL_DIR")
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
