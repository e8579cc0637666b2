import json
import shutil
import sys
import time
from dataclasses import replace

import pytest

from qloraner import QloranerError
from qloraner.checkpoint import latest
from qloraner.config import TrainConfig
from qloraner.train import train_adapter
from tests.conftest import (
    FIRST_STEP,
    fill,
    last_line,
    run_entry,
    sigterm_at,
    start_entry,
    tiny_args,
    tiny_config,
    wait_for,
)


def _config(tmp_path, tiny_model, conll_dir, **kw) -> TrainConfig:
    kw = {"max_steps": 6, "lr": 5e-3, "warmup_steps": 1, "lora_r": 4, "lora_alpha": 8, "save_every": 2, **kw}
    return tiny_config(tmp_path, tiny_model, conll_dir, "run", **kw)


DAMAGES = {
    "optimizer.pt cut": lambda d: (d / "optimizer.pt").write_bytes((d / "optimizer.pt").read_bytes()[:100]),
    "adapter weights emptied": lambda d: (d / "adapter_model.safetensors").write_bytes(b""),
    "adapter weights cut": lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:50]
    ),
    "train_config.json broken": lambda d: (d / "train_config.json").write_text("{not json"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_skips_a_damaged_newest_checkpoint(damage, tmp_path, tiny_model, conll_dir, capsys):
    """A damaged newest checkpoint is skipped with a line naming it and why; training resumes from the newest one
    that loads (step 2, not step 0) and finishes."""
    config = _config(tmp_path, tiny_model, conll_dir)
    assert train_adapter(config, on_step=sigterm_at(4)).preempted  # checkpoints at steps 2, 4 and 5
    newest = latest(tmp_path / "run")
    assert newest.name == "step-000005"
    DAMAGES[damage](newest)
    DAMAGES[damage](tmp_path / "run" / "step-000004")
    steps = []
    result = train_adapter(config, on_step=lambda step, m: steps.append(step))
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {newest}" in out and "step-000004" in out
    assert steps[0] == 3 and result.step == 6 and result.final.is_dir()


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, tiny_model, conll_dir):
    """When every checkpoint is damaged, resuming refuses (the damaged files stay) instead of starting over."""
    config = _config(tmp_path, tiny_model, conll_dir)
    train_adapter(config, on_step=sigterm_at(3))  # checkpoints at steps 2 and 4
    for ckpt in (tmp_path / "run").glob("step-*"):
        DAMAGES["optimizer.pt cut"](ckpt)
    with pytest.raises(QloranerError, match=r"no checkpoint loads; --no-resume starts over"):
        train_adapter(config)
    assert len(list((tmp_path / "run").glob("step-*"))) == 2


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(
    small_disk, tmp_path, tiny_model, conll_dir, monkeypatch
):
    """The disk fills up just before the step-4 checkpoint: one error line names the checkpoint and the newest
    complete one, the half-written folder is gone, step 2 stays intact; with space again, the run resumes there."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = _config(tmp_path, tiny_model, conll_dir, output_dir=str(small_disk / "run"))

    def fill_at_4(step, _metrics):
        if step == 4:
            fill(small_disk)

    with pytest.raises(
        QloranerError,
        match=r"step-000004: could not write the checkpoint \(No space left on device\); "
        r"the newest complete one is .*step-000002",
    ):
        train_adapter(config, on_step=fill_at_4)
    run = small_disk / "run"
    assert latest(run).name == "step-000002" and not list(run.glob(".step-*"))
    (small_disk / "filler").unlink()
    steps = []
    result = train_adapter(config, on_step=lambda step, m: steps.append(step))
    assert steps[0] == 3 and result.final.is_dir()


def test_a_second_training_on_the_same_folder_is_refused_until_the_first_dies(tmp_path, tiny_model, conll_dir):
    """While one training holds --output-dir, a second one exits with one line naming the folder and the owner's
    pid; once the first is killed (SIGKILL: no clean-up), the folder is free again."""
    out = tmp_path / "run"
    args = tiny_args(tiny_model, conll_dir, out, "--no-eval")
    first = start_entry(sys.executable, "-m", "qloraner.train", *args, "--max-steps", "100000")
    try:
        wait_for(first, FIRST_STEP)  # training has begun: the lock is held
        second = run_entry("train", *args, "--max-steps", "2")
        assert second.returncode == 2
        assert last_line(second.stderr) == (
            f"error: {out}: another training (pid {first.pid}) is using this folder; wait for it, or give another "
            "--output-dir"
        )
    finally:
        first.kill()
        first.wait()
    time.sleep(0.1)
    third = run_entry("train", *args, "--max-steps", "2", "--no-resume")
    assert third.returncode == 0, third.stderr[-2000:]
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 2
    shutil.rmtree(out)


def test_changed_label_descriptions_do_not_resume_or_count_as_trained(tmp_path, tiny_model, conll_dir):
    """The typed prompt names each type's description: a run whose recipe's [labels] now describes a type otherwise
    than its checkpoint learned neither resumes from it nor takes its final adapter as already trained; the error
    names the type and both descriptions. Unchanged descriptions extend the run as usual."""
    config = _config(tmp_path, tiny_model, conll_dir, prompt="typed", labels={"PER": "people"}, max_steps=2)
    train_adapter(config)
    for steps in (2, 4):  # finished with these settings; then extending it
        changed = replace(config, labels={"PER": "persons"}, max_steps=steps)
        with pytest.raises(QloranerError, match=r"incompatible checkpoint, trained with \[labels\] PER='people' "):
            train_adapter(changed)
    assert train_adapter(replace(config, max_steps=4)).step == 4
