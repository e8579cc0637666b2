"""Prints the table of entity types by split that datasets/sample-tech/README.md shows, read by qloraner's own column
reader: `.venv/bin/python datasets/sample-tech/counts.py` (tests/test_sample.py checks that the README holds it)."""

from pathlib import Path

from qloraner.bio import spans
from qloraner.conll import labels_of, read_conll

HERE = Path(__file__).resolve().parent
SPLITS = {"train": "train.tsv", "valid": "dev.tsv", "test": "test.tsv"}  # the project's split name: its file


def entity_counts(folder: Path = HERE) -> dict[str, dict[str, int]]:
    """{split: {TYPE: entities of that type}} plus "sentences" and "tokens", as qloraner reads the files."""
    counts = {}
    for split, name in SPLITS.items():
        sentences = read_conll(folder / name)
        row = {t: 0 for t in labels_of(sentences)}
        for span in (span for s in sentences for span in spans(s.tags)):
            row[span.type] += 1
        counts[split] = {**row, "sentences": len(sentences), "tokens": sum(len(s.tokens) for s in sentences)}
    return counts


def table(folder: Path = HERE) -> str:
    """The counts as a Markdown table: a row per type, then sentences and tokens; a column per split's file."""
    counts = entity_counts(folder)
    rows = sorted({k for row in counts.values() for k in row} - {"sentences", "tokens"}) + ["sentences", "tokens"]
    lines = ["| | " + " | ".join(f"`{name}`" for name in SPLITS.values()) + " |", "| --- |" + " ---: |" * len(SPLITS)]
    lines += [f"| {r} | " + " | ".join(str(counts[s].get(r, 0)) for s in SPLITS) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
