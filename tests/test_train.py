import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from qloraner import QloranerError, checkpoint, memory
from qloraner.checkpoint import latest as latest_checkpoint
from qloraner.config import DEFAULT_RECIPE, TrainConfig
from qloraner.prepare import prepare
from qloraner.train import get_lr, train_adapter
from tests.conftest import (
    FIRST_STEP,
    ROOT,
    last_line,
    lora_model,
    run_entry,
    sigterm_at,
    start_entry,
    tiny_args,
    tiny_config,
    wait_for,
)

schedule = st.fixed_dictionaries(
    {
        "max_lr": st.floats(1e-6, 1.0),
        "warmup": st.integers(0, 50),
        "total": st.integers(1, 500),
        "min_ratio": st.floats(0, 1),
    }
)


@given(schedule, st.integers(-5, 600))
def test_lr_bounded(s, step):
    """The learning rate never leaves (0, max_lr]."""
    lr = get_lr(step if step >= 0 else 0, **s)
    assert 0 <= lr <= s["max_lr"] * (1 + 1e-12)


@given(schedule)
def test_lr_warms_up_then_decays_to_the_floor(s):
    """Rising during warm-up, never rising after it, min_ratio * max_lr at and past the end."""
    lrs = [get_lr(i, **s) for i in range(s["total"] + 3)]
    w = min(s["warmup"], s["total"])
    assert all(a < b for a, b in zip(lrs[:w], lrs[1:w]))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(lrs[w:], lrs[w + 1 :]))
    assert lrs[-1] == pytest.approx(s["max_lr"] * s["min_ratio"])


_config = tiny_config


@contextlib.contextmanager
def _prepared(config: TrainConfig):
    """A prepared run (model, optimizer, MLflow run, the folder's lock), its MLflow run ended and lock released
    after."""
    import mlflow

    run = prepare(config)
    try:
        yield run
    finally:
        mlflow.end_run()
        run.lock.close()


def test_overfits_eight_examples(tmp_path, tiny_model, conll_dir):
    """60 steps on 8 examples cut the loss by at least 80 % (the loop really learns)."""
    losses = []
    train_adapter(
        _config(
            tmp_path,
            tiny_model,
            conll_dir,
            "overfit",
            limit=8,
            batch_size=8,
            max_steps=60,
            lr=2e-2,
            lora_r=16,
            lora_alpha=32,
            max_grad_norm=1.0,
        ),
        on_step=lambda step, m: losses.append(m["loss"]),
    )
    assert len(losses) == 60 and losses[-1] <= 0.2 * losses[0]


def _norms_and_adapter(config: TrainConfig) -> tuple[list[float], dict[str, torch.Tensor], list[int]]:
    """Train; every step's grad norm, the final adapter's tensors and every step's number of micro-batches."""
    norms, micro = [], []
    out = train_adapter(
        config, on_step=lambda step, m: (norms.append(m["grad_norm"]), micro.append(m["micro_batches"]))
    )
    return norms, load_file(out.final / "adapter_model.safetensors"), micro


def _assert_same_training(a, b, rel: float) -> None:
    """Grad norms and every adapter tensor of two runs agree to `rel` (lora_B starts at zero: it is the update)."""
    assert a[0] == pytest.approx(b[0], rel=rel)
    for key, value in a[1].items():
        assert torch.linalg.norm(b[1][key] - value) <= rel * torch.linalg.norm(value), key


