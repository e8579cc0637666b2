import os
import re
import shutil
import socket
import subprocess
import sys
import time

import bitsandbytes as bnb
import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig

from qloraner import QloranerError
from qloraner.compiler import CUDA_HEADERS, RECOMPUTE_BUDGET, compile_layers, cuda_headers, start_compiler
from qloraner.model import M31, CounterDropout, add_lora, load_base, load_tokenizer, use_counter_dropout
from qloraner.nf4 import NF4Linear
from qloraner.sources import default_checkpoint, resolve_model


def test_tiny_model_loads_in_nf4_with_lora_only_trainable(tiny_model):
    """Every decoder linear is a bnb Linear4bit (NF4, double quant); only LoRA weights train."""
    base = load_base(tiny_model, torch.device("cpu"))
    linears = [
        m for name, m in base.named_modules() if name.startswith("model.layers") and isinstance(m, torch.nn.Linear)
    ]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    for m in linears:
        assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested
    model = add_lora(base, r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"q_proj", "v_proj"}


def test_tokenizer_pads_with_eos(tiny_model):
    """pad = eos, as the base chat models have no pad token."""
    tok = load_tokenizer(tiny_model)
    assert tok.pad_token_id == tok.eos_token_id is not None


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-dir", "not a hub id"])
def test_missing_model_is_a_clear_error(name):
    """A missing local model path is a one-line QloranerError naming it."""
    with pytest.raises(QloranerError, match="model not found"):
        resolve_model(name)


def test_folder_without_config_is_refused(tmp_path):
    """A folder that is no checkpoint is named in the error."""
    with pytest.raises(QloranerError, match="no config.json"):
        resolve_model(str(tmp_path))


def _convert_on_rank_1(rank: int, store: str, cache: str) -> None:
    os.environ["QLORANER_CACHE"] = cache
    td.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if rank == 1:  # under torchrun, ranks other than 0 convert the default on nodes of their own
            path = default_checkpoint()
            assert AutoConfig.from_pretrained(path).model_type == "llama"
            assert load_tokenizer(path).eos_token == "<|im_end|>"
        td.barrier()
    finally:
        td.destroy_process_group()


def test_default_conversion_on_a_nonzero_rank_is_complete(tmp_path):
    """Converting the embedded default on rank 1 of a live process group gives a loadable checkpoint
    (transformers alone writes config.json on global rank 0 only)."""
    mp.spawn(_convert_on_rank_1, args=(str(tmp_path / "store"), str(tmp_path / "cache")), nprocs=2)
    assert (tmp_path / "cache" / "smollm2-135m-instruct" / "config.json").is_file()


@pytest.mark.parametrize("damage", ["cut-weights", "empty-tokenizer"])
def test_a_damaged_converted_default_is_converted_again(damage, tmp_path, monkeypatch, smol_checkpoint):
    """A converted default whose weights file is cut or whose tokenizer file is emptied is found damaged before it
    loads and converted again: its tokenizer and weights then load. (A copy in a temporary QLORANER_CACHE: the
    shared cache is never damaged.)"""
    target = tmp_path / "cache" / smol_checkpoint.name
    shutil.copytree(smol_checkpoint, target)
    if damage == "cut-weights":
        os.truncate(target / "model.safetensors", 1_000_000)
    else:
        (target / "tokenizer.json").write_text("")
    monkeypatch.setenv("QLORANER_CACHE", str(tmp_path / "cache"))
    path = default_checkpoint()
    assert load_tokenizer(path).eos_token == "<|im_end|>"
    assert load_base(path, torch.device("cpu")).config.model_type == "llama"
    assert not [p.name for p in target.parent.iterdir() if p.name != target.name and not p.name.endswith(".lock")]


