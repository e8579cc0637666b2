"""Where a command's start-up seconds go: a stopwatch of named phases up to its first decoded sentence.

The entry points (evaluate, tag_cli) call STOPWATCH.begin() first thing in main(), which books the seconds since the
process started as "imports" (tag_cli books its later import of the model code there too); `with stopwatch("model
load"):` books a phase; respond() books "first sentence" when the engine hands back its first finished sentence (its
warm-up: kernels, CUDA graphs and the first chunk). --verbose prints the breakdown as one line; ./run_eval.sh logs it
to MLflow as startup_<phase>_s metrics.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager

FIRST_SENTENCE = "first sentence"


def process_age() -> float | None:
    """Seconds since this process started (the interpreter's start included), from /proc; None where there is none."""
    try:
        with open("/proc/self/stat") as stat:
            started = int(stat.read().rpartition(")")[2].split()[19])  # field 22: start time, clock ticks after boot
    except (OSError, ValueError, IndexError):
        return None
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Seconds per start-up phase, in the order first booked, and the process's age at its first decoded sentence."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.first_sentence_at: float | None = None  # process age when the first sentence came back

    def begin(self) -> None:
        """Forget earlier phases and book the time since the process started (what the imports took) as imports."""
        self.phases.clear()
        self.first_sentence_at = None
        age = process_age()
        if age is not None:
            self.phases["imports"] = age

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    @contextmanager
    def __call__(self, phase: str):
        """Book the block's wall seconds to `phase` (added to what it already holds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def until_first(self, progress):
        """`progress` (what the engine calls update(n) on), booking the seconds from now to its first update as the
        first sentence's; a later decoding in the same process books nothing."""
        if FIRST_SENTENCE in self.phases:
            return progress
        return _FirstUpdate(progress, self)

    def line(self) -> str:
        """One line: each phase's seconds, then when the first sentence came."""
        parts = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in self.phases.items())
        tail = f"; first sentence {self.first_sentence_at:.2f} s after the start" if self.first_sentence_at else ""
        return f"qloraner: start-up: {parts or 'nothing timed'}{tail}"

    def metrics(self) -> dict[str, float]:
        """startup_<phase>_s per phase (phase names as identifiers), and startup_to_first_sentence_s."""
        found = {f"startup_{_slug(phase)}_s": round(seconds, 3) for phase, seconds in self.phases.items()}
        if self.first_sentence_at:
            found["startup_to_first_sentence_s"] = round(self.first_sentence_at, 3)
        return found


class _FirstUpdate:
    """A progress display that books the first update's arrival to a Stopwatch, then passes every update on."""

    def __init__(self, progress, watch: Stopwatch) -> None:
        self.progress, self.watch, self.start = progress, watch, time.perf_counter()

    def update(self, n: int = 1, **info: float) -> None:
        if FIRST_SENTENCE not in self.watch.phases:
            self.watch.add(FIRST_SENTENCE, time.perf_counter() - self.start)
            self.watch.first_sentence_at = process_age()
        self.progress.update(n, **info)


def _slug(phase: str) -> str:
    return re.sub(r"\W+", "_", phase.lower()).strip("_")


STOPWATCH = Stopwatch()  # the process's: entry points and the loading code share it
stopwatch = STOPWATCH.__call__