def test_the_flat_optimizer_updates_like_one_tensor_at_a_time(tiny_model):
    """The loop's update (paged AdamW's own steps without its waits for the device) over the flat parameters moves
    every LoRA matrix as bitsandbytes' PagedAdamW.step over the matrices one by one (weight decay on, three steps,
    backward adding into the gradient views); the model's tensors stay views of the flat parameters, aligned for the
    kernels."""
    import bitsandbytes as bnb

    from qloraner.optim import FLAT_ALIGN, flatten_trainable, update

    flat_model, plain_model = lora_model(tiny_model, 0), lora_model(tiny_model, 0)
    flats = flatten_trainable(flat_model)
    trainable = [p for p in flat_model.parameters() if p.requires_grad]
    assert sum(f.numel() for f in flats) >= sum(p.numel() for p in trainable)
    flat_opt = bnb.optim.PagedAdamW(flats, lr=1e-2, weight_decay=0.1)
    plain_opt = bnb.optim.PagedAdamW(
        [p for p in plain_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, opt, to_none in ((flat_model, flat_opt, False), (plain_model, plain_opt, True)):
            for half in ids.chunk(2):  # two backward passes a step: the second adds into the views
                model(input_ids=half, labels=half).loss.backward()
            update(opt) if opt is flat_opt else opt.step()
            opt.zero_grad(set_to_none=to_none)
    for (name, a), b in zip(flat_model.named_parameters(), plain_model.parameters()):
        if a.requires_grad:
            assert a.untyped_storage().data_ptr() == flats[0].untyped_storage().data_ptr(), name
            assert a.storage_offset() % FLAT_ALIGN == 0 and a.grad.storage_offset() % FLAT_ALIGN == 0, name
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(trainable, (p for p in lora_model(tiny_model, 0).parameters() if p.requires_grad))
    )


def test_accumulation_matches_one_big_batch(tmp_path, tiny_model, conll_dir, capsys):
    """Micro-batches of 3 (accumulation 6, uneven sizes), micro-batches of at most 300 padded tokens (as many as
    each step's lengths need) and a memory budget that holds about 300 tokens give the gradient and update of one
    batch of 16 (fp32); the plan line names the budget's bound and where it came from, and a CPU run says after its
    first step how long the run will take."""
    model = lora_model(tiny_model, 0)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    per_token = memory.token_bytes(model, torch.float32, checkpointing=True)
    gib = (memory.RESERVE + 2 * trainable + 300.5 * per_token) / memory.GIB  # a half token: no rounding down
    big, accum, bounded, budgeted = (
        _norms_and_adapter(
            _config(tmp_path, tiny_model, conll_dir, name, batch_size=16, max_steps=3, max_grad_norm=0.0, **settings)
        )
        for name, settings in [
            ("big", {"micro_batch_tokens": 0}),
            ("accum", {"micro_batch_size": 3}),
            ("tokens", {"micro_batch_tokens": 300}),
            ("budget", {"memory_gib": gib}),
        ]
    )
    assert big[2] == [1, 1, 1] and accum[2] == [6, 6, 6] and min(bounded[2]) > 1  # each split as asked
    assert budgeted[2] == bounded[2]  # the budget holds 300 tokens: the same split
    _assert_same_training(big, accum, rel=1e-5)
    _assert_same_training(big, bounded, rel=1e-5)
    _assert_same_training(big, budgeted, rel=1e-5)
    out = capsys.readouterr().out
    assert f"micro-batches of at most 300 padded tokens (--memory-gib {gib:g}" in out
    assert re.search(r"the first step took \d+ s: 3 steps would take about 0:\d\d \(h:mm\)", out)  # on a CPU


def test_compiled_layers_train_like_eager(tmp_path, tiny_model, conll_dir):
    """--compile (torch.compile per decoder layer, checkpointing on, lengths varying per step) gives eager's grad
    norms and adapter to 1e-4, with the NF4 weights dequantized in the compiled graphs (the default) and through
    bitsandbytes (--no-dequantize-in-graph); each run records which it was."""
    from torch._dynamo.utils import counters

    runs = []
    for name, compiled, in_graph in [("eager", False, None), ("compiled", True, None), ("bnb", True, False)]:
        counters.clear()
        config = _config(
            tmp_path, tiny_model, conll_dir, name, max_steps=3, compile=compiled, dequantize_in_graph=in_graph
        )
        runs.append(_norms_and_adapter(config))
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # it really ran compiled (or not)
        saved = json.loads((Path(config.output_dir) / "final" / "train_config.json").read_text())
        assert saved["dequantize_in_graph"] is (name == "compiled")
    _assert_same_training(runs[0], runs[1], rel=1e-4)
    _assert_same_training(runs[0], runs[2], rel=1e-4)


def test_compiled_layers_dequantize_nf4_themselves(tmp_path, tiny_model, conll_dir):
    """With --compile every 4-bit layer becomes an NF4Linear over the same quantized tensors (none is left to
    bitsandbytes' operations); with --no-dequantize-in-graph none does; asking for it without compile (given, or
    resolved so on a CPU) or with the frozen copies is refused."""
    import bitsandbytes as bnb

    from qloraner.nf4 import NF4Linear

    for name, in_graph in [("graph", None), ("bnb", False)]:
        config = _config(tmp_path, tiny_model, conll_dir, name, compile=True, dequantize_in_graph=in_graph)
        with _prepared(config) as run:
            kinds = {type(m) for m in run.model.modules()}
            assert (NF4Linear in kinds, bnb.nn.Linear4bit in kinds) == (in_graph is None, in_graph is False)
    for settings in [dict(compile=False), dict(compile=True, frozen_copies=True)]:
        with pytest.raises(QloranerError, match="--dequantize-in-graph: needs --compile and 4-bit weights"):
            _config(tmp_path, tiny_model, conll_dir, "refused", dequantize_in_graph=True, **settings)
    # compile left to its default resolves to off on a CPU: refused once resolved
    with pytest.raises(QloranerError, match="--dequantize-in-graph: needs --compile and 4-bit weights"):
        prepare(_config(tmp_path, tiny_model, conll_dir, "resolved-off", dequantize_in_graph=True))


def test_an_over_long_context_example_keeps_its_answer(tmp_path, tiny_model, conll_dir):
    """With the context template, an example over --max-length loses its document context, not its answer: every
    example keeps all its response labels and its final EOS, and only over-long ones lose their context."""
    from qloraner.model import load_tokenizer
    from qloraner.prepare import _examples

    tokenizer = load_tokenizer(tiny_model)
    settings = dict(prompt="context", response_format="inline", limit=200)
    roomy, _ = _examples(_config(tmp_path, tiny_model, conll_dir, "roomy", max_length=4096, **settings), tokenizer)
    plain, _ = _examples(_config(tmp_path, tiny_model, conll_dir, "plain", prompt="simple", limit=200), tokenizer)
    cap = max(len(e.input_ids) for e in plain) + 40  # room for every answer with a short context line
    tight, _ = _examples(_config(tmp_path, tiny_model, conll_dir, "tight", max_length=cap, **settings), tokenizer)
    assert all(len(t.input_ids) <= cap and t.n_supervised == r.n_supervised for t, r in zip(tight, roomy))
    assert all(t.labels[-1] == tokenizer.eos_token_id for t in tight)
    cut = [t.input_ids != r.input_ids for t, r in zip(tight, roomy)]
    assert cut == [len(r.input_ids) > cap for r in roomy] and any(cut)


@pytest.mark.parametrize("compiled", [False, True])
def test_frozen_copies_train_like_nf4(tmp_path, tiny_model, conll_dir, compiled):
    """--frozen-copies (the NF4 weights dequantized once into plain frozen layers) gives the 4-bit layers' grad
    norms and adapter to 1e-5, eager and compiled; the run really had no 4-bit layer left, and says so."""
    import bitsandbytes as bnb

    runs = []
    for name, copies in [("nf4", False), ("copies", True)]:
        config = _config(
            tmp_path, tiny_model, conll_dir, f"{name}-{compiled}", max_steps=3, frozen_copies=copies, compile=compiled
        )
        runs.append(_norms_and_adapter(config))
        saved = json.loads((Path(config.output_dir) / "final" / "train_config.json").read_text())
        assert saved["frozen_copies"] is copies
    _assert_same_training(*runs, rel=1e-5)
    with _prepared(_config(tmp_path, tiny_model, conll_dir, "count", max_steps=1, frozen_copies=True)) as run:
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in run.model.modules())
        assert any(isinstance(m, torch.nn.Linear) and not m.weight.requires_grad for m in run.model.modules())


