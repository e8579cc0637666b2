"""Entity-level scores (seqeval) and an error analysis of predicted against gold spans."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from qloraner import ENTITY_TYPES
from qloraner.bio import spans

ERROR_KINDS = ("correct", "type_confusion", "boundary", "missed", "spurious")


def _known(tags: list[str], types: Sequence[str]) -> list[str]:
    """Tags of a type outside `types` become O, so no junk label reaches the report."""
    return [t if t == "O" or t[2:] in types else "O" for t in tags]


def score(gold_tags: list[list[str]], pred_tags: list[list[str]], types: Sequence[str] = ENTITY_TYPES) -> dict:
    """seqeval micro P/R/F1 (0..1) and a per-type report over exactly `types` (CoNLL-2003's by default); tags of
    other types count as O. A type the model was not trained on belongs in `types` too: its gold mentions then
    count against recall."""
    if len(gold_tags) != len(pred_tags) or any(len(g) != len(p) for g, p in zip(gold_tags, pred_tags)):
        raise ValueError("gold and predicted tags differ in shape")
    gold = [_known(list(g), types) for g in gold_tags]
    pred = [_known(list(p), types) for p in pred_tags]
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {
        t: {k: float(report[t][k]) if t in report else 0.0 for k in ("precision", "recall", "f1-score", "support")}
        for t in types
    }
    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "per_type": per_type,
    }


def error_analysis(
    gold_tags: list[list[str]], pred_tags: list[list[str]], types: Sequence[str] = ENTITY_TYPES
) -> dict[str, int]:
    """Counts of correct spans, type confusions (same span), boundary errors (overlap), missed, spurious; spans of
    `types` only."""
    counts: Counter[str] = Counter({k: 0 for k in ERROR_KINDS})
    for gold_seq, pred_seq in zip(gold_tags, pred_tags):
        gold, pred = spans(_known(list(gold_seq), types)), spans(_known(list(pred_seq), types))
        exact = {(s.start, s.end): s.type for s in pred}

        def overlaps(a, others):
            return any(a.start < b.end and b.start < a.end for b in others)

        for g in gold:
            if (g.start, g.end) in exact:
                counts["correct" if exact[(g.start, g.end)] == g.type else "type_confusion"] += 1
            else:
                counts["boundary" if overlaps(g, pred) else "missed"] += 1
        gold_bounds = {(s.start, s.end) for s in gold}
        counts["spurious"] += sum(1 for p in pred if (p.start, p.end) not in gold_bounds and not overlaps(p, gold))
    return dict(counts)
