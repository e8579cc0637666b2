"""torchrun with gloo on the CPU: two ranks must compute what one process computes."""

import json
import os
import subprocess

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import ROOT


def _run(script: str, nproc: int, args: list[str], conll_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONLL_DIR": str(conll_dir), "QLORANER_NPROC": str(nproc), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(ROOT / script), *args], capture_output=True, text=True, env=env, cwd=ROOT)
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
