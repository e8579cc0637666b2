import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest

from qloraner import QloranerError
from qloraner.tracking import check_sqlite_store, check_tracking
from tests.conftest import last_line, run_entry, tiny_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "/tmp/a-plain-folder", "ftp://127.0.0.1/x", "mlruns"])
def test_a_uri_mlflow_3_does_not_track_to_is_named(uri, monkeypatch, tmp_path):
    """A file store, a plain folder or another scheme is refused in one line naming the URI and what to give."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(QloranerError, match=rf"MLFLOW_TRACKING_URI={uri}: not a URI MLflow 3 tracks to; give sqlite"):
        check_tracking(tmp_path)


def test_default_and_database_uris_pass_without_a_probe(monkeypatch, tmp_path):
    """No URI means a sqlite store in the output folder; database URIs are taken as they are."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert check_tracking(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u@127.0.0.1/db")
    assert check_tracking(tmp_path) == "postgresql://u@127.0.0.1/db"


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_a_server_that_is_not_running_fails_within_seconds(module, tmp_model_args, tmp_path):
    """Training and evaluation pointed at a server nobody runs stop before any work, in seconds, with one line
    naming the URI; no output files are written."""
    uri = f"http://127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    start = time.monotonic()
    proc = run_entry(module, *tmp_model_args, "--output-dir", str(out), env={"MLFLOW_TRACKING_URI": uri})
    assert time.monotonic() - start < 60 and proc.returncode == 2
    assert last_line(proc.stderr).startswith(f"error: MLFLOW_TRACKING_URI={uri}: no MLflow server answers")
    assert not list(out.glob("step-*")) and not (out / "metrics.json").exists()


@pytest.fixture
def tmp_model_args(request, tiny_model, conll_dir):
    """Flags of a tiny run of the module under test (training: 2 steps, no evaluation; evaluation: 2 sentences)."""
    common = ["--model", str(tiny_model), "--data-dir", str(conll_dir), "--limit", "2"]
    if request.node.callspec.params["module"] == "train":
        return [*common, "--max-steps", "2", "--batch-size", "2", "--no-eval"]
    return [*common, "--max-new-tokens", "4"]


@pytest.mark.parametrize(
    "name", ["run #1", "a:b&c", "run?1", "50%20off", "50%"], ids=["hash-space", "colon", "?", "%20", "%"]
)
def test_an_output_folder_name_never_moves_or_breaks_the_mlflow_store(name, tmp_path, tiny_model, conll_dir):
    """A training into a folder whose name holds URI characters keeps its MLflow store in that folder (a finished
    run in it, nothing written beside it), or, where sqlite would read the name as another path ('?', '%'), is
    refused at once in one line naming the character (a lone '%' is no escape: it works)."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / name
    proc = run_entry("train", *tiny_args(tiny_model, conll_dir, out, "--max-steps", "1", "--no-eval"), timeout=300)
    bad = "?" if "?" in name else "%" if "%20" in name else None
    if bad:
        assert proc.returncode == 2 and last_line(proc.stderr) == (
            f"error: {out}: MLflow's sqlite store cannot be in a path holding {bad!r} (sqlite reads it as part of a "
            "URI); rename the folder, or set MLFLOW_TRACKING_URI"
        ), proc.stderr[-2000:]
        assert not (out / "final").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        run_id = json.loads((out / "final" / "trainer_state.json").read_text())["run_id"]
        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        assert client.get_run(run_id).info.status == "FINISHED"
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("name", ["", "   ", "x" * 300], ids=["empty", "blank", "huge"])
def test_an_experiment_name_mlflow_cannot_store_is_one_line(name, tmp_path, tiny_model, conll_dir):
    """An empty, blank or over-long (> 256 characters, MLflow's column) --experiment ends in one line naming the
    flag and exit code 2, not a traceback, and no MLflow run is started."""
    out = tmp_path / "run"
    proc = run_entry(
        "train", *tiny_args(tiny_model, conll_dir, out, "--max-steps", "1", "--no-eval"), "--experiment", name
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr).startswith("error: --experiment: ")
    assert not (out / "final").exists()


@pytest.mark.parametrize("damage", ["cut", "random-bytes"])
def test_a_damaged_mlflow_store_is_one_line_before_any_work(damage, tmp_path, tiny_model, conll_dir):
    """An mlflow.db cut in half or holding random bytes ends training in one line naming it and what to do (move it
    away, or set MLFLOW_TRACKING_URI), exit code 2, before the model loads; the file is left as it was."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    out.mkdir()
    db = out / "mlflow.db"
    if damage == "cut":
        MlflowClient(f"sqlite:///{db}").create_experiment("test")
        os.truncate(db, db.stat().st_size // 2)
    else:
        db.write_bytes(random.Random(0).randbytes(50_000))
    before = db.read_bytes()
    proc = run_entry("train", *tiny_args(tiny_model, conll_dir, out, "--max-steps", "1", "--no-eval"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr).startswith(f"error: {db}: not a readable MLflow store (")
    assert last_line(proc.stderr).endswith("move it away to start a new one, or set MLFLOW_TRACKING_URI")
    assert not proc.stdout.strip() and db.read_bytes() == before


KILLED_WRITER = """
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=1")  # spill to the file mid-transaction: the journal becomes hot
db.execute("CREATE TABLE t(x)")
db.execute("INSERT INTO t VALUES ('committed')")
db.execute("BEGIN IMMEDIATE")
for _ in range(2000):
    db.execute("INSERT INTO t VALUES (?)", ("uncommitted" * 50,))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_store_whose_writer_was_killed_mid_write_is_readable(tmp_path):
    """A sqlite store left with a hot journal by a writer killed mid-transaction (a training killed while MLflow
    wrote) passes the store check, and the next run sees exactly the committed rows: sqlite rolls the journal back."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(db)], check=False)
    assert proc.returncode == -9 and (tmp_path / "mlflow.db-journal").stat().st_size > 0
    check_sqlite_store(db)
    assert sqlite3.connect(db).execute("SELECT x FROM t").fetchall() == [("committed",)]


RACE = """
import sys, time
from qloraner.tracking import end_run, start_run
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
start_run(sys.argv[1], "test")
end_run()
"""


def test_two_runs_creating_one_store_at_once_both_start(tmp_path):
    """Two processes starting an MLflow run in one fresh output folder at the same instant (three folders at once)
    both start it, without a traceback: creating the sqlite store and its experiment takes turns."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    at = str(time.time() + 20)  # every process imported by then, even on a busy machine
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / f"run{i}"), at], env=env, stderr=subprocess.PIPE)
        for i in range(3)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, "\n".join(e[-1500:] for e in errors)
