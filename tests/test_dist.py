"""torchrun with gloo on the CPU: two ranks must compute what one process computes."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import FIRST_STEP, ROOT, tiny_args, wait_for


def _env(nproc: int, conll_dir) -> dict[str, str]:
    """The environment of an entry point run on `nproc` ranks (MLflow in its output folder)."""
    env = {**os.environ, "CONLL_DIR": str(conll_dir), "QLORANER_NPROC": str(nproc), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(script: str, nproc: int, args: list[str], conll_dir) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(ROOT / script), *args], capture_output=True, text=True, env=_env(nproc, conll_dir), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_two_ranks_train_the_same_adapter_as_one(tmp_path, tiny_model, conll_dir):
    """2 ranks (gloo) with 8 sequences a step give the LoRA weights of 1 rank with 8 a step, to 1e-5 (fp32).
    The 1-rank run accumulates 2 micro-batches of 4; each of the 2 ranks runs 1 micro-batch of 4, and steps of
    long sentences split further under --micro-batch-tokens (into 3 on one rank, 4 on two). 17 sentences: steps of
    8, 8, 1 (one rank idles on a weight-0 batch), then the next epoch."""
    common = [
        "--model",
        str(tiny_model),
        "--limit",
        "17",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--micro-batch-tokens",
        "400",
        "--max-steps",
        "5",
        "--lr",
        "5e-3",
        "--lora-r",
        "8",
        "--lora-dropout",
        "0",
        "--max-grad-norm",
        "0",
        "--no-eval",
    ]
    _run("run_train.sh", 1, [*common, "--output-dir", str(tmp_path / "one")], conll_dir)
    _run("run_train.sh", 2, [*common, "--output-dir", str(tmp_path / "two")], conll_dir)
    one = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert torch.linalg.norm(two[key] - value) <= 1e-5 * torch.linalg.norm(value), key
    runs = {}
    for name in ("one", "two"):
        client = MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name("qloraner").experiment_id])[0]
        runs[name] = (
            run.data.params,
            [m.value for m in client.get_metric_history(run.info.run_id, "grad_norm")],
            [m.value for m in client.get_metric_history(run.info.run_id, "micro_batches")],
        )
    assert (runs["two"][0]["world_size"], runs["two"][0]["accumulation_per_process"]) == ("2", "1")
    assert runs["one"][0]["accumulation_per_process"] == "2"
    assert max(runs["one"][2]) > 2 and max(runs["two"][2]) > 1  # the token bound split some steps further
    assert len(runs["one"][1]) == 5 and runs["two"][1] == pytest.approx(
        runs["one"][1], rel=1e-5
    )  # the gradient's scale too


def test_sharded_evaluation_equals_one_process(tmp_path, tiny_model, tiny_adapter, conll_dir):
    """run_eval.sh on 2 ranks writes a byte-identical responses.jsonl and the same scores as 1 rank."""
    args = [
        "--model",
        str(tiny_model),
        "--adapter",
        str(tiny_adapter),
        "--split",
        "valid",
        "--limit",
        "9",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "4",
    ]
    _run("run_eval.sh", 1, [*args, "--output-dir", str(tmp_path / "one")], conll_dir)
    _run("run_eval.sh", 2, [*args, "--output-dir", str(tmp_path / "two")], conll_dir)
    assert (tmp_path / "one" / "responses.jsonl").read_bytes() == (tmp_path / "two" / "responses.jsonl").read_bytes()
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for key in ("precision", "recall", "f1", "per_type", "errors", "parse_failures", "sentences", "generated_tokens"):
        assert m1[key] == m2[key], key
    assert (m1["world_size"], m2["world_size"]) == (1, 2)


def _worker(out: Path, local_rank: int) -> int:
    """The pid of the torchrun worker of `local_rank` that trains into `out`."""
    for proc in Path("/proc").iterdir():
        try:
            mine = str(out) in (proc / "cmdline").read_bytes().decode(errors="replace")
            if mine and f"LOCAL_RANK={local_rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError):  # gone, not ours, or not a process
            continue
    raise AssertionError(f"no worker of rank {local_rank} trains into {out}")


def test_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path, tiny_model, conll_dir):
    """SIGTERM to rank 1 alone (2 ranks, gloo) stops both after the same step (the flag travels in the step's one
    all-reduce): rank 0 names that step's checkpoint, which holds both ranks' RNG states and that step."""
    out = tmp_path / "run"
    args = tiny_args(tiny_model, conll_dir, out, "--no-eval", "--max-steps", "100000", "--save-every", "0")
    proc = subprocess.Popen(
        [str(ROOT / "run_train.sh"), *args],
        cwd=ROOT,
        env=_env(2, conll_dir),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait_for(proc, FIRST_STEP)
    os.kill(_worker(out, 1), signal.SIGTERM)
    rest = proc.communicate(timeout=300)[0]
    stopped = re.search(r"qloraner: stopped at step (\d+): saved (\S+); run again to resume", rest)
    assert stopped, rest[-3000:]
    ckpt = Path(stopped.group(2))
    assert ckpt.name == f"step-{int(stopped.group(1)):06d}" and {"rng-0.pt", "rng-1.pt"} <= {
        f.name for f in ckpt.iterdir()
    }
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == int(stopped.group(1))
