"""The start-up stopwatch: phases booked as they run, printed with --verbose, logged to MLflow by every evaluation."""

from __future__ import annotations

import re
import time

from hypothesis import given
from hypothesis import strategies as st

from qloraner.startup import Stopwatch, process_age
from tests.conftest import last_line, run_entry

phase_names = st.sampled_from(["imports", "tokenizer", "model load", "adapter", "engine warm-up (graphs)"])


@given(st.lists(st.tuples(phase_names, st.floats(0, 1e4)), max_size=12))
def test_each_phase_holds_the_sum_of_its_bookings_and_logs_as_an_identifier(bookings):
    """A phase booked twice holds both times; each phase is one startup_<identifier>_s metric."""
    watch = Stopwatch()
    for phase, seconds in bookings:
        watch.add(phase, seconds)
    for phase in watch.phases:
        assert watch.phases[phase] == sum(s for p, s in bookings if p == phase)
    names = list(watch.metrics())
    assert len(names) == len(watch.phases) and all(re.fullmatch(r"startup_[a-z0-9_]+_s", n) for n in names)


def test_a_block_books_its_time_and_the_first_update_the_first_sentence():
    """`with watch(phase)` books the block's seconds; the progress wrapper books the first update only, passes every
    update on, and a later decoding books no second first sentence; begin() books the process's age as imports."""
    watch, seen = Stopwatch(), []

    class Shown:
        def update(self, n=1, **info):
            seen.append(n)

    watch.begin()
    assert 0 < watch.phases["imports"] <= process_age()
    with watch("model load"):
        time.sleep(0.05)
    assert watch.phases["model load"] >= 0.05
    progress = watch.until_first(Shown())
    time.sleep(0.02)
    progress.update(2)
    progress.update(3)
    first = watch.phases["first sentence"]
    assert seen == [2, 3] and 0.02 <= first < watch.first_sentence_at
    watch.until_first(Shown()).update(1)
    assert watch.phases["first sentence"] == first
    assert re.fullmatch(
        r"qloraner: start-up: imports [\d.]+ s, model load [\d.]+ s, first sentence [\d.]+ s; "
        r"first sentence [\d.]+ s after the start",
        watch.line(),
    )


def test_run_eval_prints_its_start_up_with_verbose_and_logs_it(tmp_path, tiny_adapter, conll_dir):
    """./run_eval.sh's module with --verbose prints one start-up line naming the loading phases before its last
    line; its MLflow run holds a startup_<phase>_s metric per phase and the time to the first sentence."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "o"
    args = ("--adapter", str(tiny_adapter), "--data-dir", str(conll_dir), "--limit", "2", "--output-dir", str(out))
    proc = run_entry("evaluate", *args, "--experiment", "startup", "--verbose")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("qloraner: start-up: ")]
    for phase in ("imports", "tokenizer", "model load", "adapter", "first sentence"):
        assert re.search(rf"\b{phase} [\d.]+ s", line), line
    assert last_line(proc.stdout).startswith("qloraner: done:")
    client = MlflowClient(f"sqlite:///{tiny_adapter.parent / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("startup").experiment_id])
    logged = run.data.metrics
    for name in ("imports", "tokenizer", "model_load", "adapter", "first_sentence", "to_first_sentence"):
        assert logged[f"startup_{name}_s"] > 0
    assert "start-up" not in run_entry("evaluate", *args, "--experiment", "startup").stdout  # only with --verbose
