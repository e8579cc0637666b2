import io
import re

from hypothesis import given
from hypothesis import strategies as st

from qloraner.progress import Progress

LINE = re.compile(r"^work (\d+)/(\d+) \((\d+\.\d)%\)( loss=\S+)? \S+ items/s \| \d+:\d\d elapsed, ETA (\d+:\d\d|\?)$")


@given(total=st.integers(1, 500), chunk=st.integers(1, 7), every_frac=st.sampled_from([0.05, 0.1, 0.5]))
def test_a_log_stream_gets_a_line_per_share_of_the_work_and_one_at_the_end(total, chunk, every_frac):
    """On a stream that is not a terminal, a line is printed each time the count crosses a multiple of
    `every_frac` of the total and when the work is done; every line has count, percentage, rate and ETA."""
    stream = io.StringIO()
    progress = Progress(total, "work", "items", stream=stream, every_s=1e9, every_frac=every_frac)
    done, expected = 0, 0
    step = max(1, int(total * every_frac))
    while done < total:
        n = min(chunk, total - done)
        crossed = done // step != (done + n) // step or done + n >= total
        progress.update(n, loss=0.5)
        done += n
        expected += crossed
    lines = stream.getvalue().splitlines()
    assert len(lines) == expected
    assert all(LINE.match(line) for line in lines), lines
    assert lines[-1].startswith(f"work {total}/{total} (100.0%)")


def test_a_time_interval_prints_between_shares():
    """With every_s = 0 every update prints, even inside one share of the work."""
    stream = io.StringIO()
    progress = Progress(1000, "work", "items", stream=stream, every_s=0.0)
    for _ in range(3):
        progress.update(1)
    assert [int(LINE.match(line).group(1)) for line in stream.getvalue().splitlines()] == [1, 2, 3]


def test_disabled_progress_prints_nothing():
    """Ranks other than 0 count silently."""
    stream = io.StringIO()
    progress = Progress(10, "work", "items", stream=stream, enabled=False)
    progress.update(10)
    assert stream.getvalue() == "" and progress.done == 10


def test_the_rate_leaves_out_a_slow_first_unit():
    """A first step that compiles for long gives no rate and no ETA (`?`: from it alone they would say hours), and
    does not drag those of later lines: they count from it."""
    stream = io.StringIO()
    progress = Progress(100, "work", "items", stream=stream, every_s=0.0)
    progress.start -= 1000.0  # the first unit took 1,000 s
    progress.update(1)
    for _ in range(9):
        progress.update(1)
    first, last = stream.getvalue().splitlines()[0], stream.getvalue().splitlines()[-1]
    assert first.endswith("? items/s | 16:40 elapsed, ETA ?"), first  # 1 item in 1,000 s: no rate yet
    assert float(last.split(" items/s")[0].rsplit(" ", 1)[1]) > 1.0 and "ETA 0:" in last
