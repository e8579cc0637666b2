"""The deployment path: Dockerfile, shell scripts, a real SLURM cluster and a real MLflow server.

SLURM tests need the one-node cluster that .ci/run starts (tests/slurm/start.sh); elsewhere they
skip, except under CI=true, where a missing cluster fails them.
"""

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dockerfile
import pytest

from tests.conftest import ROOT, SHARED

SCRIPTS = [
    "env.sh",
    "run_train.sh",
    "run_eval.sh",
    "run_tag.sh",
    "run_serve.sh",
    "run_export.sh",
    "run_tests.sh",
    "slurm_job.sbatch",
    ".ci/run",
    "datasets/fetch_conll2003.sh",
    "tests/slurm/start.sh",
    "tests/slurm/stop.sh",
    *map(str, Path(ROOT).glob("benchmarks/*.sh")),
]
IN_CI = os.environ.get("CI") == "true"


def _need(condition: bool, why: str) -> None:
    if not condition:
        (pytest.fail if IN_CI else pytest.skip)(why)


def test_dockerfile_copies_what_exists_and_runs_an_entry_point():
    """Every COPY source exists, the CMD is an executable entry point, the base is a CUDA image, no secret is baked
    in."""
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    by_cmd = {}
    for c in commands:
        by_cmd.setdefault(c.cmd.lower(), []).append(c)
    assert by_cmd["from"][0].value[0].startswith("nvidia/cuda:")
    assert by_cmd["workdir"][-1].value == ("/workspace",)
    for copy in by_cmd["copy"]:
        for source in copy.value[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} missing"
    (cmd,) = by_cmd["cmd"]
    entry = ROOT / cmd.value[0]
    assert entry.is_file() and os.access(entry, os.X_OK)
    assert not re.search(
        r"TOKEN|SECRET|PASSWORD", (ROOT / "Dockerfile").read_text().replace("HUGGINGFACE_HUB_TOKEN", ""), re.I
    )
    assert "HUGGINGFACE_HUB_TOKEN" not in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_python_passes_ruff(command):
    """The package, the tests and the benchmark are clean under `ruff check` and `ruff format --check` (line
    length 120, pyproject.toml)."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "qloraner", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_scripts_pass_shellcheck():
    """Every shell entry point and helper is clean under shellcheck."""
    _need(shutil.which("shellcheck") is not None, "shellcheck is not installed")
    proc = subprocess.run(["shellcheck", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_each_test_kept_on_one_worker_exists():
    """Every test that conftest's SHARED keeps with its group is a test function of the file it names: a renamed one
    would run beside its group again (a second SLURM job on the one node, a second default run)."""
    for nodeid in SHARED:
        path, name = nodeid.split("::")
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, nodeid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store and a temp artifact root; stopped by pid."""
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_train_and_eval_log_to_a_real_mlflow_server(mlflow_server, tmp_path, tiny_model, conll_dir):
    """run_train.sh (with its evaluation) logs params, metrics and artifacts that the server's REST API returns."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "CONLL_DIR": str(conll_dir)}
    proc = subprocess.run(
        [
            str(ROOT / "run_train.sh"),
            "--model",
            str(tiny_model),
            "--limit",
            "8",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--lora-r",
            "4",
            "--eval-limit",
            "3",
            "--experiment",
            "server-test",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = _api(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=server-test")["experiment"]
    runs = {
        r["info"]["run_name"]: r
        for r in _api(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    }
    train = next(r for name, r in runs.items() if name != "eval-fine-tuned")
    params = {p["key"]: p["value"] for p in train["data"]["params"]}
    assert params["lora_r"] == "4" and params["max_steps"] == "3"
    assert {m["key"] for m in train["data"]["metrics"]} >= {"loss", "lr", "grad_norm", "tokens_per_s"}
    listing = _api(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={train['info']['run_id']}&path=adapter")
    assert "adapter/adapter_model.safetensors" in {f["path"] for f in listing["files"]}
    evaluation = runs["eval-fine-tuned"]
    assert {m["key"] for m in evaluation["data"]["metrics"]} >= {"f1", "precision", "recall", "f1_PER"}
    listing = _api(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={evaluation['info']['run_id']}&path=eval")
    assert {"eval/metrics.json", "eval/responses.jsonl", "eval/comparison.md"} <= {f["path"] for f in listing["files"]}


def _slurm_env(extra: dict) -> dict:
    _need(
        bool(os.environ.get("SLURM_CONF")) and shutil.which("sbatch") is not None,
        "no SLURM cluster (start tests/slurm/start.sh)",
    )
    return {**os.environ, **extra}


def _job(job_id: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(job_id: str, env: dict, until, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(job_id, env)
        if until(info):
            return info
        time.sleep(2)
    raise AssertionError(f"job {job_id} timed out: {_job(job_id, env)}")


_NAMES: dict[str, str] = {}


def _submit(env: dict, cpus: int = 1) -> str:
    """sbatch with a fresh job name, so the logs/NAME-ID.* files hold this job's lines only."""
    (ROOT / "logs").mkdir(exist_ok=True)
    name = f"qtest-{os.getpid()}-{time.time_ns()}"
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--cpus-per-task={cpus}",
            "--mem=6G",
            "--time=20",
            "slurm_job.sbatch",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    _NAMES[job] = name
    return job


