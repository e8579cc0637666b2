"""Settings: one frozen dataclass per job, each field documented, all errors reported at once."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

from qloraner import QloranerError
from qloraner.data import TEMPLATES
from qloraner.parse import RENDERERS


def opt(default, doc: str, **kw):
    """A settings field with its documentation (shown by --help)."""
    return field(default=default, metadata={"doc": doc, **kw})


def _choice_errors(config) -> list[str]:
    """One error per field with `choices` whose value is set and not among them (argparse checks flags; this,
    settings built in Python)."""
    return [
        f"--{f.name.replace('_', '-')}: {getattr(config, f.name)!r} is not one of {', '.join(f.metadata['choices'])}"
        for f in fields(config)
        if "choices" in f.metadata and getattr(config, f.name) is not None and getattr(config, f.name) not in f.metadata["choices"]
    ]


@dataclass(frozen=True)
class TrainConfig:
    model: str = opt("smollm2-135m-instruct", "base checkpoint: a local folder, a hub id, or the embedded default")
    data_dir: str | None = opt(None, "CoNLL-2003 folder (train/valid/test.txt); default $CONLL_DIR, then datasets/conll2003")
    output_dir: str = opt("outputs/run", "where checkpoints, the final adapter and the MLflow store go")
    prompt: str = opt("simple", "prompt template", choices=tuple(TEMPLATES))
    response_format: str = opt("lines", "answer the model learns: [TYPE] mention lines, or one JSON object", choices=tuple(RENDERERS))
    epochs: float = opt(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int = opt(0, "optimizer steps to run; 0 derives them from --epochs")
    limit: int = opt(0, "use only the first N training sentences (0 = all)")
    batch_size: int = opt(16, "sequences per optimizer step, the same whatever the number of processes")
    micro_batch_size: int = opt(0, "most sequences per forward pass in one process (memory); 0 = batch size / processes")
    lr: float = opt(2e-4, "peak learning rate")
    warmup_steps: int = opt(10, "linear warm-up steps before cosine decay")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(0.3, "gradient-norm clip (the QLoRA paper's 0.3); 0 disables")
    lora_r: int = opt(64, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_dropout: float = opt(0.1, "LoRA dropout")
    target_modules: str = opt("q_proj,v_proj", "comma-separated module names, or all-linear")
    max_length: int = opt(512, "truncate examples to this many tokens")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward (non-reentrant)")
    compile: bool = opt(False, "torch.compile each decoder layer: fewer, fused kernels (GPUs need Triton; the first step compiles)")
    seed: int = opt(42, "seed for data order, dropout and LoRA init")
    save_every: int = opt(200, "save a checkpoint every N optimizer steps (0 = only at the end)")
    log_every: int = opt(1, "log metrics to MLflow every N steps")
    resume: bool | None = opt(None, "resume from the newest complete checkpoint; default: when one exists")
    eval_after: bool = opt(True, "evaluate the final adapter on the test split after training", flag="eval")
    eval_limit: int = opt(0, "sentences of the test split evaluated after training (0 = all 3,453)")
    experiment: str = opt("qloraner", "MLflow experiment name")

    def __post_init__(self) -> None:
        errors = [
            f"--{f.name.replace('_', '-')}: must be > 0" for f in fields(self)
            if f.name in ("batch_size", "lr", "lora_r", "lora_alpha", "max_length", "log_every")
            and not getattr(self, f.name) > 0
        ]
        errors += [
            f"--{f.name.replace('_', '-')}: must be >= 0" for f in fields(self)
            if f.name in ("max_steps", "micro_batch_size", "limit", "warmup_steps", "weight_decay", "max_grad_norm", "save_every", "epochs", "eval_limit")
            and not getattr(self, f.name) >= 0
        ]
        if not 0 <= self.lora_dropout < 1:
            errors.append("--lora-dropout: must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append("--min-lr-ratio: must be in [0, 1]")
        errors += _choice_errors(self)
        if self.max_steps == 0 and self.epochs == 0:
            errors.append("--epochs or --max-steps: one must be > 0")
        if not self.target_module_list:
            errors.append("--target-modules: name at least one module")
        if errors:
            raise QloranerError("invalid settings: " + "; ".join(errors))

    @property
    def target_module_list(self) -> list[str] | str:
        names = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return "all-linear" if names == ["all-linear"] else names


@dataclass(frozen=True)
class EvalConfig:
    model: str | None = opt(None, "base checkpoint; default: the adapter's base, else the embedded default")
    adapter: str | None = opt(None, "trained LoRA adapter folder (e.g. outputs/run/final); none evaluates the base")
    data_dir: str | None = opt(None, "CoNLL-2003 folder; default $CONLL_DIR, then datasets/conll2003")
    split: str = opt("test", "split to evaluate", choices=("train", "valid", "test"))
    limit: int = opt(0, "evaluate only the first N sentences (smoke runs; 0 = the full split)")
    batch_size: int = opt(64, "prompts per generation batch")
    max_new_tokens: int = opt(256, "upper bound on generated tokens (also bounded by sentence length)")
    max_prompt_tokens: int = opt(1024, "prompts longer than this are truncated (counted and reported)")
    prompt: str | None = opt(None, "prompt template; default: the adapter's, else simple", choices=tuple(TEMPLATES))
    response_format: str | None = opt(None, "answer format the prompt asks for; default: the adapter's, else lines", choices=tuple(RENDERERS))
    compare_base: bool = opt(False, "also evaluate the base model and write a side-by-side table")
    merge: bool = opt(False, "merge the adapter into the NF4 base dequantized to bf16 (faster; the same weights it was trained on)")
    output_dir: str | None = opt(None, "where metrics and responses go; default <adapter>/../eval or outputs/eval")
    experiment: str = opt("qloraner", "MLflow experiment name")

    def __post_init__(self) -> None:
        errors = [f"--{n.replace('_', '-')}: must be > 0" for n in ("batch_size", "max_new_tokens", "max_prompt_tokens") if not getattr(self, n) > 0]
        if self.limit < 0:
            errors.append("--limit: must be >= 0")
        errors += _choice_errors(self)
        if self.compare_base and not self.adapter:
            errors.append("--compare-base: needs --adapter")
        if self.merge and not self.adapter:
            errors.append("--merge: needs --adapter")
        if errors:
            raise QloranerError("invalid settings: " + "; ".join(errors))


_TYPES = {"int": int, "float": float, "str": str}


def parser_for(cls, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per field, its help taken from the field's doc."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        base_type = str(f.type).replace(" | None", "")  # annotations are strings here
        kwargs = {"default": f.default, "help": f.metadata["doc"], "dest": f.name}
        if base_type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=_TYPES[base_type], choices=f.metadata.get("choices"), **kwargs)
    return parser


def from_args(cls, argv: list[str] | None, description: str):
    return cls(**vars(parser_for(cls, description).parse_args(argv)))


def as_dict(config) -> dict:
    return dataclasses.asdict(config)
