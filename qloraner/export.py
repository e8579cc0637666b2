"""./run_export.sh: a trained adapter merged into its base as a plain Hugging Face checkpoint (--format hf) or a GGUF
file with an Ollama Modelfile (--format gguf, qloraner/export_gguf.py) that other tools load.

The merge goes into the weights the adapter was trained on: each base weight quantized to NF4 (double quantization,
blocks of 64, as load_base quantizes it) and dequantized, plus the LoRA product; never into the original weights
(a different model) nor back into 4 bits (which loses the adapter's small updates). It streams: one base tensor at
a time is read, quantized, merged and queued for the current shard, so the host holds about one shard.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qloraner import QloranerError, run_main
from qloraner.config import field_errors, opt, parser_for, raise_if
from qloraner.progress import Progress

SETTINGS_FILE = "qloraner.json"  # marks a folder as a qloraner export (Tagger.load and ./run_eval.sh detect it)
EXPORT_VERSION = 1  # bump when qloraner.json's keys change meaning
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# the --dtype values each --format takes: safetensors hold plain floats; GGUF also llama.cpp's 8-bit blocks
FORMAT_DTYPES = {"hf": tuple(DTYPES), "gguf": (*DTYPES, "q8_0")}
# Hub ids of the bases we ship recipes for: the model card's base_model must name a Hub repository
KNOWN_BASES = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "meta-llama/Llama-2-7b-chat-hf": ("meta-llama/Llama-2-7b-chat-hf", "llama2"),
}
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # the base's weights: never copied beside ours


@dataclass(frozen=True)
class ExportConfig:
    adapter: str | None = opt(None, "trained LoRA adapter folder (e.g. outputs/run/final); required")
    output: str | None = opt(None, "folder to write the merged model into; required")
    format: str = opt(
        "hf",
        "hf: a Hugging Face checkpoint (safetensors, config, tokenizer); gguf: one GGUF file for llama.cpp and "
        "Ollama, with a Modelfile",
        choices=tuple(FORMAT_DTYPES),
    )
    dtype: str = opt(
        "bf16",
        "dtype of the merged weights (the merge itself runs in f32): bf16, f16 or f32; q8_0 (llama.cpp's 8-bit "
        "blocks) with --format gguf only, where norms stay f32",
        choices=FORMAT_DTYPES["gguf"],
    )
    max_shard_mb: int = opt(2000, "largest safetensors shard in MiB: the host holds about one", gt=0)
    overwrite: bool = opt(False, "replace an output folder that is not empty")
    license: str | None = opt(None, "licence for the model card; default: the known base's, else other")

    def __post_init__(self) -> None:
        errors = field_errors(self)
        if not self.adapter:
            errors.append("--adapter: name the trained adapter folder")
        if not self.output:
            errors.append("--output: name the folder to write")
        allowed = FORMAT_DTYPES.get(self.format, FORMAT_DTYPES["gguf"])
        if self.dtype in FORMAT_DTYPES["gguf"] and self.dtype not in allowed:
            errors.append(f"--dtype {self.dtype}: not with --format {self.format} (give {', '.join(allowed)})")
        raise_if(errors)


def lora_deltas(adapter: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Per base weight name (model.layers.0.self_attn.q_proj.weight), a function giving its adapter's update
    scale * B @ A in f32, as peft's merge computes it: made when its tensor streams by, since all the updates at
    once would take the f32 size of every adapted weight."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("modules_to_save") or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise QloranerError(f"{adapter}: export merges plain LoRA only (no DoRA, modules_to_save or fan_in_fan_out)")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        deltas[name] = lambda a=a, b=b: (b.float() @ a.float()) * scale
    if len(deltas) * 2 != len(weights):
        raise QloranerError(f"{adapter}: adapter holds weights other than LoRA A/B pairs; cannot merge them")
    return deltas


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether load_base keeps this checkpoint tensor in NF4: every linear weight of the decoder layers (in the
    LLaMA architecture, each 2-D weight under .layers.); embeddings, norms and the LM head stay as loaded."""
    return ".layers." in name and name.endswith(".weight") and tensor.dim() == 2


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """`weight` quantized as load_base quantizes it (NF4, blocks of 64, double-quantized scales) and dequantized
    to f32: bit for bit the layer's dequantized weight (tests/test_export.py)."""
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(
        weight.float(), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    return bnb.functional.dequantize_4bit(packed, state)


def base_tensors(base: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The base checkpoint's tensors one at a time, in file order (safetensors only: memory-mapped reads)."""
    from safetensors import safe_open

    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise QloranerError(f"{base}: no safetensors weights to export from (convert the base to safetensors)")
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            total += len(f.keys())
    progress = Progress(total, "export", "tensors")  # a 7B base takes minutes: a SLURM log shows where it is
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
                progress.update()
    progress.close()


def merged_tensors(base: Path, adapter: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's tensors in `dtype`, one base tensor at a time: NF4 round trip + LoRA update in f32."""
    deltas = lora_deltas(adapter)
    for name, tensor in base_tensors(base):
        if is_quantized(name, tensor):
            weight = nf4_round_trip(tensor)
            delta = deltas.pop(name, None)
            tensor = weight if delta is None else weight + delta()
        elif name in deltas:
            raise QloranerError(f"{adapter}: LoRA on {name}, which the NF4 base does not quantize; cannot merge it")
        yield name, tensor.to(dtype).contiguous()
    if deltas:
        raise QloranerError(
            f"{adapter}: LoRA weights for {len(deltas)} tensors the base lacks, e.g. {next(iter(deltas))}"
        )


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_bytes: int) -> int:
    """Safetensors shards of at most `max_bytes` (a bigger tensor gets its own), named and indexed as
    save_pretrained names them; only the shard being filled is held. Returns the bytes written."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    names: list[list[str]] = []
    size = total = 0

    def flush() -> None:
        save_file(shard, str(out / f"part-{len(names):05d}.safetensors"), metadata={"format": "pt"})
        names.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            flush()
            size = 0
        shard[name], size, total = tensor, size + nbytes, total + nbytes
    if shard:
        flush()
    _name_shards(out, names, total)
    return total


def _name_shards(out: Path, names: list[list[str]], total: int) -> None:
    """model.safetensors for one shard; else model-0000i-of-0000n.safetensors and model.safetensors.index.json."""
    if len(names) == 1:
        os.replace(out / "part-00000.safetensors", out / "model.safetensors")
        return
    weight_map = {}
    for i, shard_names in enumerate(names):
        final = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        os.replace(out / f"part-{i:05d}.safetensors", out / final)
        weight_map.update(dict.fromkeys(shard_names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_base_files(base: Path, out: Path, dtype: str) -> None:
    """The base's config (in the export's dtype, without a quantization entry), tokenizer and generation config."""
    for path in base.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_FILES) and not path.name.endswith(".index.json"):
            shutil.copy2(path, out / path.name)
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2))


def task_settings(trained: dict, config: ExportConfig) -> dict:
    """qloraner.json: what a user needs to prompt the model and read its answers without qloraner."""
    from qloraner.decode import STOP_TEXT
    from qloraner.labels import LabelSet
    from qloraner.prompts import build_prompt

    prompt, fmt = trained.get("prompt") or "simple", trained.get("response_format") or "lines"
    labels = LabelSet.from_saved(trained.get("labels"))
    return {
        "export_version": EXPORT_VERSION,
        "format": config.format,
        **FORMAT_FILES[config.format],
        "prompt": prompt,
        "response_format": fmt,
        # the template filled in but for the sentence (its tokens joined by spaces) and, in `context`, its neighbours
        "prompt_text": build_prompt(["{sentence}"], prompt, fmt, "{context}", labels),
        "labels": list(labels.types),
        "label_descriptions": labels.to_saved(),  # per type, what the prompt says it is ("" where nothing)
        "tag_scheme": "IOB2",
        "stop": {"eos": True, "text": STOP_TEXT, "rule": "stop at EOS, or at a blank line written after an answer"},
        "base_model": trained.get("model"),
        "dtype": config.dtype,
        "merge": "LoRA merged in f32 into the NF4 (double-quantized, blocks of 64) base weights, dequantized",
        "adapter": str(config.adapter),
    }


FORMAT_FILES = {"hf": {}, "gguf": {"gguf_file": "model.gguf", "ollama": "Modelfile"}}  # the format's own files


def _yaml(value) -> str:
    """A YAML scalar: JSON's quoted strings and numbers are valid YAML, so no YAML writer is needed."""
    return json.dumps(value)


def card_metadata(trained: dict, metrics: dict | None, license_name: str | None, fmt: str = "hf") -> str:
    """The Hub's metadata block (YAML front matter): base model, licence, data set, metrics, tags, results."""
    hub_id, known_license = KNOWN_BASES.get(trained.get("model") or "", (None, None))
    lines = ["---"]
    if hub_id:
        lines.append(f"base_model: {_yaml(hub_id)}")
    lines += [f"license: {_yaml(license_name or known_license or 'other')}", "datasets:", "- conll2003"]
    lines += ["language:", "- en", "library_name: transformers", "pipeline_tag: text-generation"]
    lines += ["metrics:", "- f1", "- precision", "- recall", "tags:"]
    lines += [f"- {t}" for t in ("token-classification", "ner", "qlora", "lora", "qloraner", "conll2003")]
    lines += ["- gguf"] if fmt == "gguf" else []
    if metrics:
        lines += ["model-index:", "- name: qloraner-conll2003", "  results:", "  - task:"]
        lines += ["      type: token-classification", "      name: Named-entity recognition", "    dataset:"]
        lines += [
            "      type: conll2003",
            "      name: CoNLL-2003",
            f"      split: {_yaml(metrics.get('split', 'test'))}",
        ]
        lines += ["    metrics:"]
        for key in ("f1", "precision", "recall"):
            lines += [f"    - type: {key}", f"      value: {_yaml(round(100 * metrics[key], 2))}"]
    return "\n".join([*lines, "---", ""])


def eval_metrics(adapter: Path) -> dict | None:
    """The adapter's evaluation (../eval/metrics.json beside a final/ adapter), when it ran and reads."""
    path = adapter.parent / ("eval" if adapter.name == "final" else f"eval-{adapter.name}") / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        return metrics if all(isinstance(metrics.get(k), (int, float)) for k in ("f1", "precision", "recall")) else None
    except (OSError, ValueError):
        return None


def _results_section(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["No evaluation was found beside the adapter (run ./run_eval.sh --adapter ADAPTER first).", ""]
    rows = ["| type | F1 |", "|---|---|"]
    rows += [f"| {t} | {100 * metrics['per_type'][t]['f1-score']:.2f} |" for t in metrics.get("per_type", {})]
    return [
        f"On {metrics.get('sentences', '?')} CoNLL-2003 {metrics.get('split', 'test')} sentences, scored with "
        f"seqeval (entity level): F1 {100 * metrics['f1']:.2f}, precision {100 * metrics['precision']:.2f}, "
        f"recall {100 * metrics['recall']:.2f}; {metrics.get('parse_failures', 0)} unreadable answers.",
        "",
        *(rows if len(rows) > 2 else []),
        "",
    ]


RECIPE_KEYS = ("model", "recipe", "prompt", "response_format", "target_modules", "lora_r", "lora_alpha")
RECIPE_KEYS += ("lora_dropout", "lr", "batch_size", "epochs", "max_steps", "train_split", "seed")


def _usage(fmt: str) -> list[str]:
    """The model card's how-to: qloraner's Tagger, then the format's own tools."""
    return [*_TAGGER_USAGE, *USAGE[fmt]]


_TAGGER_USAGE = [
    "```python",
    "from qloraner import Tagger",
    "",
    'tagger = Tagger.load("THIS_FOLDER")  # reads qloraner.json: prompt, answer format, stop rule',
    'tagger.tag(["Peter Blackburn flew to Bonn."])  # per text: [Entity(start, end, label, text), ...]',
    "```",
    "",
]
_HF_USAGE = [
    "Plain transformers (greedy; stop at EOS or at the first blank line after the answer):",
    "",
    "```python",
    "import json",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "",
    'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
    'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
    'prompt = json.load(open("THIS_FOLDER/qloraner.json"))["prompt_text"]',
    'prompt = prompt.replace("{sentence}", "Peter Blackburn flew to Bonn .").replace("{context}", "(none)")',
    'ids = tokenizer(prompt, return_tensors="pt").input_ids',
    "out = model.generate(ids, max_new_tokens=64, do_sample=False)",
    "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
    "```",
]
_GGUF_USAGE = [
    "Ollama (the Modelfile holds the prompt template, greedy decoding and the stop rule; type one sentence):",
    "",
    "```bash",
    "ollama create qloraner-ner -f THIS_FOLDER/Modelfile",
    'ollama run qloraner-ner "Peter Blackburn flew to Bonn ."',
    "```",
    "",
    "llama.cpp (the prompt from qloraner.json's prompt_text, its {sentence} filled in, {context} as (none);",
    "greedy; stop at EOS or at the first blank line after the answer):",
    "",
    "```bash",
    "python -c \"import json; print(json.load(open('THIS_FOLDER/qloraner.json'))['prompt_text']"
    ".replace('{sentence}', 'Peter Blackburn flew to Bonn .').replace('{context}', '(none)'), end='')\" > prompt.txt",
    "llama-completion -m THIS_FOLDER/model.gguf -f prompt.txt --temp 0 -n 64  # llama-cli -no-cnv in older builds",
    "```",
    "",
    "transformers reads the GGUF too (dequantized):",
    "",
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "",
    'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", gguf_file="model.gguf")',
    'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")  # the tokenizer files qloraner trained with',
    "```",
]
USAGE = {"hf": _HF_USAGE, "gguf": _GGUF_USAGE}


def model_card(trained: dict, settings: dict, metrics: dict | None, license_name: str | None) -> str:
    """README.md: the Hub's metadata block, then results, recipe, training data and how to use the model."""
    recipe = [f"| {k} | {trained[k]} |" for k in RECIPE_KEYS if trained.get(k) not in (None, "")]
    return "\n".join(
        [
            card_metadata(trained, metrics, license_name, settings["format"]),
            "# qloraner CoNLL-2003 NER model",
            "",
            f"{trained.get('model')} fine-tuned with QLoRA by qloraner to tag named entities "
            f"({', '.join(settings['labels'])}); answers in the `{settings['response_format']}` format "
            f"to the `{settings['prompt']}` prompt. "
            f"{settings['merge']}, saved in {settings['dtype']}: the weights the adapter was trained on.",
            "",
            "## Results",
            "",
            *_results_section(metrics),
            "## Recipe",
            "",
            "| setting | value |",
            "|---|---|",
            *recipe,
            "",
            "Training data: CoNLL-2003 (English Reuters news), split(s) named in the recipe.",
            "",
            "## Use",
            "",
            *_usage(settings["format"]),
            "",
        ]
    )


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that is a file, or a folder that is not empty (unless --overwrite)."""
    if out.exists() and not out.is_dir():
        raise QloranerError(f"--output {out}: a file is in the way; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QloranerError(f"--output {out}: folder exists and is not empty (give --overwrite to replace it)")


def base_folder(trained: dict) -> Path:
    """The adapter's base as a local checkpoint folder (a Hub id comes from the local Hub cache)."""
    from qloraner.sources import resolve_model

    name = trained.get("model")
    try:
        base = resolve_model(name)
        if isinstance(base, str):
            from huggingface_hub import snapshot_download

            base = Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except QloranerError as err:
        raise QloranerError(f"the adapter's base is missing: {err}") from None
    except Exception as err:  # the Hub client's errors: offline, gated, not found
        raise QloranerError(f"the adapter's base {name} is missing: {str(err).splitlines()[0][:160]}") from None
    return base


def write_hf(config: ExportConfig, trained: dict, base: Path, out: Path) -> int:
    """The Hugging Face checkpoint: config, tokenizer and generation config, then the merged shards."""
    copy_base_files(base, out, config.dtype)
    merged = merged_tensors(base, Path(config.adapter), DTYPES[config.dtype])
    return write_shards(merged, out, config.max_shard_mb * 2**20)


def write_gguf(config: ExportConfig, trained: dict, base: Path, out: Path) -> int:
    """model.gguf (the merge in f32, encoded per tensor in --dtype), the tokenizer files and the Ollama Modelfile."""
    from qloraner import export_gguf

    merged = merged_tensors(base, Path(config.adapter), torch.float32)
    name = f"qloraner CoNLL-2003 NER ({trained.get('model')})"
    total = export_gguf.write_gguf(out / export_gguf.GGUF_FILE, base, trained, merged, config.dtype, name)
    export_gguf.copy_tokenizer_files(base, out)
    context = json.loads((base / "config.json").read_text())["max_position_embeddings"]
    (out / export_gguf.MODELFILE).write_text(export_gguf.modelfile(task_settings(trained, config), context))
    return total


WRITERS = {"hf": write_hf, "gguf": write_gguf}


def write_export(config: ExportConfig, out: Path) -> int:
    """Every file of the export into `out` (a fresh folder); the weights' bytes."""
    from qloraner.evaluate import _adapter_settings

    trained = _adapter_settings(Path(config.adapter))
    base = base_folder(trained)
    total = WRITERS[config.format](config, trained, base, out)
    settings = task_settings(trained, config)
    metrics = eval_metrics(Path(config.adapter))
    (out / "README.md").write_text(model_card(trained, settings, metrics, config.license), encoding="utf-8")
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))  # last of the files, though the rename decides
    return total


