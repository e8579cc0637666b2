"""Adapter-only checkpoints: save atomically, find the newest complete one, check it fits, restore it."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from qloraner import QloranerError, dist
from qloraner.config import TrainConfig, as_dict

STEP_DIR = re.compile(r"^step-(\d{6})$")
FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng-0.pt", "trainer_state.json")
# Settings that change what a step computes or which data it reads: a checkpoint made with others cannot resume.
COMPATIBLE_KEYS = (
    "model",
    "lora_r",
    "lora_alpha",
    "target_modules",
    "prompt",
    "response_format",
    "batch_size",
    "seed",
    "limit",
    "recipe",
)


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"step-{step:06d}"


def save(path: Path, model, optimizer, state: dict, config: TrainConfig, rank: int = 0) -> Path:
    """Write the adapter, optimizer, RNG and data position to a temp folder, then rename it into place.

    The folder appears whole or not at all. Every rank writes its RNG state; rank 0 writes the rest
    (the adapter and optimizer are the same on every rank).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-{rank}.pt")
    dist.barrier()
    if rank == 0:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "train_config.json").write_text(json.dumps(as_dict(config), indent=2))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # last: marks the folder complete
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():  # final/ of an earlier run: move it aside, then swap
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    dist.barrier()
    return path


def latest(output_dir: Path) -> Path | None:
    """The newest complete step-NNNNNN/ checkpoint; half-written folders are skipped."""
    found = []
    for d in Path(output_dir).glob("step-*"):
        if STEP_DIR.match(d.name) and all((d / f).is_file() for f in FILES):
            try:
                found.append((json.loads((d / "trainer_state.json").read_text())["step"], d))
            except (ValueError, KeyError):
                continue
    return max(found)[1] if found else None


def check_compatible(ckpt: Path, config: TrainConfig) -> None:
    """Refuse a checkpoint made with other settings in COMPATIBLE_KEYS (one without a response format is lines)."""
    saved = {"response_format": "lines", **json.loads((ckpt / "train_config.json").read_text())}
    diff = [
        f"{k}={saved.get(k)!r} (now {getattr(config, k)!r})"
        for k in COMPATIBLE_KEYS
        if saved.get(k) != getattr(config, k)
    ]
    if diff:
        raise QloranerError(
            f"{ckpt}: incompatible checkpoint, trained with {', '.join(diff)}; use another --output-dir or --no-resume"
        )


def restore(ckpt: Path, model, optimizer, rank: int) -> dict:
    """Load the adapter, optimizer and this rank's RNG from `ckpt`; returns its trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise QloranerError(f"{ckpt}: adapter does not fit this model (unexpected {result.unexpected_keys[0]})")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    rng_file = ckpt / f"rng-{rank}.pt"
    if rng_file.is_file():  # absent when the world size grew: that rank keeps its fresh seed
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())