@pytest.mark.parametrize("checkpointing", [True, False])
def test_compiled_layers_compile_once(tmp_path, tiny_model, conll_dir, checkpointing):
    """With --compile, the graphs compiled in the first step serve every later step, whatever each step's lengths
    (the count is logged as compiled_graphs); checkpointing on and off."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []
    config = _config(
        tmp_path, tiny_model, conll_dir, "once", max_steps=8, compile=True, gradient_checkpointing=checkpointing
    )
    train_adapter(config, on_step=lambda step, m: graphs.append(m["compiled_graphs"]))
    assert graphs[0] > 0 and graphs == [graphs[0]] * 8


def test_resume_after_sigterm_matches_an_uninterrupted_run(tmp_path, tiny_model, conll_dir):
    """Train 20 steps, or train 11, SIGTERM, resume 9: same adapter to 1e-6 (dropout on, epochs crossed). The signal
    comes from step 10's callback, which runs once step 11 is queued: the run checkpoints after step 11."""
    kw = dict(max_steps=20, lora_dropout=0.1, lr=5e-3)
    straight = train_adapter(_config(tmp_path, tiny_model, conll_dir, "straight", **kw))

    cfg = _config(tmp_path, tiny_model, conll_dir, "resumed", **kw)
    first = train_adapter(cfg, on_step=sigterm_at(10))
    assert first.preempted and first.step == 11
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000011"
    half = tmp_path / "resumed" / "step-000015"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")  # a save killed half way
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000011"
    steps = []
    second = train_adapter(cfg, on_step=lambda step, m: steps.append(step))
    assert steps == list(range(12, 21)) and second.step == 20
    a = load_file(straight.final / "adapter_model.safetensors")
    b = load_file(second.final / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-8)


