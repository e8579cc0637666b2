"""MLflow: the tracking URI from $MLFLOW_TRACKING_URI, else a sqlite store in the output directory."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

from qloraner import ROOT, QloranerError, first_line

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https")
PROBE_S = 5.0  # seconds a tracking server has to answer before training or decoding starts
# What SQLAlchemy reads as URI syntax in a sqlite path: a query, or a %XX escape (another file, elsewhere). Quoting
# them does not help: MLflow creates the quoted name's parent folder as it stands, beside the real one.
EXPERIMENT_NAME_MAX = 256  # MLflow's experiments.name column: sqlite stores longer names, server databases refuse
SQLITE_URI_SYNTAX = re.compile(r"\?|%[0-9A-Fa-f]{2}")


def git_revision() -> str:
    """$QLORANER_REVISION where it is set (a copy of the tree on a GPU node, whose .git may not be the tree's), else
    the checkout's short commit."""
    if "QLORANER_REVISION" in os.environ:
        return os.environ["QLORANER_REVISION"]
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tracking_uri(output_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite store in `output_dir` (refused where its path would read as a URI's
    query or escapes: the store would land in another file, or not open)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    path = Path(output_dir).resolve()
    if found := SQLITE_URI_SYNTAX.search(str(path)):
        raise QloranerError(
            f"{output_dir}: MLflow's sqlite store cannot be in a path holding {found.group()[0]!r} (sqlite reads it as "
            "part of a URI); rename the folder, or set MLFLOW_TRACKING_URI"
        )
    return f"sqlite:///{path / 'mlflow.db'}"


def check_tracking(output_dir: Path) -> str:
    """The tracking URI, checked within seconds before any long work: a database URI, or a server that answers
    its health check. Anything else is one error line that names the URI and what to do."""
    uri = tracking_uri(output_dir)
    scheme = uri.partition(":")[0].split("+")[0].lower() if "://" in uri else ""
    unset = "unset it to log to <output-dir>/mlflow.db"
    if scheme == "sqlite" and uri.startswith("sqlite:///"):
        check_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    if scheme in DATABASE_SCHEMES:
        return uri
    if scheme not in SERVER_SCHEMES:
        raise QloranerError(
            f"MLFLOW_TRACKING_URI={uri}: not a URI MLflow 3 tracks to; give sqlite:///path/mlflow.db or "
            f"http://host:port of an `mlflow server`, or {unset}"
        )
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_S) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise QloranerError(
            f"MLFLOW_TRACKING_URI={uri}: no MLflow server answers ({reason}); start it, or {unset}"
        ) from None
    return uri


def check_sqlite_store(path: Path) -> None:
    """One line naming an existing sqlite store that sqlite cannot read (cut, or not a database), before any work:
    MLflow would fail on it only when the run starts, in a traceback. A new or empty file passes. Opened read-write
    but never created: a writer killed mid-transaction leaves a hot journal that only a writer may roll back (a
    read-only probe reads it as "attempt to write a readonly database"); the check writes nothing else."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=PROBE_S)) as db:
            found = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as err:
        found = first_line(err)
    if found != "ok":
        raise QloranerError(
            f"{path}: not a readable MLflow store ({found}); "
            "move it away to start a new one, or set MLFLOW_TRACKING_URI"
        )


@contextlib.contextmanager
def _store_lock(uri: str):
    """Creating a sqlite store (tables, migrations) and its experiment takes turns under a lock beside the file: two
    runs starting on one new store at once would both create it, and one fail. Other stores need no lock."""
    import fcntl

    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        handle = open(uri.removeprefix("sqlite:///") + ".lock", "a")
    except OSError:  # its folder is missing or read-only: MLflow's own error says which
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: as before, unserialized
            pass
        yield


def check_experiment(name: str) -> str:
    """--experiment, or one line saying why MLflow cannot store it: empty or blank (a run nobody finds by name), or
    longer than the experiments table's name column."""
    if not name.strip():
        raise QloranerError("--experiment: empty; give a name (default: qloraner)")
    if len(name) > EXPERIMENT_NAME_MAX:
        raise QloranerError(
            f"--experiment: {len(name)} characters, more than {EXPERIMENT_NAME_MAX}; give a shorter name"
        )
    return name


def start_run(output_dir: Path, experiment: str, run_id: str | None = None, run_name: str | None = None):
    """Start (or, given run_id, continue) a run. A local store keeps its artifacts beside it."""
    import mlflow  # here, not at the top: the checks before the work need no MLflow (its import takes seconds)
    from mlflow.tracking import MlflowClient

    check_experiment(experiment)
    output_dir = Path(output_dir).resolve()
    uri = tracking_uri(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # it also exports MLFLOW_TRACKING_URI: a later run here would inherit this store
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    with _store_lock(uri):
        client = MlflowClient()
        found = client.get_experiment_by_name(experiment)
        if found is None:
            local = uri.startswith("sqlite:")
            artifacts = (output_dir / "mlartifacts").as_uri() if local else None
            exp_id = client.create_experiment(experiment, artifact_location=artifacts)
        else:
            exp_id = found.experiment_id
    return mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name)


def end_run(status: str = "FINISHED") -> None:
    """End the active run once every metric logged with synchronous=False is written (ending alone only queues)."""
    import mlflow

    mlflow.flush_async_logging()
    mlflow.end_run(status=status)
