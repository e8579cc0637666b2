"""The hand-written sample datasets/sample-tech/ and its recipe: it reads as its README says, and trains and
evaluates end to end with its own types."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from qloraner import ENTITY_TYPES, QloranerError
from qloraner.config import TrainConfig, load_recipe
from qloraner.conll import Columns, labels_of, read_conll, resolve_corpus
from tests.conftest import ROOT, run_entry

SAMPLE = ROOT / "datasets" / "sample-tech"
RECIPE = load_recipe(TrainConfig, "sample-tech")[1]
README = (SAMPLE / "README.md").read_text(encoding="utf-8")
_spec = importlib.util.spec_from_file_location("sample_tech_counts", SAMPLE / "counts.py")
counts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(counts)


def _readme_types() -> tuple[str, ...]:
    """The types the README's "## Types" table names, sorted."""
    section = README.split("## Types", 1)[1].split("\n\n")[1]
    return tuple(sorted(re.findall(r"^\| ([A-Z]+) \|", section, flags=re.M)))


def test_the_recipe_names_the_sample_files():
    """The recipe reads the sample's three files (its paths are the project folder's, wherever a command runs), and
    the splits it names are the ones counts.py reports."""
    corpus = resolve_corpus(TrainConfig(**RECIPE), Path("/"))
    assert {split: Path(corpus.path(split)).resolve() for split in counts.SPLITS} == {
        split: SAMPLE / name for split, name in counts.SPLITS.items()
    }


@pytest.mark.parametrize("name", counts.SPLITS.values())
def test_a_file_is_bioes_and_reads_as_iob2(name):
    """Each file is BIOES: the detected scheme reads it as --tag-scheme bioes does, into IOB2 tags only, while
    --tag-scheme iob2 refuses its E-/S- tags; it is LF-ended ASCII of three tab-separated columns, no -DOCSTART-."""
    path = SAMPLE / name
    auto = read_conll(path)
    assert auto == read_conll(path, Columns(scheme="bioes"))
    assert {tag[0] for s in auto for tag in s.tags} == {"B", "I", "O"}
    with pytest.raises(QloranerError, match="bad NER tag '[ES]-"):
        read_conll(path, Columns(scheme="iob2"))
    raw = path.read_bytes()
    assert raw.isascii() and b"\r" not in raw and b"-DOCSTART-" not in raw
    assert {len(line.split(b"\t")) for line in raw.splitlines() if line} == {3}


@pytest.mark.parametrize("name", counts.SPLITS.values())
def test_every_type_is_in_every_file(name):
    """Every file holds exactly the types the README's table names, which are the recipe's [labels] and not
    CoNLL-2003's."""
    types = _readme_types()
    assert labels_of(read_conll(SAMPLE / name)) == types
    assert tuple(sorted(RECIPE["labels"])) == types
    assert not set(types) & set(ENTITY_TYPES)


def test_the_readme_counts_are_the_files():
    """The README's table of counts is the one counts.py prints from the files as qloraner reads them, so it cannot
    go stale; its types are the README's."""
    assert counts.table() in README
    assert tuple(sorted(set(counts.entity_counts()["train"]) - {"sentences", "tokens"})) == _readme_types()


@pytest.mark.slow  # about 25 s on 2 cores
def test_the_sample_end_to_end(tmp_path, tiny_model):
    """The recipe, with the tiny model, trains 2 steps on the sample, then evaluates 4 test sentences: the adapter
    records the sample's types with the recipe's descriptions, and the evaluation reports exactly those types."""
    out = tmp_path / "run"
    args = ["--recipe", "sample-tech", "--model", str(tiny_model), "--output-dir", str(out)]
    args += ["--limit", "8", "--batch-size", "4", "--lora-r", "4", "--max-steps", "2", "--eval-limit", "4"]
    train = run_entry("train", *args)
    assert train.returncode == 0, train.stderr[-2000:]
    assert json.loads((out / "final" / "train_config.json").read_text())["labels"] == RECIPE["labels"]
    metrics = json.loads((out / "eval-limit4" / "metrics.json").read_text())
    assert tuple(metrics["per_type"]) == _readme_types()
    assert metrics["sentences"] == 4