def test_extending_a_finished_run_continues_from_final(tmp_path, tiny_model, conll_dir, capsys):
    """A finished 2-step run, run again with --max-steps 3, resumes from final/ (step 2) and trains only step 3: the
    same adapter to 1e-6 as 3 steps from scratch (warm-up covers steps 1-2, so their learning rates agree)."""
    kw = dict(lora_dropout=0.1, lr=5e-3, warmup_steps=2)
    straight = train_adapter(_config(tmp_path, tiny_model, conll_dir, "straight", max_steps=3, **kw))
    assert train_adapter(_config(tmp_path, tiny_model, conll_dir, "extended", max_steps=2, **kw)).step == 2
    steps = []
    longer = train_adapter(
        _config(tmp_path, tiny_model, conll_dir, "extended", max_steps=3, **kw),
        on_step=lambda step, m: steps.append(step),
    )
    assert steps == [3] and longer.step == 3
    assert f"resuming from {tmp_path / 'extended' / 'final'} at step 2" in capsys.readouterr().out
    a = load_file(straight.final / "adapter_model.safetensors")
    b = load_file(longer.final / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-8)


def test_a_shorter_run_than_the_finished_one_is_refused(tmp_path, tiny_model, conll_dir):
    """A finished 3-step run, run again with --max-steps 2, is refused with one line naming final/ and its step,
    and final/ stays as it was (it is never relabelled as a 2-step run)."""
    train_adapter(_config(tmp_path, tiny_model, conll_dir, "run", max_steps=3))
    before = (tmp_path / "run" / "final" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(QloranerError, match=r"final: trained 3 steps, more than --max-steps 2; .*--no-resume"):
        train_adapter(_config(tmp_path, tiny_model, conll_dir, "run", max_steps=2))
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "run" / "final" / "train_config.json").read_text())["max_steps"] == 3


