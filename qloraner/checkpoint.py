"""Adapter-only checkpoints: save atomically, find the newest complete one, check it fits, restore it."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from qloraner import QloranerError, dist, first_line
from qloraner.config import TrainConfig

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
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "lora_dropout",
    "max_length",
    "train_split",
)  # epochs and max_steps may change: a run can be extended
# What a damaged file raises when loaded: a cut or emptied tensor file, a broken pickle, broken JSON.
DAMAGE = (OSError, EOFError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError, SafetensorError)


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"step-{step:06d}"


def save(path: Path, model, optimizer, state: dict, settings: dict, rank: int = 0) -> Path:
    """Write the adapter, optimizer, RNG, data position and `settings` (train_config.json: Run.saved_settings) to a
    temp folder, then rename it into place.

    The folder appears whole or not at all. Every rank writes its RNG state; rank 0 writes the rest
    (the adapter and optimizer are the same on every rank).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        return _save(path, tmp, model, optimizer, state, settings, rank)
    except (OSError, RuntimeError) as err:  # a full disk, a lost mount (torch.save raises RuntimeError for them)
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written folder goes, the complete ones stay
        newest = latest(path.parent)
        raise QloranerError(
            f"{path}: could not write the checkpoint ({write_failure(err, path.parent)}); the newest complete one "
            f"is {newest or 'none'}, and running again resumes from it"
        ) from None


def write_failure(err: Exception, folder: Path) -> str:
    """Why a write into `folder` failed, in words: the OS's reason, or a full disk where the error hides it."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        if shutil.disk_usage(folder).free < 2**20:
            return "No space left on device"
    except OSError:
        pass
    return first_line(err)


def _save(path: Path, tmp: Path, model, optimizer, state: dict, settings: dict, rank: int) -> Path:
    if torch.cuda.is_available():  # the paged optimizer state is memory the host reads itself: the update must be done
        torch.cuda.synchronize()
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
        (tmp / "train_config.json").write_text(json.dumps(settings, indent=2))
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


def complete(output_dir: Path) -> list[Path]:
    """The complete checkpoints, newest first: step-NNNNNN/ and final/ (a finished run is extended from it);
    half-written folders are skipped. At one step, a step folder comes before final/."""
    found = []
    for d in [*Path(output_dir).glob("step-*"), Path(output_dir) / "final"]:
        if (STEP_DIR.match(d.name) or d.name == "final") and all((d / f).is_file() for f in FILES):
            try:
                found.append((json.loads((d / "trainer_state.json").read_text())["step"], d.name != "final", d))
            except (ValueError, KeyError, TypeError):
                continue
    return [d for *_, d in sorted(found, reverse=True)]


def latest(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (step-NNNNNN/ or final/)."""
    found = complete(output_dir)
    return found[0] if found else None


def finished(output_dir: Path, config: TrainConfig, data_sha256: str) -> Path | None:
    """final/ when it holds a complete adapter trained with these settings on this data (a rerun then only
    evaluates it)."""
    final = Path(output_dir) / "final"
    if not all((final / f).is_file() for f in FILES):
        return None
    try:
        check_compatible(final, config)
        saved = json.loads((final / "train_config.json").read_text())
        state = json.loads((final / "trainer_state.json").read_text())
    except (QloranerError, *DAMAGE):
        return None
    same_schedule = all(saved.get(k) == getattr(config, k) for k in ("epochs", "max_steps"))
    return final if same_schedule and state.get("data_sha256") == data_sha256 else None


def check_compatible(ckpt: Path, config: TrainConfig) -> None:
    """Refuse a checkpoint made with other settings in COMPATIBLE_KEYS; a key the checkpoint predates counts as
    that setting's default (one saved before --response-format was trained on lines)."""
    settings = json.loads((ckpt / "train_config.json").read_text())
    saved = {k: settings.get(k, getattr(TrainConfig, k)) for k in COMPATIBLE_KEYS}  # a key it predates: the default
    diff = [
        f"{k}={saved.get(k)!r} (now {getattr(config, k)!r})"
        for k in COMPATIBLE_KEYS
        if saved.get(k) != getattr(config, k)
    ]
    learned = settings.get("labels") or {}  # every type the adapter learned and its description (the prompts')
    diff += [
        f"[labels] {t}={learned[t]!r} (now {meaning!r})"
        for t, meaning in (config.labels or {}).items()
        if isinstance(learned, dict) and t in learned and learned[t] != meaning
    ]
    if diff:
        raise QloranerError(
            f"{ckpt}: incompatible checkpoint, trained with {', '.join(diff)}; use another --output-dir or --no-resume"
        )
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    if config.max_steps and step > config.max_steps:  # resuming would relabel its steps as a shorter run
        raise QloranerError(
            f"{ckpt}: trained {step} steps, more than --max-steps {config.max_steps}; give --max-steps {step} or "
            "more, another --output-dir, or --no-resume"
        )


def restore_newest(output_dir: Path, config: TrainConfig, model, optimizer, rank: int) -> tuple[Path, dict] | None:
    """Restore the newest complete checkpoint that loads; a damaged one is skipped with one line saying which
    and why. None where there is no checkpoint; an error where there are some but none loads."""
    candidates = complete(output_dir)
    for ckpt in candidates:
        try:
            check_compatible(ckpt, config)
            return ckpt, restore(ckpt, model, optimizer, rank)
        except DAMAGE as err:
            print(f"qloraner: skipping damaged checkpoint {ckpt}: {first_line(err)}", flush=True)
    if candidates:
        raise QloranerError(f"{output_dir}: no checkpoint loads; --no-resume starts over (the damaged ones stay)")
    return None


def restore(ckpt: Path, model, optimizer, rank: int) -> dict:
    """Load the adapter, optimizer and this rank's RNG from `ckpt`; returns its trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise QloranerError(f"{ckpt}: adapter does not fit this model (unexpected {result.unexpected_keys[0]})")
    saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
    tensors = sum(len(group["params"]) for group in saved["param_groups"])
    if tensors != sum(len(group["params"]) for group in optimizer.param_groups):
        raise QloranerError(
            f"{ckpt}: its optimizer state holds {tensors} tensors, one per LoRA matrix (written before the optimizer "
            "kept one flat tensor); finish that run with the qloraner that started it, or --no-resume"
        )
    optimizer.load_state_dict(saved)
    rng_file = ckpt / f"rng-{rank}.pt"
    if rng_file.is_file():  # absent when the world size grew: that rank keeps its fresh seed
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())
