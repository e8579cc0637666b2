import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_train_speed_runs_the_product_beside_the_peer(tmp_path, conll_dir, llama2_tokenizer_dir):
    """bench.py train-speed on a tiny random LLaMA (CPU), the all-linear recipe, compiled: the peer and ./run_train.sh
    both train, the speeds and the compile count come from the product's own MLflow metrics (no compile after the first
    step), the checkpointing choice from its logged plan, and the printed row names the command and the raw JSON."""
    env = {**os.environ, "CONLL_DIR": str(conll_dir), "LLAMA2_TOKENIZER": str(llama2_tokenizer_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["--out", str(tmp_path), "train-speed", "--recipe", "smollm2-135m", "--shape", "tiny", "--steps", "4"]
    args += ["--peer-steps", "3", "--", "--compile"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench.py", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (raw,) = tmp_path.glob("train-speed-*/result.json")
    result = json.loads(raw.read_text())
    assert result["ours"]["steps"] == 4 and result["ours"]["tokens_per_s"] > 0 and result["peer"]["tokens_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["ours"]["tokens_per_s"] / result["peer"]["tokens_per_s"])
    row = proc.stdout.strip().splitlines()[-1]
    assert row.startswith("| tiny shape, recipe smollm2-135m, 4 steps | cpu |") and str(raw) in row
    assert "python3 benchmarks/bench.py" in row and "×**" in row and "(0 compiles after it)" in row
    assert f"checkpointing {result['ours']['checkpointing']}" in row
    assert result["ours"]["compiles_after_first"] == 0 and result["peer"]["compiles_after_first"] is None


@pytest.mark.slow
def test_eval_speed_on_a_shape_decodes_each_row_its_recorded_length(tmp_path, conll_dir, llama2_tokenizer_dir):
    """bench.py eval-speed --shape tiny (CPU): every prompt decodes exactly the length its response took in the
    given responses file (+1 for its EOS), NF4 + LoRA and bf16, with and without CUDA graphs (eager on a CPU) and with
    PyTorch's attention, NF4 also with its 4-bit kernels at each step, the `generate` and `pipeline` peers run on the
    first sentences, and the row names the command and the raw JSON."""
    env = {**os.environ, "CONLL_DIR": str(conll_dir), "LLAMA2_TOKENIZER": str(llama2_tokenizer_dir)}
    lengths = [3, 9, 1, 14, 6, 2, 11, 5]
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"generated_tokens": n}) + "\n" for n in lengths))
    args = ["--out", str(tmp_path), "eval-speed", "--shape", "tiny", "--lengths", str(responses)]
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench.py",
            *args,
            "--peer-sentences",
            "4",
            "--also-eager",
            "--also-pytorch-attention",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (raw,) = tmp_path.glob("eval-speed-tiny-*/result.json")
    result = json.loads(raw.read_text())
    assert result["sentences"] == len(lengths) and result["generated_tokens"] == sum(lengths) + len(lengths)
    kinds = ("", "-eager", "-pytorch-attention")
    assert set(result["ours"]) == {m + k for m in ("nf4-lora", "bf16") for k in kinds} | {"nf4-lora-4bit-each-step"}
    assert result["ours"]["bf16-pytorch-attention"]["engine"]["attention"] == "pytorch"
    assert result["ours"]["nf4-lora-4bit-each-step"]["engine"]["dequantized_bytes"] == 0
    assert result["peer_static"]["sentences"] == result["peer"]["sentences"] == 4
    row = proc.stdout.strip().splitlines()[-1]
    assert row.startswith("| tiny shape, 8 test prompts") and str(raw) in row and "python3 benchmarks/bench.py" in row


@pytest.mark.slow
def test_eval_speed_on_an_adapter_runs_each_variant_and_both_peers(tmp_path, tiny_adapter, conll_dir):
    """bench.py eval-speed on a trained adapter (CPU): ./run_eval.sh once per variant (batch sizes, --merge,
    --no-cuda-graphs), the pipeline and generate peers on the first sentences, ours scored on those same sentences,
    and the speed-ups computed from the figures it records."""
    env = {**os.environ, "CONLL_DIR": str(conll_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["--out", str(tmp_path), "eval-speed", "--adapter", str(tiny_adapter), "--batch-sizes", "4,2", "--merge"]
    args += ["--also-eager", "--peer-sentences", "3", "--", "--limit", "6", "--max-new-tokens", "12"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench.py", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (raw,) = tmp_path.glob("eval-speed-2*/result.json")
    result = json.loads(raw.read_text())
    assert list(result["ours"]) == ["b4", "b4-merged", "b4-eager", "b2"]
    assert all(v["sentences"] == 6 and 0 <= v["f1_on_peer_sentences"] <= 1 for v in result["ours"].values())
    best = max(v["sentences_per_s"] for v in result["ours"].values())
    for key in ("peer", "peer_static"):
        assert result[key]["sentences"] == 3
        assert result[f"speedup_{key}"] == pytest.approx(best / result[key]["sentences_per_s"])
