"""MLflow: the tracking URI from $MLFLOW_TRACKING_URI, else a sqlite store in the output directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


def git_revision() -> str:
    """$QLORANER_REVISION where it is set (a copy of the tree on a GPU node, whose .git may not be the tree's), else
    the checkout's short commit."""
    if "QLORANER_REVISION" in os.environ:
        return os.environ["QLORANER_REVISION"]
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(output_dir: Path, experiment: str, run_id: str | None = None, run_name: str | None = None):
    """Start (or, given run_id, continue) a run. A local store keeps its artifacts beside it."""
    output_dir = Path(output_dir).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir / 'mlflow.db'}"
    output_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        local = uri.startswith("sqlite:")
        exp_id = client.create_experiment(
            experiment, artifact_location=(output_dir / "mlartifacts").as_uri() if local else None
        )
    else:
        exp_id = found.experiment_id
    return mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name)
