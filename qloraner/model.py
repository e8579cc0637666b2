"""Tokenizer and model loading: NF4 double-quantized base, k-bit preparation, LoRA adapters and their dropout.
Where the base comes from: sources.py; its 4-bit weights: nf4.py; compiled layers: compiler.py."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from qloraner import QloranerError


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
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the per-weight load report is noise for our users
    if not sys.stderr.isatty():  # its bar redraws with carriage returns: one long line in a log or a SLURM file
        hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            model, quantization_config=quant, dtype=dtype, device_map={"": device}, attn_implementation="sdpa"
        )
    except OSError as err:
        raise QloranerError(f"cannot load model {model}: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
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


def _is_linear(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit))
