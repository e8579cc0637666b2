"""Settings: one frozen dataclass per job, each field documented, all errors reported at once; recipes as TOML."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from qloraner import ROOT, QloranerError
from qloraner.conll import TAG_SCHEMES
from qloraner.labels import description_errors
from qloraner.parse import RENDERERS
from qloraner.prompts import TEMPLATES

RECIPES = ROOT / "recipes"
RECIPE_PATHS = ("data_dir", "train_file", "valid_file", "test_file", "output_dir")  # resolved from the recipe
DEFAULT_RECIPE = "smollm2-135m"  # the embedded default model's recipe: applies when no --recipe is given


def opt(default, doc: str, **kw):
    """A settings field with its documentation (shown by --help) and its checks: `gt`, `ge`, `lt`, `le` bounds,
    `choices`, `flag` (the flag's name when it differs from the field's), `parse` (the flag's value parser) and
    `shown` (what --help says the default is, where None means something other than auto), `recipe_only` (set
    by a recipe's section, no flag) and `engine` (a speed switch of the engine: accepted, left out of --help, listed
    in docs/ENGINE.md)."""
    return field(default=default, metadata={"doc": doc, **kw})


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of a settings field."""
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def batch_size_or_auto(text: str) -> int | str:
    """'auto' or a whole number (the flag's parser; bounds are checked with the other settings)."""
    return text if text == "auto" else int(text)


_BOUNDS = {
    "gt": (">", lambda v, b: v > b),
    "ge": (">=", lambda v, b: v >= b),
    "lt": ("<", lambda v, b: v < b),
    "le": ("<=", lambda v, b: v <= b),
}


def _bound_message(meta: dict) -> str:
    """'must be > 0' for one bound, 'must be in [0, 1)' for two."""
    low = next((k for k in ("gt", "ge") if k in meta), None)
    high = next((k for k in ("lt", "le") if k in meta), None)
    if low and high:
        return f"must be in {'(' if low == 'gt' else '['}{meta[low]}, {meta[high]}{')' if high == 'lt' else ']'}"
    key = low or high
    return f"must be {_BOUNDS[key][0]} {meta[key]}"


def field_errors(config) -> list[str]:
    """One error per field whose value breaks its bounds, is not finite, or is not among its choices."""
    errors = []
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{flag(f)}: must be a finite number")
        elif isinstance(value, (int, float)) and not all(
            check(value, meta[key]) for key, (_, check) in _BOUNDS.items() if key in meta
        ):
            errors.append(f"{flag(f)}: {_bound_message(meta)}")
        if "choices" in meta and value is not None and value not in meta["choices"]:
            errors.append(f"{flag(f)}: {value!r} is not one of {', '.join(meta['choices'])}")
    return errors


def raise_if(errors: list[str]) -> None:
    if errors:
        raise QloranerError("invalid settings: " + "; ".join(errors))


@dataclass(frozen=True)
class DataSettings:
    """data: where the splits are and how their files read (training passes them on to its evaluation)."""

    data_dir: str | None = opt(
        None, "a folder of train.txt, valid.txt, test.txt; default $CONLL_DIR, else datasets/conll2003"
    )
    train_file: str | None = opt(
        None,
        "the train split's file, any name: columns, .jsonl (doccano) or .json (Label Studio)",
        shown="<data dir>/train.txt",
    )
    valid_file: str | None = opt(None, "the valid split's file, as --train-file", shown="<data dir>/valid.txt")
    test_file: str | None = opt(None, "the test split's file, as --train-file", shown="<data dir>/test.txt")
    token_column: int = opt(0, "column files: the token's column (0 = the first; negative counts from the end)")
    tag_column: int = opt(-1, "column files: the NER tag's column (-1 = the last)")
    tag_scheme: str = opt(
        "auto",
        "column files: the tags' scheme, read as IOB2; auto: BIOES or BILOU where the file holds their "
        "E-/S- or L-/U- tags, else IOB1/IOB2 (they read alike)",
        choices=TAG_SCHEMES,
    )

    def data_errors(self) -> list[str]:
        """The data settings' errors (an empty path is refused where it is resolved, as every path flag's)."""
        if self.token_column == self.tag_column:
            return [f"--token-column, --tag-column: both {self.tag_column}; the token and the tag need two columns"]
        return []

    @property
    def data_settings(self) -> dict:
        """The data settings by name, to pass on (a training to its evaluation)."""
        return {f.name: getattr(self, f.name) for f in fields(DataSettings)}


@dataclass(frozen=True)
class DecodeSettings:
    """decoding: the adapter and the engine's settings that tagging and serving share (their classes add theirs)."""

    adapter: str | None = opt(None, "trained LoRA adapter folder (e.g. outputs/run/final); required")
    model: str | None = opt(None, "base checkpoint; default: the adapter's base")
    batch_size: int | str = opt(
        "auto", "prompts per generation batch; auto sizes it from free GPU memory", gt=0, parse=batch_size_or_auto
    )
    max_new_tokens: int = opt(
        0, "cap on generated tokens; 0 = what a perfect answer to the sentence can need (cut answers are counted)", ge=0
    )
    max_prompt_tokens: int = opt(
        1024, "longer prompts drop their context, then cut their sentence (the rest is O)", gt=0
    )
    cuda_graphs: bool = opt(True, "replay the decode step as CUDA graphs on a GPU")

    def decode_errors(self) -> list[str]:
        """Every field's bound errors, a missing adapter, and a --batch-size that is neither auto nor a number."""
        errors = field_errors(self)
        if not self.adapter:
            errors.append("--adapter: name the trained adapter folder (or set QLORANER_ADAPTER)")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            errors.append(f"--batch-size: {self.batch_size!r} is neither auto nor a whole number")
        return errors


@dataclass(frozen=True)
class TrainConfig(DataSettings):
    recipe: str | None = opt(None, "a recipe in recipes/ (by name) or a TOML file")
    model: str = opt("smollm2-135m-instruct", "base checkpoint: a local folder, a hub id, or the embedded default")
    output_dir: str = opt(
        str(ROOT / "outputs" / "run"), "where checkpoints, the final adapter and the MLflow store go"
    )  # the project's, wherever the command runs: as the evaluation's outputs/eval
    prompt: str = opt("simple", "prompt template", choices=tuple(TEMPLATES))
    response_format: str = opt(
        "lines",
        "answer the model learns: [TYPE] mention lines, one JSON object, or the sentence with [TYPE mention] inline",
        choices=tuple(RENDERERS),
    )
    epochs: float = opt(1.0, "passes over the training data (ignored when --max-steps is set)", ge=0)
    max_steps: int = opt(0, "optimizer steps to run; 0 derives them from --epochs", ge=0)
    limit: int = opt(0, "use only the first N training sentences (0 = all)", ge=0)
    batch_size: int = opt(16, "sequences per optimizer step, the same whatever the number of processes", gt=0)
    micro_batch_size: int = opt(
        0, "most sequences per forward pass in one process (memory); 0 = batch / processes", ge=0
    )
    micro_batch_tokens: int | None = opt(
        None,
        "most padded tokens (rows x longest row) per forward pass: a step of long sentences splits into more "
        "micro-batches, bounding the peak memory; 0 = no bound; default: chosen from --memory-gib or the memory "
        "available, unless --micro-batch-size is set",
        ge=0,
    )
    memory_gib: float = opt(
        0.0,
        "memory training may use for its micro-batches, in GiB; 0 = what there is: 0.85 of the GPU's free memory, "
        "or a quarter of the machine's available memory (or cgroup limit) on a CPU",
        ge=0,
    )
    lr: float = opt(2e-4, "peak learning rate", gt=0)
    warmup_steps: int = opt(10, "linear warm-up steps before cosine decay", ge=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr", ge=0, le=1)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = opt(0.3, "gradient-norm clip (the QLoRA paper's 0.3); 0 disables", ge=0)
    lora_r: int = opt(64, "LoRA rank", gt=0)
    lora_alpha: int = opt(16, "LoRA alpha", gt=0)
    lora_dropout: float = opt(0.1, "LoRA dropout", ge=0, lt=1)
    target_modules: str = opt("q_proj,v_proj", "comma-separated module names, or all-linear")
    max_length: int = opt(512, "truncate examples to this many tokens", gt=0)
    gradient_checkpointing: bool | None = opt(
        None,
        "recompute activations in backward (non-reentrant): less memory, slower steps; default: off where a full "
        "micro-batch fits --memory-gib or the memory available without it, else on (the plan line says which)",
    )
    compile: bool | None = opt(
        None,
        "torch.compile each decoder layer; default: on for CUDA GPUs with Triton and a C "
        "compiler, off elsewhere (the first steps compile)",
        engine=True,
    )
    frozen_copies: bool | None = opt(
        None,
        "multiply by the frozen base's NF4 weights dequantized once (the same products, no dequantization per "
        "matmul); default: on GPUs when the copies take at most 1 GiB (a 135M model: 0.2 GiB; a 7B one stays 4-bit)",
        engine=True,
    )
    dequantize_in_graph: bool | None = opt(
        None,
        "with --compile, the NF4 weights left 4-bit are dequantized by each compiled layer's own fused kernels instead "
        "of bitsandbytes' operations (the same values); default: on with --compile",
        engine=True,
    )
    cuda_graphs: bool | None = opt(
        None,
        "replay each micro-batch shape's forward and backward as one CUDA graph (one launch for thousands); "
        "default: on with --compile on a GPU without --gradient-checkpointing (with it only when asked: a higher peak)",
        engine=True,
    )
    seed: int = opt(42, "seed for data order, dropout and LoRA init")
    save_every: int = opt(200, "save a checkpoint every N optimizer steps (0 = only at the end)", ge=0)
    log_every: int = opt(1, "log metrics to MLflow every N steps", gt=0)
    resume: bool | None = opt(None, "resume from the newest complete checkpoint; default: when one exists")
    eval_after: bool = opt(True, "evaluate the final adapter after training (on --eval-split)", flag="eval")
    eval_limit: int = opt(0, "sentences of the split evaluated after training (0 = all)", ge=0)
    eval_split: str = opt(
        "test", "split evaluated after training (choose settings on valid)", choices=("train", "valid", "test")
    )
    train_split: str = opt(
        "train",
        "what the adapter learns from: train, or train+valid for a final run once settings are chosen on valid",
        choices=("train", "train+valid"),
    )
    compare_base: bool = opt(False, "also evaluate the base model after training: a side-by-side table")
    experiment: str = opt("qloraner", "MLflow experiment name")
    labels: dict | None = opt(
        None,
        "one-line descriptions of entity types for the typed and fewshot prompts, a recipe's [labels] section "
        "(PSN = \"people\"); the types are the training data's. The adapter's train_config.json keeps every type "
        'it learned, described or "" (CoNLL-2003\'s types keep their own descriptions)',
        recipe_only=True,
    )

    def __post_init__(self) -> None:
        errors = field_errors(self) + self.data_errors()
        if self.labels is not None:
            errors += description_errors(self.labels)
        if self.max_steps == 0 and self.epochs == 0:
            errors.append("--epochs or --max-steps: one must be > 0")
        if self.dequantize_in_graph and (self.compile is False or self.frozen_copies):
            errors.append("--dequantize-in-graph: needs --compile and 4-bit weights (not --frozen-copies)")
        if self.cuda_graphs and self.compile is False:
            errors.append("--cuda-graphs: needs --compile (the layers' kernels, launched from the graph)")
        if not self.target_module_list:
            errors.append("--target-modules: name at least one module")
        if self.eval_after and self.eval_split in self.train_splits[1:]:
            errors.append(
                f"--eval-split {self.eval_split}: the adapter learns from it (--train-split {self.train_split})"
            )
        raise_if(errors)

    @property
    def train_splits(self) -> tuple[str, ...]:
        return tuple(self.train_split.split("+"))

    @property
    def target_module_list(self) -> list[str] | str:
        names = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        return "all-linear" if names == ["all-linear"] else names


@dataclass(frozen=True)
class EvalConfig(DataSettings):
    model: str | None = opt(None, "base checkpoint; default: the adapter's base, else the embedded default")
    adapter: str | None = opt(None, "trained LoRA adapter folder (e.g. outputs/run/final); none evaluates the base")
    split: str = opt("test", "split to evaluate", choices=("train", "valid", "test"))
    limit: int = opt(0, "evaluate only the first N sentences (smoke runs; 0 = the full split)", ge=0)
    batch_size: int | str = opt(
        "auto",
        "prompts per generation batch; auto sizes it from free GPU memory and the model's KV cache (64 on CPU)",
        gt=0,
        parse=batch_size_or_auto,
    )
    max_new_tokens: int = opt(
        0, "cap on generated tokens; 0 = what a perfect answer to the sentence can need (cut answers are counted)", ge=0
    )
    max_prompt_tokens: int = opt(1024, "prompts longer than this are truncated (counted and reported)", gt=0)
    prompt: str | None = opt(None, "prompt template; default: the adapter's, else simple", choices=tuple(TEMPLATES))
    response_format: str | None = opt(
        None, "answer format the prompt asks for; default: the adapter's, else lines", choices=tuple(RENDERERS)
    )
    compare_base: bool = opt(False, "also evaluate the base model and write a side-by-side table")
    merge: bool = opt(False, "merge the adapter into the NF4 base dequantized to bf16 (the weights it was trained on)")
    cuda_graphs: bool = opt(True, "replay the decode step as CUDA graphs on a GPU (--no-cuda-graphs: run it eagerly)")
    output_dir: str | None = opt(None, "where metrics and responses go; default <adapter>/../eval or outputs/eval")
    verbose: bool = opt(False, "print where the start-up's seconds went, as one line (MLflow holds it either way)")
    experiment: str = opt("qloraner", "MLflow experiment name")

    def __post_init__(self) -> None:
        errors = field_errors(self) + self.data_errors()
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            errors.append(f"--batch-size: {self.batch_size!r} is neither auto nor a whole number")
        if self.compare_base and not self.adapter:
            errors.append("--compare-base: needs --adapter")
        if self.merge and not self.adapter:
            errors.append("--merge: needs --adapter")
        raise_if(errors)


def _base_type(f: dataclasses.Field) -> str:
    return str(f.type).replace(" | None", "")  # annotations are strings here (postponed evaluation)


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}


def load_recipe(cls, name: str) -> tuple[str, dict]:
    """(name, settings) of a recipe: `recipes/<name>.toml`, or a path to a TOML file. Unknown keys and wrong
    types are reported all at once, naming the file."""
    path = Path(name) if name.endswith(".toml") or "/" in name else RECIPES / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.toml")))
        raise QloranerError(f"recipe not found: {name} (give a TOML file or one of: {known})")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise QloranerError(f"{path}: not a valid TOML recipe: {err}") from None
    by_name = {f.name: f for f in fields(cls) if f.name != "recipe"}
    errors = [f"unknown key {k!r}" for k in values if k not in by_name]
    errors += [
        f"{k} = {v!r} is not {_base_type(by_name[k])}"
        for k, v in values.items()
        if k in by_name
        and (
            not isinstance(v, _TYPES[_base_type(by_name[k])])
            or (isinstance(v, bool) and _base_type(by_name[k]) != "bool")
        )
    ]
    if errors:
        raise QloranerError(f"{path}: " + "; ".join(errors) + f" (keys: {', '.join(by_name)})")
    # a recipe's relative paths are its own, not the folder a command runs in: the project's for recipes/, else the
    # TOML file's folder
    in_project = path.parent == RECIPES
    base = ROOT if in_project else path.parent
    values |= {k: str(base / v) for k, v in values.items() if k in RECIPE_PATHS and v and not Path(v).is_absolute()}
    return (path.stem if in_project else str(path)), values


def parser_for(cls, description: str, recipe: tuple[str, dict] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per field. Unset flags stay out of the result, so that a recipe can
    fill them: precedence is flags > recipe > the field's default. --help shows the value a run will use: the
    recipe's, where `recipe` (its name and settings) sets one, else the built-in default."""
    name, values = recipe or (None, {})
    engine = [flag(f) for f in fields(cls) if f.metadata.get("engine")]
    epilog = f"engine switches, chosen per machine ({', '.join(engine)}): docs/ENGINE.md" if engine else None
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS, epilog=epilog)
    groups = _groups(cls, parser)
    shown = sorted((f for f in fields(cls) if not f.metadata.get("recipe_only")), key=lambda f: f.name in groups)
    for f in shown:
        shown = f.metadata.get("shown") or ("auto" if f.default is None else repr(f.default))
        if f.name in values:
            shown = f"{values[f.name]!r}, from recipe {name}"
        if f.name == "recipe" and name:
            shown = repr(name)
        shown_help = f"{f.metadata['doc']} (default: {shown})".replace("%", "%%")
        kwargs = {"help": argparse.SUPPRESS if f.metadata.get("engine") else shown_help, "dest": f.name}
        group = groups.get(f.name) or parser
        if _base_type(f) == "bool":
            group.add_argument(flag(f), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parse = f.metadata.get("parse") or _TYPES[_base_type(f)][-1]
            group.add_argument(flag(f), type=parse, choices=f.metadata.get("choices"), **kwargs)
    return parser


def _groups(cls, parser: argparse.ArgumentParser) -> dict:
    """An argument group per settings class that `cls` extends (DataSettings, DecodeSettings), titled by its
    docstring (`data: where the splits are ...`), for the fields it declares; --help lists them after the job's own."""
    groups = dict.fromkeys(vars(cls).get("__annotations__", {}))  # the job's own fields (None: no group)
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            title, _, about = (base.__doc__ or "").strip().splitlines()[0].partition(": ")
            group = parser.add_argument_group(title, about)
            groups |= {name: group for name in vars(base).get("__annotations__", {}) if name not in groups}
    return {name: group for name, group in groups.items() if group}


def from_args(cls, argv: list[str] | None, description: str):
    """Settings from the command line; for a class with a `recipe` field, the recipe fills what the flags leave."""
    if "recipe" not in {f.name for f in fields(cls)}:
        return cls(**vars(parser_for(cls, description).parse_args(argv)))
    early = argparse.ArgumentParser(add_help=False)  # the recipe first: --help then shows its values
    early.add_argument("--recipe", default=DEFAULT_RECIPE)
    recipe = load_recipe(cls, early.parse_known_args(argv)[0].recipe)
    given = vars(parser_for(cls, description, recipe).parse_args(argv))
    return cls(**{**recipe[1], **given, "recipe": recipe[0]})


def as_dict(config) -> dict:
    return dataclasses.asdict(config)
