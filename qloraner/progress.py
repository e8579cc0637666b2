"""Progress for long work: a tqdm bar in a terminal, plain dated lines in a log file or a SLURM log."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    """12:05 for minutes and seconds, 3:12:05 past an hour.

    >>> _clock(3725.4)
    '1:02:05'
    """
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts work done out of `total`. On a terminal it draws a tqdm bar; on any other stream it prints a line
    every `every_s` seconds and at every `every_frac` of the work, and one at the end, so that a log written
    by a batch job shows where the job is and when it will end."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        initial: int = 0,
        enabled: bool = True,
        stream=None,
        every_s: float = 30.0,
        every_frac: float = 0.05,
    ) -> None:
        self.total, self.done, self.desc, self.unit = total, initial, desc, unit
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.every_s, self.step = every_s, max(1, int(total * every_frac))
        self.start = self.last = time.monotonic()
        self.warm: tuple[float, int] | None = None  # (time, count) after the first update: the rate starts there
        self.info: dict[str, str] = {}
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **info: float) -> None:
        """Count `n` more; `info` (loss=…, tokens_per_s=…) is shown beside the count."""
        before, self.done = self.done, self.done + n
        self.info = {k: f"{v:.4g}" for k, v in info.items()}
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(self.info, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.warm is None:  # the first unit pays for compiling and warm-up: later rates leave it out
            self.warm = (now, self.done)
        if now - self.last >= self.every_s or before // self.step != self.done // self.step or self.done >= self.total:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        """`train 120/878 (13.7%) loss=0.41 tokens_per_s=7210 0.99 steps/s | 2:01 elapsed, ETA 12:45`; the rate
        and ETA leave out the first update's time, and are `?` until a later update has come: the first step of a
        compiled run takes a minute that no later step takes, and an ETA from it would say hours."""
        elapsed = now - self.start
        rate = 0.0  # until a second update: the first one's time is warm-up, not a rate
        if self.warm and self.done > self.warm[1]:
            since, count = self.warm
            rate = (self.done - count) / (now - since) if now > since else 0.0
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        info = "".join(f" {k}={v}" for k, v in self.info.items())
        pct = 100 * self.done / self.total if self.total else 100.0
        shown = f"{rate:.3g}" if rate > 0 else "?"
        return (
            f"{self.desc} {self.done}/{self.total} ({pct:.1f}%){info} {shown} {self.unit}/s"
            f" | {_clock(elapsed)} elapsed, ETA {eta}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
