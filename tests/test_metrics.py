from hypothesis import given
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from qloraner import ENTITY_TYPES
from qloraner.bio import spans
from qloraner.metrics import ERROR_KINDS, error_analysis, score
from tests.strategies import gold_and_pred


@given(gold_and_pred())
def test_score_agrees_with_seqeval(corpora):
    """Our P/R/F1 and per-type report equal seqeval's own on valid IOB2 input."""
    gold, pred = corpora
    ours = score(gold, pred)
    assert ours["precision"] == precision_score(gold, pred, zero_division=0)
    assert ours["recall"] == recall_score(gold, pred, zero_division=0)
    assert ours["f1"] == f1_score(gold, pred, zero_division=0)
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    for t in ENTITY_TYPES:
        if t in report:
            assert ours["per_type"][t]["f1-score"] == report[t]["f1-score"]


def test_junk_labels_never_reach_the_report():
    """A label outside the four types never appears as a report key, and is not credited."""
    gold = [["B-PER", "O"]]
    pred = [["B-PER", "B-THE SENTENCE IDENTIFIES FOUR NAMED ENTITIES"]]
    out = score(gold, pred)
    assert set(out["per_type"]) == set(ENTITY_TYPES)
    assert out["precision"] == 1.0


@given(gold_and_pred())
def test_error_analysis_accounts_for_every_span(corpora):
    """Every gold span is counted once as correct, confused, boundary or missed."""
    gold, pred = corpora
    counts = error_analysis(gold, pred)
    assert set(counts) == set(ERROR_KINDS)
    n_gold = sum(len(spans(g)) for g in gold)
    assert counts["correct"] + counts["type_confusion"] + counts["boundary"] + counts["missed"] == n_gold
    n_correct = sum(len(set(spans(g)) & set(spans(p))) for g, p in zip(gold, pred))
    assert counts["correct"] == n_correct


def test_error_kinds_on_a_known_case():
    """One of each error kind is recognised where it is planted."""
    gold = [["B-PER", "O", "B-LOC", "I-LOC", "O", "B-ORG", "O", "O"]]
    pred = [["B-ORG", "O", "B-LOC", "O", "O", "O", "O", "B-MISC"]]
    counts = error_analysis(gold, pred)
    assert (counts["type_confusion"], counts["boundary"], counts["missed"], counts["spurious"], counts["correct"]) == (
        1,
        1,
        1,
        1,
        0,
    )
