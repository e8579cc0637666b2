"""The micro-batch bound chosen from memory: a pure rule, an estimate that follows the model, and its precedence."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qloraner import memory
from qloraner.memory import GIB, available, micro_tokens, plan, token_bytes
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
    per_token = token_bytes(model, torch.float32, config.gradient_checkpointing)
    given_tokens = dataclasses.replace(config, micro_batch_tokens=300, micro_batch_size=2, memory_gib=1.0)
    assert plan(given_tokens, model, cpu, torch.float32, 40, 0).tokens == 300
    assert plan(dataclasses.replace(config, micro_batch_size=2), model, cpu, torch.float32, 40, 0).tokens == 0
    budgeted = plan(dataclasses.replace(config, memory_gib=1.0), model, cpu, torch.float32, 40, 0)
    assert budgeted.tokens == (GIB - memory.RESERVE) // per_token and "--memory-gib 1" in budgeted.describe()
    starved = plan(dataclasses.replace(config, memory_gib=0.5), model, cpu, torch.float32, 40, 0)
    assert starved.tokens == 40 and not starved.fits_one_row and "--memory-gib" in starved.warning(40)
