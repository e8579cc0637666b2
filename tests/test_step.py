import torch
from hypothesis import given
from hypothesis import strategies as st

from qloraner.data import IGNORE_INDEX, Encoded
from qloraner.step import SupervisedLoss, collate
from tests.conftest import lora_model


@st.composite
def examples_with_prompts(draw) -> list[Encoded]:
    """1-6 examples of 1-40 tokens, each with an unlabelled prompt of at least one token before its labels."""
    rows = []
    for n in draw(st.lists(st.integers(1, 40), min_size=1, max_size=6)):
        prompt = draw(st.integers(1, n))
        ids = list(range(10, 10 + n))
        rows.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


@given(examples_with_prompts(), st.sampled_from([0, 8, 32]), st.sampled_from([1, 7, 256]))
def test_collate_pads_and_finds_the_supervised_positions(examples, multiple, rows_multiple):
    """Rows keep their ids; pads are EOS and masked. The width is the longest row's (multiple 0), else a multiple
    with at least one pad column. The positions are exactly the (row, t) whose next label is supervised, in order,
    as row * width + t with that label as target, then padding (position 0, an ignored target) to a multiple of
    rows_multiple."""
    batch = collate(examples, 2, torch.device("cpu"), multiple, rows_multiple)
    width, lengths = batch["input_ids"].shape[1], [len(e.input_ids) for e in examples]
    if multiple:
        assert width % multiple == 0 and width > max(lengths)
    else:
        assert width == max(lengths)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert set(batch["input_ids"][row, n:].tolist()) <= {2}
    want = [(r * width + t, e.labels[t + 1]) for r, e in enumerate(examples) for t in range(len(e.labels) - 1)]
    want = [(p, y) for p, y in want if y != IGNORE_INDEX]
    got = list(zip(batch["positions"].tolist(), batch["targets"].tolist()))
    assert got[: len(want)] == want
    assert set(got[len(want) :]) <= {(0, IGNORE_INDEX)}
    assert len(got) % rows_multiple == 0 and len(got) - len(want) < rows_multiple


def test_the_supervised_loss_is_transformers_loss_summed(tiny_model):
    """SupervisedLoss (the LM head at collate's positions only, our own 4-D mask, padded positions) gives
    transformers' own causal-LM loss over the labels, summed instead of averaged, and the same gradients."""
    model = lora_model(tiny_model, 0)
    gen = torch.Generator().manual_seed(3)
    examples = []
    for n, prompt in ((9, 4), (14, 2), (5, 5), (12, 1)):
        ids = torch.randint(3, 100, (n,), generator=gen).tolist()
        examples.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    ours = SupervisedLoss(model)(**collate(examples, 2, torch.device("cpu"), 8, 256))
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.tensor([e.input_ids + [2] * (width - len(e.input_ids)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples])
    mask = (torch.arange(width)[None] < torch.tensor([len(e.input_ids) for e in examples])[:, None]).long()
    theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss * sum(e.n_supervised for e in examples)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, (p.grad for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