def test_incompatible_checkpoint_is_refused(tmp_path, tiny_model, conll_dir):
    """Resuming with another LoRA rank or response format names the checkpoint (the newest: final/) and the
    differing setting; a checkpoint saved before --response-format existed resumes as the line format it was trained
    on."""
    train_adapter(_config(tmp_path, tiny_model, conll_dir, "run", max_steps=2, save_every=1))
    with pytest.raises(QloranerError, match=r"final: incompatible checkpoint.*lora_r=8"):
        train_adapter(_config(tmp_path, tiny_model, conll_dir, "run", max_steps=4, lora_r=4))
    with pytest.raises(QloranerError, match=r"incompatible checkpoint.*response_format='lines' \(now 'json'\)"):
        train_adapter(_config(tmp_path, tiny_model, conll_dir, "run", max_steps=4, response_format="json"))
    for saved in (tmp_path / "run").glob("*/train_config.json"):  # step-000001/ and final/
        settings = json.loads(saved.read_text())
        del settings["response_format"]
        saved.write_text(json.dumps(settings))
    assert train_adapter(_config(tmp_path, tiny_model, conll_dir, "run", max_steps=3)).final.is_dir()


@pytest.mark.parametrize("save_every", [1, 0])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model, conll_dir, save_every):
    """A diverging run (lr 1e38) stops with a one-line error naming the step whose loss was not finite, though its
    numbers are read a step late (with no checkpoint due, after the next step was queued); the checkpoint before it
    stays complete and none holds its update."""
    cfg = _config(
        tmp_path,
        tiny_model,
        conll_dir,
        "nan",
        lr=1e38,
        warmup_steps=0,
        max_steps=10,
        save_every=save_every,
        max_grad_norm=0.0,
    )
    last_good = ".*step-000001" if save_every else "none"
    with pytest.raises(QloranerError, match=rf"non-finite loss at step 2; .*Last good checkpoint: {last_good}$"):
        train_adapter(cfg)
    assert [p.name for p in checkpoint.complete(tmp_path / "nan")] == (["step-000001"] if save_every else [])
    assert not (tmp_path / "nan" / "final").exists()


def test_a_non_finite_gradient_norm_stops_the_run(tmp_path, tiny_model, conll_dir):
    """A step whose loss is finite but whose gradient is not (one LoRA matrix's gradient made infinite) stops, when
    its numbers are read, with a one-line error naming the gradient norm and the step."""

    from qloraner.train import settle, train_step

    with _prepared(_config(tmp_path, tiny_model, conll_dir, "inf-grad", max_grad_norm=0.0)) as run:
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        trainable[0].register_hook(lambda grad: grad + float("inf"))
        queued = train_step(run, 0)
        with pytest.raises(QloranerError, match=r"^non-finite gradient norm at step 1; stopped before saving"):
            settle(run, queued, since=queued.t0)


def test_each_micro_step_draws_its_own_counter_dropout_masks(tmp_path, tiny_model, conll_dir):
    """With CounterDropout (what CUDA graphs over checkpointing use), train_step sets the shared key before every
    micro-step to dropout_key(seed, rank, step, micro-step): each forward reads its own key, a function of where the
    run is (so a resumed run draws the same masks), never the previous micro-step's."""

    from qloraner.model import CounterDropout, dropout_key, use_counter_dropout
    from qloraner.train import train_step

    config = _config(tmp_path, tiny_model, conll_dir, "keys", lora_dropout=0.1, micro_batch_size=2, seed=7)
    with _prepared(config) as run:
        run.dropout_key = use_counter_dropout(run.model)
        seen = []
        first = next(m for m in run.model.modules() if isinstance(m, CounterDropout))
        first.register_forward_pre_hook(lambda module, _args: seen.append(module.key.item()))
        for step in range(3):
            train_step(run, step)
        expected = [dropout_key(7, 0, step, micro) for step in range(3) for micro in range(run.accum)]
        assert run.accum == 2 and seen == expected and len(set(seen)) == len(seen)