def _log(job_id: str) -> str:
    return "".join((ROOT / "logs" / f"{_NAMES[job_id]}-{job_id}.{k}").read_text() for k in ("out", "err"))


@pytest.mark.slow
def test_sbatch_job_trains_then_evaluates(tmp_path, tiny_model, conll_dir):
    """sbatch slurm_job.sbatch on the real one-node cluster: COMPLETED, with an adapter, metrics.json and logs."""
    out = tmp_path / "job"
    env = _slurm_env(
        {
            "CONLL_DIR": str(conll_dir),
            "QLORANER_OUTPUT_DIR": str(out),
            "QLORANER_TRAIN_ARGS": f"--model {tiny_model} --limit 8 --max-steps 3 --batch-size 4 --lora-r 4 "
            "--eval-limit 3",
        }
    )
    job = _submit(env)
    info = _wait(job, env, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600)
    print(
        f"scontrol show job {job}: JobState={info['JobState']} Restarts={info['Restarts']} ExitCode={info['ExitCode']}"
    )
    assert info["JobState"] == "COMPLETED", _log(job)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "eval-limit3" / "metrics.json").read_text())["sentences"] == 3  # beside eval/
    assert f"qloraner job {job}, restart 0" in _log(job)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_usr1_checkpoints_requeues_and_resumes(tmp_path, tiny_model, conll_dir, nproc):
    """USR1 to a running job (1 process, or 2 gloo ranks under torchrun): it checkpoints, requeues
    itself, resumes where it stopped and completes."""
    out = tmp_path / "job"
    env = _slurm_env(
        {
            "CONLL_DIR": str(conll_dir),
            "QLORANER_OUTPUT_DIR": str(out),
            "QLORANER_NPROC": str(nproc),
            "OMP_NUM_THREADS": "1",
            "QLORANER_TRAIN_ARGS": f"--model {tiny_model} --limit 16 --max-steps 160 --batch-size 8 "
            "--micro-batch-size 4 --lora-r 4 --save-every 25 --eval-limit 2",
        }
    )
    job = _submit(env, cpus=nproc)
    deadline = time.time() + 300
    while not (out / "step-000025").is_dir():  # training is under way
        assert time.time() < deadline and _job(job, env).get("JobState") in ("PENDING", "RUNNING"), _log(job)
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=env)
    _wait(job, env, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", 300)
    # SLURM holds a requeued job about 3 minutes before it is eligible again. Release it early, but only once
    # the node has finished killing the first run: a job started before that is refused ("credential revoked").
    deadline = time.time() + 120
    while subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout.strip() != "idle":
        assert time.time() < deadline, "the node never became idle after the requeue"
        time.sleep(1)
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=False)
    info = _wait(job, env, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600)
    print(
        f"scontrol show job {job}: JobState={info['JobState']} Restarts={info['Restarts']} ExitCode={info['ExitCode']}"
    )
    log = _log(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    resumed = re.search(r"resuming from .*step-(\d{6}) at step (\d+)", log)
    assert resumed and int(resumed[2]) >= 25, log
    # one process exits 75 (checkpoint saved); torchrun reports its workers' exit its own way
    assert re.search(
        rf"qloraner job {job}: checkpoint saved \(exit {75 if nproc == 1 else '[0-9]+'}\); requeueing", log
    ), log
    assert f"{nproc} process(es)" in log
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 160
    assert nproc == 1 or (out / "final" / "rng-1.pt").is_file()


def _entry(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """./run_<script>.sh ARGS run from `cwd` (MLflow in the output folder); no traceback allowed."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([str(ROOT / f"run_{script}.sh"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def test_relative_paths_are_the_users_not_the_projects(tmp_path, tiny_model, conll_dir):
    """Run from another folder, the entry points read --data-dir and write --output-dir relative to that folder
    (not the project's), and an evaluation finds a relative --adapter there; nothing lands in the project."""
    shutil.copytree(conll_dir, tmp_path / "mydata")
    flags = ["--model", str(tiny_model), "--limit", "4", "--batch-size", "4", "--lora-r", "4", "--max-steps", "1"]
    proc = _entry("train", *flags, "--data-dir", "mydata", "--output-dir", "myout", "--no-eval", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "myout" / "final" / "adapter_model.safetensors").is_file() and not (ROOT / "myout").exists()
    proc = _entry("eval", "--adapter", "myout/final", "--data-dir", "mydata", "--limit", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "myout" / "eval-limit2" / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("script", "flag"),
    [("train", "--output-dir"), ("train", "--data-dir"), ("train", "--model"), ("eval", "--output-dir")],
)
def test_an_empty_path_is_refused_in_one_line(script, flag, tmp_path, tiny_model, conll_dir):
    """An empty path flag (an unset shell variable, say) ends in one line naming the flag and exit code 2; it is
    never taken as the current folder, the project folder or the default, and no run is written."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    args = ["--model", str(tiny_model), "--data-dir", str(conll_dir), "--output-dir", str(out), "--limit", "2"]
    more = ["--max-steps", "1", "--no-eval"] if script == "train" else []
    proc = _entry(script, *args, *more, flag, "", cwd=cwd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {flag}: empty; give a path"
    assert not list(cwd.iterdir()) and not (ROOT / "mlflow.db").exists()
    assert not (out / "mlflow.db").exists() and not (out / "final").exists()
