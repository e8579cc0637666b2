"""The training engine's speed choices, resolved once from the settings, the device and the base model into one
frozen record: prepare() applies it, the plan line prints it, MLflow and train_config.json keep it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qloraner import QloranerError, dist, memory
from qloraner.compiler import compile_unavailable
from qloraner.config import TrainConfig
from qloraner.model import compute_dtype
from qloraner.nf4 import dequantized_bytes

FROZEN_COPIES_MAX_BYTES = 2**30  # --frozen-copies by default up to this size: a small model's launches and
# dequantizations dominate its steps; a large one's 4-bit weights are what makes it fit
RECOMPUTE_IN_GRAPH_ON = ("cuda",)  # with compile, checkpointing recomputes inside the compiled graphs (replayable RNG)


@dataclass(frozen=True)
class Speed:
    """How a training run computes: every engine switch resolved (the settings keep what was asked, None = auto)."""

    compile: bool
    """Each decoder layer compiled by torch.compile (--compile)."""
    checkpointing: memory.Checkpointing
    """Activations recomputed in backward, and why: set, or chosen from the memory budget."""
    cuda_graphs: bool = False
    """Each micro-batch shape's forward and backward replayed as one CUDA graph (--cuda-graphs)."""
    frozen_copies: bool = False
    """The frozen NF4 weights dequantized once, before training (--frozen-copies)."""
    nf4_in_graph: bool = False
    """The NF4 weights left 4-bit dequantized by the compiled layers' own kernels (--dequantize-in-graph)."""
    recompute_in_graph: bool = False
    """Checkpointing recomputes inside the compiled layers (PEFT's checkpointing wrapper otherwise)."""

    @property
    def counter_dropout(self) -> bool:
        """Dropout masks from a hash, not the RNG: a CUDA graph cannot hold the RNG state that recomputed dropout
        replays. Only there: without graphs the hashed masks raised the 7B recipe's peak (docs/ENGINE.md)."""
        return self.recompute_in_graph and self.cuda_graphs

    def record(self) -> dict:
        """The choices under the settings' names, as train_config.json and MLflow keep them (what ran)."""
        return {
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "frozen_copies": self.frozen_copies,
            "dequantize_in_graph": self.nf4_in_graph,
            "gradient_checkpointing_used": self.checkpointing.on,
            "gradient_checkpointing_source": self.checkpointing.source,
        }

    def describe(self) -> str:
        """The plan line's part: `compile on, checkpointing off (auto: ...), frozen weights NF4`."""
        frozen = "dequantized once" if self.frozen_copies else "NF4"
        if self.nf4_in_graph:
            frozen += " (dequantized in the compiled layers)"
        return f"compile {'on' if self.compile else 'off'}, {self.checkpointing.describe()}, frozen weights {frozen}"


def choose_compile(config: TrainConfig, device: torch.device) -> bool:
    """--compile / --no-compile as given; unset, on where it was measured to win (CUDA with Triton and a compiler).
    Resolved before the model loads: the compiler's workers start while it loads."""
    if config.cuda_graphs and device.type != "cuda":
        raise QloranerError(f"--cuda-graphs: needs a CUDA GPU, not {device.type}")
    if config.compile is not None:
        return config.compile
    reason = compile_unavailable(device)
    if reason and device.type == "cuda":
        print(f"qloraner: training runs eager: {reason}", flush=True)
    if reason:  # resolved off: the settings' own checks refuse what needs --compile (--dequantize-in-graph...)
        dataclasses.replace(config, compile=False)
    return reason is None


def resolve_speed(config: TrainConfig, device: torch.device, base, compiled: bool, longest: int, micro: int) -> Speed:
    """Every switch for `base` (the NF4 model before LoRA) on `device`, `compiled` from choose_compile:
    checkpointing from the memory budget (the same on every rank: on where any rank needs it); CUDA graphs with
    compiled layers on a GPU without checkpointing (with it only when asked: a higher peak); frozen copies on GPUs
    for models whose copies take at most FROZEN_COPIES_MAX_BYTES; NF4 in the graph with compile where the weights
    stay 4-bit. A setting given wins."""
    ckpt = memory.choose_checkpointing(config, base, device, compute_dtype(device), longest, micro)
    if not dist.smallest(int(not ckpt.on), device):  # a rank without the room decides for all
        ckpt = dataclasses.replace(ckpt, on=True)
    graphs = config.cuda_graphs
    if graphs is None:
        graphs = device.type == "cuda" and compiled and not ckpt.on
    copies = config.frozen_copies
    if copies is None:  # small models: their steps wait on kernel launches, dequantizations among them
        copies = device.type == "cuda" and dequantized_bytes(base, compute_dtype(device)) <= FROZEN_COPIES_MAX_BYTES
    if config.dequantize_in_graph and copies:  # compile off never gets here: the settings refuse it
        raise QloranerError(
            "--dequantize-in-graph: needs 4-bit weights, and the frozen copies (on by default for a model this "
            "small) leave none; add --no-frozen-copies"
        )
    return Speed(
        compile=compiled,
        checkpointing=ckpt,
        cuda_graphs=graphs,
        frozen_copies=copies,
        nf4_in_graph=compiled and not copies and config.dequantize_in_graph is not False,
        recompute_in_graph=compiled and ckpt.on and device.type in RECOMPUTE_IN_GRAPH_ON,
    )