def export(config: ExportConfig) -> Path:
    """The merged model in --output, complete or not at all: written to a hidden folder beside it and renamed
    into place at the end, so a kill, an error or a full disk never leaves a half-written export under its name."""
    out = Path(config.output).absolute()
    check_output(out, config.overwrite)
    from qloraner.evaluate import _adapter_settings

    _adapter_settings(Path(config.adapter))  # a missing adapter fails before anything is written
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write_export(config, tmp)
        _replace(tmp, out)
    except OSError as err:
        why = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
        raise QloranerError(f"--output {out}: export failed, nothing written ({why})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (--overwrite) is moved aside first and removed after."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def is_export(path: str | Path | None) -> bool:
    """Whether `path` is a folder that ./run_export.sh wrote."""
    return bool(path) and (Path(path) / SETTINGS_FILE).is_file()


def load_export(path: Path, device: torch.device, config):
    """An export as evaluate.load_for_eval loads an adapter (an evaluate.Loaded). Plain weights in
    the device's compute dtype (f32 on CPU), prompt settings from qloraner.json unless the flags give them."""
    from transformers import AutoModelForCausalLM

    from qloraner.model import attention_without_cudnn, compute_dtype, load_tokenizer

    try:
        settings = json.loads((path / SETTINGS_FILE).read_text())
    except ValueError as err:
        raise QloranerError(f"{path / SETTINGS_FILE}: damaged settings file ({err})") from None
    attention_without_cudnn(device)
    weights = {"gguf_file": settings["gguf_file"]} if "gguf_file" in settings else {}  # a GGUF is dequantized
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=compute_dtype(device), device_map={"": device}, attn_implementation="sdpa", **weights
    )
    model.eval()
    from qloraner.evaluate import Loaded
    from qloraner.labels import LabelSet
    from qloraner.prompts import Prompting

    prompting = Prompting(
        config.prompt or settings["prompt"],
        config.response_format or settings["response_format"],
        LabelSet.from_saved(settings.get("label_descriptions")),  # none in an export before label sets
    )
    return Loaded(model, load_tokenizer(path, padding_side="left"), prompting, str(path))


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        parser = parser_for(ExportConfig, "Merge a trained adapter into its base and export it (./run_export.sh)")
        config = ExportConfig(**vars(parser.parse_args(argv)))
        out = export(config)
        print(f"qloraner: exported {config.adapter} ({config.format}, {config.dtype}) to {out}", flush=True)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
