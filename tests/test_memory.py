"""The micro-batch bound chosen from memory: a pure rule, an estimate that follows the model, and its precedence."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qloraner import memory
from qloraner.config import TrainConfig
from qloraner.memory import (
    GIB,
    available,
    checkpointing_needed,
    choose_checkpointing,
    lora_features,
    micro_tokens,
    plan,
    token_bytes,
    wanted_tokens,
)
from tests.conftest import lora_model, tiny_config

budgets = st.integers(0, 2**40)
costs = st.integers(1, 2**24)
lengths = st.integers(1, 4096)


@given(budgets, budgets, costs, lengths)
def test_the_bound_fits_the_budget_and_never_drops_below_one_row(budget, reserve, per_token, longest):
    """The bound holds at least one row of the longest sequence; where that row fits, the bound's tokens fit the
    budget left after the reserve, and one token more would not."""
    tokens, fits = micro_tokens(budget, reserve, per_token, longest)
    assert tokens >= longest
    room = budget - reserve
    assert fits == (longest * per_token <= room)
    if fits:
        assert tokens * per_token <= room < (tokens + 1) * per_token


@given(budgets, budgets, budgets, costs, lengths)
def test_more_memory_never_gives_a_smaller_bound(a, b, reserve, per_token, longest):
    """The bound grows with the budget: a machine with more memory never splits a step into more micro-batches."""
    small, large = sorted((a, b))
    assert micro_tokens(small, reserve, per_token, longest)[0] <= micro_tokens(large, reserve, per_token, longest)[0]


def test_a_token_costs_more_with_more_lora_targets_and_less_with_checkpointing(tiny_model):
    """The estimate follows the model: LoRA on more layers costs more per token, checkpointing less, bf16 half of
    fp32."""
    from qloraner.model import add_lora, load_base

    qv = lora_model(tiny_model, 0)
    every = add_lora(
        load_base(tiny_model, torch.device("cpu")), r=8, alpha=16, dropout=0.0, target_modules="all-linear"
    )
    fp32 = token_bytes(qv, torch.float32, checkpointing=False)
    assert token_bytes(every, torch.float32, checkpointing=False) > fp32
    assert token_bytes(qv, torch.float32, checkpointing=True) < fp32
    assert token_bytes(qv, torch.bfloat16, checkpointing=False) == pytest.approx(fp32 / 2, abs=1)


def test_the_cpu_budget_is_a_share_of_what_the_machine_has():
    """On a CPU the budget is a quarter of MemAvailable (or less under a cgroup limit), and says where it came from."""
    with open("/proc/meminfo") as f:
        have = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    budget, source = available(torch.device("cpu"))
    assert 0 < budget <= have * memory.CPU_SHARE * 1.1  # the machine's memory moves between the two reads
    assert "GiB" in source and ("available" in source or "cgroup" in source)


def test_a_set_bound_wins_then_a_set_micro_batch_size_then_the_budget(tmp_path, tiny_model, conll_dir):
    """--micro-batch-tokens (or the recipe's) is used as set; --micro-batch-size alone means no token bound; else
    --memory-gib sizes the bound."""
    model, cpu = lora_model(tiny_model, 0), torch.device("cpu")
    config = tiny_config(tmp_path, tiny_model, conll_dir, "plan")
    per_token = token_bytes(model, torch.float32, checkpointing=True)
    given_tokens = dataclasses.replace(config, micro_batch_tokens=300, micro_batch_size=2, memory_gib=1.0)
    assert plan(given_tokens, model, cpu, torch.float32, 40, 0, True).tokens == 300
    assert plan(dataclasses.replace(config, micro_batch_size=2), model, cpu, torch.float32, 40, 0, True).tokens == 0
    budgeted = plan(dataclasses.replace(config, memory_gib=1.0), model, cpu, torch.float32, 40, 0, True)
    assert budgeted.tokens == (GIB - memory.RESERVE) // per_token and "--memory-gib 1" in budgeted.describe()
    starved = plan(dataclasses.replace(config, memory_gib=0.5), model, cpu, torch.float32, 40, 0, True)
    assert starved.tokens == 40 and not starved.fits_one_row and "--memory-gib" in starved.warning(40)


@given(budgets, budgets, budgets, costs, st.integers(1, 2**20))
def test_more_memory_never_turns_checkpointing_on(a, b, reserve, per_token, tokens):
    """Checkpointing follows the room: where a budget runs without it, every larger budget does too."""
    small, large = sorted((a, b))
    assert checkpointing_needed(large, reserve, per_token, tokens) <= checkpointing_needed(
        small, reserve, per_token, tokens
    )


@given(
    st.sampled_from([None, 0]) | st.integers(1, 2**16),
    st.integers(0, 64),
    st.integers(1, 64),
    lengths,
    st.sampled_from(["cpu", "cuda"]),
)
def test_a_full_micro_batch_holds_at_least_one_row(tokens, micro_batch_size, micro_rows, longest, device):
    """The micro-batch checkpointing is sized for: never below one row of the longest sequence; a set token bound
    wide enough is taken as set; with no token bound it is the micro-batch's rows of the longest sequence."""
    config = dataclasses.replace(TrainConfig(), micro_batch_tokens=tokens, micro_batch_size=micro_batch_size)
    wanted = wanted_tokens(config, micro_rows, longest, torch.device(device))
    assert wanted >= longest
    if tokens and tokens >= longest:
        assert wanted == tokens
    if tokens == 0:
        assert wanted == micro_rows * longest


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["o_proj", "down_proj"], "all-linear"])
def test_the_layers_lora_will_wrap_are_counted_before_it_wraps_them(tiny_model, targets):
    """Counted on the base before add_lora (as checkpointing is chosen), the wrapped layers' features equal those
    of the PEFT model add_lora then builds: the choice and the bound estimate the same adapter."""
    from qloraner.model import add_lora, load_base

    cpu = torch.device("cpu")
    base = load_base(tiny_model, cpu)
    before = lora_features(base, targets)
    wrapped = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=targets)
    assert before == lora_features(wrapped) > 0
    assert token_bytes(load_base(tiny_model, cpu), torch.float32, False, targets) == token_bytes(
        wrapped, torch.float32, False
    )


@pytest.mark.parametrize("micro_batch_tokens", [None, 0, 600])
def test_checkpointing_is_on_under_a_small_budget_off_under_a_large_one_and_a_set_value_wins(
    tmp_path, tiny_model, conll_dir, micro_batch_tokens
):
    """Unset, checkpointing is off where a full micro-batch fits the budget without it (--memory-gib 4: the plan
    says it fits) and on where it does not (--memory-gib 0.5: the reserve alone takes that); set, it is as set
    whatever the budget."""
    from qloraner.model import load_base

    base, cpu = load_base(tiny_model, torch.device("cpu")), torch.device("cpu")
    config = tiny_config(tmp_path, tiny_model, conll_dir, "auto", micro_batch_tokens=micro_batch_tokens)
    auto = dataclasses.replace(config, gradient_checkpointing=None)

    def choose(settings, gib):
        return choose_checkpointing(dataclasses.replace(settings, memory_gib=gib), base, cpu, torch.float32, 80, 4)

    large, small = choose(auto, 4.0), choose(auto, 0.5)
    assert not large.on and large.describe().startswith("checkpointing off (auto: fits ")
    assert small.on and "over the 0.5 GiB budget: --memory-gib 0.5" in small.describe()
    for setting in (True, False):
        for gib in (0.5, 4.0):
            chosen = choose(dataclasses.replace(config, gradient_checkpointing=setting), gib)
            assert chosen.on == setting and chosen.source == "set"
