"""Re-score saved responses with the document-level consistency rules (qloraner/consistency.py), on the CPU.

    python benchmarks/rescore.py RESPONSES.jsonl[.gz] SPLIT.txt [--out FILE.json]

SPLIT.txt is the CoNLL file the responses were decoded from (its -DOCSTART- lines give the documents). Prints
P/R/F1, per-type F1 and error counts for no rule, each rule alone and both; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from qloraner.conll import LINE_BREAK
from qloraner.consistency import RULES, apply
from qloraner.metrics import error_analysis, score


def documents(split: Path) -> list[int]:
    """Per sentence of a CoNLL file, the number of its document."""
    ids: list[int] = []
    doc, in_sentence = 0, False
    for line in LINE_BREAK.split(split.read_text(encoding="utf-8")):
        fields = line.split()
        if fields[:1] == ["-DOCSTART-"]:
            doc += 1
        if fields and fields[0] != "-DOCSTART-" and not in_sentence:
            ids.append(doc)
        in_sentence = bool(fields) and fields[0] != "-DOCSTART-"
    return ids


def read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("responses", type=Path)
    parser.add_argument("split", type=Path)
    parser.add_argument("--out", type=Path)
    a = parser.parse_args(argv)
    rows, docs = read_rows(a.responses), documents(a.split)
    if len(rows) != len(docs):
        raise SystemExit(f"{a.responses}: {len(rows)} rows, but {a.split} holds {len(docs)} sentences")
    tokens = [r["tokens"] for r in rows]
    gold = [r["gold_tags"] for r in rows]
    results = {}
    for rules in [(), *((r,) for r in RULES), tuple(RULES)]:
        pred = apply(tokens, docs, [r["pred_tags"] for r in rows], rules)
        m = score(gold, pred)
        name = "+".join(rules) or "none"
        results[name] = {**m, "errors": error_analysis(gold, pred)}
        per_type = " ".join(f"{t} {100 * v['f1-score']:.2f}" for t, v in m["per_type"].items())
        print(f"{name:16} P {100 * m['precision']:.2f} R {100 * m['recall']:.2f} F1 {100 * m['f1']:.2f}  {per_type}")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