def test_a_checkpoint_with_one_optimizer_tensor_per_matrix_is_refused(tmp_path, tiny_model, conll_dir):
    """A checkpoint whose optimizer state holds a tensor per LoRA matrix (written before the flat parameter) is
    refused with one line that names it and the way out, not skipped as damaged."""
    train_adapter(_config(tmp_path, tiny_model, conll_dir, "old", max_steps=2, save_every=1))
    for saved in (tmp_path / "old").glob("*/optimizer.pt"):  # step-000001/ and final/
        state = torch.load(saved, weights_only=False)
        state["param_groups"][0]["params"] = [0, 1, 2]  # the old layout's ids, one per tensor
        torch.save(state, saved)
    with pytest.raises(QloranerError, match=r"final: its optimizer state holds 3 tensors.*--no-resume"):
        train_adapter(_config(tmp_path, tiny_model, conll_dir, "old", max_steps=4))


def test_missing_model_exits_with_one_line(tmp_path, conll_dir):
    """The entry point turns a missing model into 'error: ...' and exit code 2, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qloraner.train",
            "--model",
            str(tmp_path / "nope"),
            "--data-dir",
            str(conll_dir),
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model not found: {tmp_path / 'nope'} "
        "(give a checkpoint folder or a hub id like meta-llama/Llama-2-7b-chat-hf)"
    ]


@pytest.mark.slow
def test_run_train_sh_end_to_end(trained_default):
    """./run_train.sh with the embedded default, 16 sentences, 4 steps: checkpoints and an MLflow run; its output,
    not a terminal, holds the plan (with the micro-batch bound chosen from the machine's memory) and a progress line
    per step (each a quarter of the work)."""
    from mlflow.tracking import MlflowClient

    out = trained_default
    log = (out.parent / "stdout.log").read_text().splitlines()
    plan = [line for line in log if line.startswith("qloraner: training 16 sequences, 4 steps of 4")]
    assert plan and re.search(
        r"on CPU, compile off, checkpointing off \(auto: fits [0-9.]+ of [0-9.]+ GiB: 25% of [0-9.]+ GiB [a-z' ]+\), "
        f"frozen weights NF4, recipe {DEFAULT_RECIPE}; micro-batches of at most [0-9,]+ padded "
        r"tokens \(25% of [0-9.]+ GiB (available|left under the cgroup's limit), about [0-9.]+ MiB a token\)$",
        plan[0],
    ), plan[0]
    steps = [re.match(r"train (\d)/4 \(\d+\.\d%\) loss=\S+ tokens_per_s=\S+ .* ETA \S+$", line) for line in log]
    assert [int(m.group(1)) for m in steps if m] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step-", "final"))) == ["final", "step-000002"]
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["step"] == 4
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["limit"] == "16" and run.data.params["lora_r"] == "64"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    assert "instruction_manifest.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_llama2_recipe_trains_a_local_llama_checkpoint(tmp_path, tiny_model, conll_dir):
    """./run_train.sh --recipe llama2-7b-chat --model PATH trains a local LLaMA checkpoint with the recipe's
    settings (q_proj/v_proj LoRA), flags winning over it; train_config.json and MLflow record the recipe."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    env = {**os.environ, "CONLL_DIR": str(conll_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["--recipe", "llama2-7b-chat", "--model", str(tiny_model), "--limit", "8", "--max-steps", "2"]
    proc = subprocess.run(
        [str(ROOT / "run_train.sh"), *args, "--batch-size", "4", "--output-dir", str(out), "--no-eval"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "final" / "train_config.json").read_text())
    assert saved["recipe"] == "llama2-7b-chat" and saved["model"] == str(tiny_model)
    assert (saved["target_modules"], saved["lr"], saved["batch_size"]) == ("q_proj,v_proj", 2e-4, 4)
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    run_id = json.loads((out / "final" / "trainer_state.json").read_text())["run_id"]
    params = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(run_id).data.params
    assert params["recipe"] == "llama2-7b-chat" and params["compile"] == "False"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-length", "10"], r"error: --max-length 10: 8 of 8 examples keep no response token \(prompts run to "),
        (
            ["--target-modules", "q_proj,query"],
            r"error: --target-modules: query names no linear module of this model; "
            r"its linear modules: down_proj, gate_proj, k_proj, lm_head, o_proj",
        ),
        (["--epochs", "inf"], r"error: invalid settings: --epochs: must be a finite number"),
        (["--output-dir", "/dev/null/run"], r"error: --output-dir /dev/null/run: a file is in the way; give a folder"),
        (["--cuda-graphs"], r"error: --cuda-graphs: needs a CUDA GPU, not cpu"),
        (["--cuda-graphs", "--no-compile"], r"error: invalid settings: --cuda-graphs: needs --compile"),
    ],
)
def test_settings_that_cannot_train_are_one_line(flags, message, tmp_path, tiny_model, conll_dir):
    """A --max-length that holds no response, --target-modules naming no module (the model's linear modules are
    listed), an infinite epoch count, an --output-dir under a file and CUDA graphs without a GPU or without
    --compile each end in one line and exit code 2."""
    proc = run_entry("train", *tiny_args(tiny_model, conll_dir, tmp_path / "run", "--no-eval"), *flags)
    assert proc.returncode == 2 and re.match(message, last_line(proc.stderr)), proc.stderr[-2000:]


