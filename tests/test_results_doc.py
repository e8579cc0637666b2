"""benchmarks/RESULTS.md stays one readable page, and every raw file under benchmarks/results/ backs a row of it."""

import re

from tests.conftest import ROOT

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RAW = ROOT / "benchmarks" / "results"
MAX_CELL, MAX_LINE = 200, 120


def _rows(path):
    """The table rows of a Markdown file (separator lines left out), each as its list of stripped cells."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [line.strip() for line in lines if line.startswith("|") and not re.match(r"^\|( *-+ *\|)+$", line.strip())]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def _raw_files():
    return sorted(path.name for path in RAW.iterdir() if path.is_file() and path.name != "README.md")


def test_no_cell_over_200_characters():
    """No table cell of RESULTS.md is longer than 200 characters: history and long explanations live elsewhere."""
    long = [(cell[:60], len(cell)) for row in _rows(RESULTS) for cell in row if len(cell) > MAX_CELL]
    assert not long


def test_lines_outside_tables_fit_120_characters():
    """Outside tables, no line of RESULTS.md or of benchmarks/results/README.md is longer than 120 characters."""
    for path in (RESULTS, RAW / "README.md"):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert not [line[:60] for line in lines if not line.startswith("|") and len(line) > MAX_LINE], path


def test_every_raw_file_is_named_by_a_row():
    """Each raw file is named by a table row of RESULTS.md and listed in benchmarks/results/README.md."""
    rows = "\n".join(" | ".join(row) for row in _rows(RESULTS))
    listed = {row[0].strip("`") for row in _rows(RAW / "README.md")[1:]}
    for name in _raw_files():
        assert f"`{name}`" in rows, f"{name}: named by no row of RESULTS.md"
        assert name in listed, f"{name}: not listed in benchmarks/results/README.md"


def test_every_named_raw_file_exists():
    """Every file named in the raw column of RESULTS.md or listed in benchmarks/results/README.md exists there."""
    cells = [row[-1] for row in _rows(RESULTS)] + [row[0] for row in _rows(RAW / "README.md")]
    named = {name for cell in cells for name in re.findall(r"`([\w.+-]+\.(?:json|txt|log|jsonl\.gz))`", cell)}
    missing = named - set(_raw_files())
    assert named and not missing, missing


def test_the_readme_fits_a_screen_and_names_revisions_only_in_its_results():
    """README.md stays a page a newcomer reads in two minutes: at most 150 lines of at most 120 characters, and commit
    hashes only in its Results excerpt (history lives in RESULTS.md and git)."""
    lines = (RESULTS.parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 120] == []
    results = lines.index("## Results")
    assert [line for line in lines[:results] if re.search(r"`[0-9a-f]{7}`", line)] == []