def _convert(cache, **kw) -> subprocess.Popen:
    code = "from qloraner.sources import default_checkpoint; default_checkpoint()"
    env = {**os.environ, "QLORANER_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, **kw)


def test_a_killed_conversion_leaves_nothing_behind_after_the_next(tmp_path):
    """A conversion killed while it writes leaves its temporary folder; the next conversion removes it. Two
    conversions started at once both end with the checkpoint, one converting while the other waits (neither
    removes the other's live folder), and only the checkpoint (and the conversion lock) stays."""
    cache = tmp_path / "cache"
    killed = _convert(cache)
    deadline = time.monotonic() + 300
    while not list(cache.glob(".smollm2-135m-instruct.tmp*/*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    assert list(cache.glob(".smollm2-135m-instruct.tmp*")), "the conversion ended before it could be killed"
    pair = [_convert(cache, stdout=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in pair]
    assert [p.returncode for p in pair] == [0, 0]
    assert sum(out.count("converting") for out in outputs) == 1, outputs
    left = sorted(p.name for p in cache.iterdir())
    assert left == [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"], left
    assert AutoConfig.from_pretrained(cache / "smollm2-135m-instruct").model_type == "llama"


def test_frozen_weights_keep_their_load_dtype(tiny_model):
    """After k-bit preparation every unquantized base weight is back in the load dtype (bf16 here), LoRA weights
    are fp32, and under autocast a decoder layer's output (the residual stream) is bf16, as at inference."""
    base = load_base(tiny_model, torch.device("cpu"), dtype=torch.bfloat16)
    loaded = {n: p.dtype for n, p in base.named_parameters()}
    model = add_lora(base, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]).get_base_model()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {n for n in dtypes if "lora_" not in n} and all(
        dtypes[n] == loaded[n.replace(".base_layer", "")] for n in dtypes if "lora_" not in n
    )
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    seen = []
    model.model.layers[0].register_forward_hook(
        lambda _m, _args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs on GPUs
        model.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen[0].dtype == torch.bfloat16


def _saved_bytes(tiny_model, *, checkpointing: bool, compiled: bool, in_graph: bool = False) -> int:
    """Bytes the autograd graph keeps for backward over one forward of 4 rows of 48 tokens (dropout off), not
    counting the model's own weights (a compiled graph saves references to them)."""
    model = add_lora(
        load_base(tiny_model, torch.device("cpu")),
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        checkpointing=checkpointing and not in_graph,
    )
    if compiled:
        torch._dynamo.reset()  # a graph compiled for an earlier model would be reused with its partitioning
        compile_layers(model, recompute_in_graph=in_graph)
    model.train()
    weights = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append(0 if t.data_ptr() in weights else t.numel() * t.element_size())
        return t

    ids = torch.randint(0, 100, (4, 48))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layers = model.get_base_model().model  # without the LM head, whose logits would dominate
        layers(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state.sum().backward()
    return sum(saved)


def test_compiled_layers_keep_activation_checkpointing(tiny_model):
    """Compiled layers under checkpointing keep for backward under half of what they keep without it, and at most
    10 % more than eager layers under checkpointing; recomputing inside the compiled graphs keeps at most 10 % more
    than that plus what RECOMPUTE_BUDGET allows."""
    import torch._functorch.config

    eager = _saved_bytes(tiny_model, checkpointing=True, compiled=False)
    compiled = _saved_bytes(tiny_model, checkpointing=True, compiled=True)
    unchecked = _saved_bytes(tiny_model, checkpointing=False, compiled=True)
    with torch._functorch.config.patch(activation_memory_budget=1.0, functionalize_rng_ops=False):  # undone after
        in_graph = _saved_bytes(tiny_model, checkpointing=True, compiled=True, in_graph=True)
    assert compiled <= 1.1 * eager and compiled < 0.5 * unchecked, (eager, compiled, unchecked)
    allowed = eager + RECOMPUTE_BUDGET * (unchecked - eager)  # the budget lets it keep a little more
    assert in_graph <= 1.1 * allowed and in_graph < 0.5 * unchecked, (eager, in_graph, unchecked)


def test_compiled_kernels_go_to_the_project_folder_unless_the_user_chose_one(monkeypatch, tmp_path):
    """Inductor's cache is the project's .cache/inductor when the variable is unset or holds the default torch wrote
    into it at import; a folder the user set stays."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from qloraner import ROOT

    for before, expected in [
        (os.path.abspath(default_cache_dir()), ROOT / ".cache" / "inductor"),
        (None, ROOT / ".cache" / "inductor"),
        (str(tmp_path), tmp_path),
    ]:
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        start_compiler()
        assert cache_dir() == str(expected), (before, cache_dir())


def test_cuda_headers_are_found_only_where_all_of_them_are(monkeypatch, tmp_path):
    """cuda_headers() names CUDA_HOME's include folder once it holds every header of CUDA_HEADERS, and None while
    one is missing or without a CUDA_HOME (then compiled layers keep Inductor's Python launch code)."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert cuda_headers() is None
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    (tmp_path / "include").mkdir()
    for header in CUDA_HEADERS:
        assert cuda_headers() is None, header
        (tmp_path / "include" / header).write_text("/* an API */\n")
    assert cuda_headers() == tmp_path / "include"


@given(
    rows=st.integers(1, 96),
    # rows of whole blocks of 64 weights, as dequantize_in_graph takes them (bitsandbytes' CPU kernel scales a block
    # that spans two rows otherwise than its reference implementation in PyTorch)
    cols=st.integers(1, 6).map(lambda c: 64 * c),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nf4_linear_equals_bitsandbytes(rows, cols, dtype, bias, seed):
    """NF4Linear's weight (plain tensor operations) is bitsandbytes' dequantized NF4 weight bit for bit, and its
    outputs are the 4-bit layer's, for any number of rows (blocks of 256 scales cut anywhere) in the dtypes we train
    in (the layer quantized from that dtype, as load_base does)."""
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(cols, rows, bias=bias, compute_dtype=dtype, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(rows, cols, dtype=dtype), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(rows, dtype=dtype), requires_grad=False)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False  # as load_base keeps it
    assert layer.weight.quant_state.nested
    mine = NF4Linear(layer)
    assert torch.equal(mine.weight(), bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    x = torch.randn(5, cols, dtype=dtype)
    assert torch.equal(mine(x), layer(x))


keys = st.integers(0, M31)


@given(p=st.floats(0.01, 0.9), key=keys, salt=keys, rows=st.integers(1, 6), cols=st.integers(1, 70))
def test_counter_dropout_keeps_or_scales_each_element_the_same_way_for_a_key(p, key, salt, rows, cols):
    """Each output element is 0 or the input over 1 - p; the same key and salt give the same mask (a recompute's
    mask is the forward's); evaluation passes the input through."""
    drop = CounterDropout(p, torch.tensor(key), salt)
    x = torch.rand(rows, cols) + 0.5
    out, again = drop(x), drop(x)
    assert torch.equal(out, again)
    assert torch.all((out == 0) | torch.isclose(out, x / (1 - p)))
    assert torch.equal(drop.eval()(x), x)


@given(p=st.sampled_from([0.05, 0.1, 0.5]), key=keys, salt=keys, other=keys)
def test_counter_dropout_masks_look_independent(p, key, salt, other):
    """Over 2**16 elements the kept share is 1 - p within 5 standard deviations, and the masks of another key, of
    another salt and of the neighbouring element agree as often as independent draws would (p**2 + (1 - p)**2)."""
    n, x = 2**16, torch.ones(2**16)
    mask = CounterDropout(p, torch.tensor(key), salt)(x) > 0
    others = [
        CounterDropout(p, torch.tensor(other if other != key else key ^ 1), salt)(x) > 0,
        CounterDropout(p, torch.tensor(key), other if other != salt else salt ^ 1)(x) > 0,
        mask.roll(1),
    ]
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * sd
    same = p**2 + (1 - p) ** 2
    for m in others:
        assert abs((mask == m).float().mean().item() - same) < 5 * (same * (1 - same) / n) ** 0.5


def test_counter_dropout_replaces_every_lora_dropout_and_saves_nothing(tiny_model):
    """use_counter_dropout turns every LoRA dropout into a CounterDropout sharing one key, each with its own salt;
    the adapter's saved tensors are the same as before; a LoRA without dropout keeps its layers (no key)."""
    from peft import get_peft_model_state_dict

    model = add_lora(
        load_base(tiny_model, torch.device("cpu")), r=8, alpha=16, dropout=0.1, target_modules="all-linear"
    )
    saved = set(get_peft_model_state_dict(model))
    key = use_counter_dropout(model)
    drops = [m for m in model.modules() if isinstance(m, CounterDropout)]
    assert drops and not [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(d.key is key for d in drops) and len({d.salt.item() for d in drops}) == len(drops)
    assert set(get_peft_model_state_dict(model)) == saved
    plain = add_lora(
        load_base(tiny_model, torch.device("cpu")), r=8, alpha=16, dropout=0.0, target_modules="all-linear"
    )
    assert use_counter_dropout(plain) is None


def _lora_grads(tiny_model, *, key: int, compiled: bool) -> list[torch.Tensor]:
    """LoRA gradients of one forward and backward of the tiny model's layers (LoRA on q_proj/v_proj as in the 7B
    recipe, dropout 0.1 as CounterDropout), compiled with checkpointing inside the graphs (nothing kept but each
    layer's input) or eager."""
    import torch._functorch.config

    torch.manual_seed(0)
    model = add_lora(
        load_base(tiny_model, torch.device("cpu")), r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"]
    )
    for name, p in model.named_parameters():  # B starts at zero: A's gradients would not see the masks
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    use_counter_dropout(model).fill_(key)
    with torch._functorch.config.patch(activation_memory_budget=0.0, functionalize_rng_ops=False):  # undone after
        if compiled:
            torch._dynamo.reset()
            compile_layers(model, recompute_in_graph=True)
        model.train()
        ids = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
        layers = model.get_base_model().model
        layers(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state.sum().backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


def test_recomputed_counter_dropout_gives_the_eager_gradients(tiny_model):
    """Compiled layers that recompute everything but their input in the backward (the dropout masks included)
    give the LoRA gradients of eager layers with the same key, to 1e-4 of each tensor's norm; another key moves them
    by over 1 %."""
    eager = _lora_grads(tiny_model, key=7, compiled=False)
    compiled = _lora_grads(tiny_model, key=7, compiled=True)
    other = _lora_grads(tiny_model, key=8, compiled=False)

    def gap(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
        return max(((a - b).norm() / a.norm()).item() for a, b in zip(x, y))

    assert gap(eager, compiled) < 1e-4 < 1e-2 < gap(eager, other), (gap(eager, compiled), gap(eager, other))


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_a_hub_model_neither_cached_nor_reachable_is_one_line_at_once(hub, tmp_path, conll_dir):
    """The 7B recipe's hub id, with an empty Hugging Face cache and the hub offline (HF_HUB_OFFLINE=1) or not
    answering, ends within seconds (no retries) in one line saying what to pass instead, exit code 2."""
    from tests.conftest import last_line, run_entry

    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    if hub == "unreachable":
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            env = {"HF_HOME": env["HF_HOME"], "HF_ENDPOINT": f"http://127.0.0.1:{s.getsockname()[1]}"}
    start = time.monotonic()
    args = ["--recipe", "llama2-7b-chat", "--data-dir", str(conll_dir), "--output-dir", str(tmp_path / "run")]
    proc = run_entry("train", *args, env=env)
    assert proc.returncode == 2 and time.monotonic() - start < 30, proc.stderr[-2000:]
    assert re.match(
        r"error: meta-llama/Llama-2-7b-chat-hf: not in the local Hugging Face cache, and the hub .*; pass --model "
        r"/path/to/Llama-2-7b-chat-hf \(a local copy\), or set HF_TOKEN where the hub answers$",
        last_line(proc.stderr),
    ), proc.stderr[-2000:]