def _tiny_run(module: str, model, conll_dir, out) -> list[str]:
    if module == "train":
        return tiny_args(model, conll_dir, out, "--no-eval", "--max-steps", "1")
    return ["--model", str(model), "--data-dir", str(conll_dir), "--output-dir", str(out), "--limit", "1"]


@pytest.fixture
def read_only_folder(tmp_path):
    """An existing folder nobody can write in, even root (whom chmod 555 does not stop): a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]).returncode
    ):
        folder.chmod(0o555)  # as a user, chmod does stop writes
    yield folder
    subprocess.run(["umount", str(folder)], check=False, capture_output=True)


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_a_read_only_output_folder_is_one_line_before_the_model_loads(module, read_only_folder, tiny_model, conll_dir):
    """An existing --output-dir that cannot be written in ends in one line naming it, exit code 2, before any model
    loads (no MLflow store, no plan line)."""
    proc = run_entry(module, *_tiny_run(module, tiny_model, conll_dir, read_only_folder))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = re.escape(f"error: --output-dir {read_only_folder}")
    assert re.match(rf"{line}(/eval-limit1)?: cannot (write in|create) it \(", last_line(proc.stderr)), proc.stderr
    assert not proc.stdout.strip(), proc.stdout[-2000:]


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_model) -> Path:
    """A random 2-layer GPT-2 (no LLaMA layout) with the tiny model's tokenizer, saved as a checkpoint."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_a_model_without_the_llama_layout_is_refused_alike(module, tmp_path, tiny_gpt2, conll_dir):
    """Training and evaluation both refuse a model without the LLaMA layout (GPT-2) in the same one line naming
    its class, exit code 2, before any step."""
    proc = run_entry(module, *_tiny_run(module, tiny_gpt2, conll_dir, tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr) == (
        f"error: {tiny_gpt2}: qloraner needs a LLaMA-architecture model; got GPT2LMHeadModel"
    )
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["Ctrl-C", "SIGHUP"])
def test_a_stop_signal_saves_a_checkpoint_and_ends_the_mlflow_run(signum, tmp_path, tiny_model, conll_dir):
    """Ctrl-C (SIGINT) or closing the terminal (SIGHUP) during training saves a checkpoint at the end of the step and
    exits 75 without a traceback, its MLflow run ended KILLED (not left RUNNING), as SIGTERM does."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    args = tiny_args(tiny_model, conll_dir, out, "--no-eval", "--max-steps", "100000", "--save-every", "0")
    proc = start_entry(sys.executable, "-m", "qloraner.train", *args)
    wait_for(proc, FIRST_STEP)
    proc.send_signal(signum)
    rest = proc.stdout.read()
    assert proc.wait() == 75 and "Traceback" not in rest, rest[-2000:]
    assert re.search(r"stopped at step (\d+): saved .*step-0*\1; run again to resume", last_line(rest))
    run_id = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_during_the_evaluation_then_a_rerun_only_evaluates(signum, tmp_path, tiny_model, conll_dir):
    """SIGTERM (or SIGHUP: the terminal closed) while ./run_train.sh evaluates its adapter exits 75; the same command
    again does not train again: it evaluates final/ and ends with the F1 line, which with --compare-base names the
    base model's F1 too."""
    out = tmp_path / "run"
    args = tiny_args(tiny_model, conll_dir, out, "--max-steps", "2", "--eval-limit", "400")
    proc = start_entry(str(ROOT / "run_train.sh"), *args)
    wait_for(proc, "qloraner: evaluating")
    proc.send_signal(signum)
    rest = proc.stdout.read()
    assert proc.wait() == 75 and "Traceback" not in rest, rest[-2000:]
    assert last_line(rest) == f"qloraner: stopped while evaluating {out / 'final'}; run again to evaluate it"
    rerun = start_entry(str(ROOT / "run_train.sh"), *args[:-2], "--eval-limit", "4", "--compare-base")
    log = rerun.communicate()[0]
    assert rerun.returncode == 0, log[-2000:]
    assert f"{out / 'final'} already holds this run's adapter (step 2); not training again" in log
    assert "train 1/" not in log and re.fullmatch(r"qloraner: done: F1 .*; base model F1 \d+\.\d\d", last_line(log))


