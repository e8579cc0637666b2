"""torch.compile for training: where it can run, where its kernels are kept, and the compiled decoder layers.
Its settings are process-wide (Inductor's and functorch's configuration)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from qloraner import ROOT
from qloraner.nf4 import four_bit_layers

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