def test_resume_refuses_other_data_and_a_changed_lr(tmp_path, tiny_model, conll_dir):
    """A checkpoint resumes only on the data and learning rate it was trained with; each refusal names the
    checkpoint and what differs."""
    config = _config(tmp_path, tiny_model, conll_dir, "run", max_steps=4, save_every=2)

    train_adapter(config, on_step=sigterm_at(2))  # a checkpoint at step 3
    other = tmp_path / "other-data"
    other.mkdir()
    lines = (conll_dir / "train.txt").read_text().splitlines(keepends=True)
    (other / "train.txt").write_text("".join(lines[:200]).replace("EU NNP", "UN NNP", 1) + "".join(lines[200:]))
    with pytest.raises(QloranerError, match=r"step-000003: trained on other data than .*other-data/train.txt"):
        train_adapter(_config(tmp_path, tiny_model, other, "run", max_steps=4, save_every=2))
    with pytest.raises(QloranerError, match=r"step-000003: incompatible checkpoint, trained with lr=0.01 \(now 0.02\)"):
        train_adapter(_config(tmp_path, tiny_model, conll_dir, "run", max_steps=4, save_every=2, lr=2e-2))
    with pytest.raises(
        QloranerError, match=r"incompatible checkpoint, trained with train_split='train' \(now 'train\+valid'\)"
    ):
        train_adapter(
            _config(tmp_path, tiny_model, conll_dir, "run", max_steps=4, save_every=2, train_split="train+valid")
        )


def test_a_final_run_learns_from_train_and_valid(tmp_path, tiny_model, conll_dir):
    """--train-split train+valid: every train sentence, then every valid one, become examples (in that order), and
    the run is tied to both files' checksums, not to train.txt's alone."""
    from qloraner.conll import read_split
    from qloraner.data import data_sha256
    from qloraner.model import load_tokenizer
    from qloraner.prepare import _examples
    from qloraner.prompts import build_prompt

    tok = load_tokenizer(tiny_model)
    both, manifest = _examples(_config(tmp_path, tiny_model, conll_dir, "run", limit=0, train_split="train+valid"), tok)
    train, valid = read_split(conll_dir, "train"), read_split(conll_dir, "valid")
    assert len(both) == len(train) + len(valid) and manifest["splits"] == ["train", "valid"]
    for example, sentence in ((both[len(train) - 1], train[-1]), (both[-1], valid[-1])):
        prompt = tok(build_prompt(sentence.tokens, "simple"))["input_ids"]
        assert example.input_ids[: len(prompt)] == prompt
    assert manifest["data_sha256"] == data_sha256(conll_dir, ("train", "valid")) != data_sha256(conll_dir, ("train",))
