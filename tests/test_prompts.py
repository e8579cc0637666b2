"""The prompt templates and the one fit-to-length policy (qloraner/prompts.py) that training and evaluation share."""

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraner.labels import CONLL
from qloraner.model import load_tokenizer
from qloraner.prompts import TEMPLATES, Fitted, Prompting, fit
from tests.strategies import word


@dataclass(frozen=True)
class Lengths:
    """A sentence's token counts as a tokenizer would give them: the template's own, each word's, the context's."""

    frame: int
    words: tuple[int, ...]
    context: int  # 0: no document context

    def build(self, n: int, with_context: bool) -> list[int]:
        """A stand-in sequence of the first n words (their indices, one per token), the context's tokens marked -1."""
        ids = [-2] * self.frame + [i for i in range(n) for _ in range(self.words[i])]
        return ids + [-1] * self.context * with_context


@st.composite
def sentence_and_budget(draw, roomy: bool = False) -> tuple[Lengths, int]:
    """A sentence's lengths (with or without context) and a budget anywhere from nothing to past its whole length;
    `roomy`: at least its whole length."""
    frame, words = draw(st.integers(0, 60)), tuple(draw(st.lists(st.integers(1, 6), max_size=40)))
    lengths = Lengths(frame, words, draw(st.one_of(st.just(0), st.integers(1, 200))))
    whole = len(lengths.build(len(words), True))
    return lengths, draw(st.integers(whole if roomy else 0, whole + 5))


def _fit(lengths: Lengths, budget: int, fewest: int = 0) -> Fitted:
    return fit(lengths.build, len(lengths.words), lengths.context > 0, budget, fewest)


@given(sentence_and_budget(roomy=True))
def test_a_sequence_that_fits_is_kept_whole(case):
    """A sequence within its budget comes back as built, every word and its context kept."""
    lengths, budget = case
    whole = lengths.build(len(lengths.words), lengths.context > 0)
    assert _fit(lengths, budget) == (whole, len(lengths.words), lengths.context > 0)


@given(sentence_and_budget())
def test_the_fitted_sequence_is_within_budget_unless_nothing_more_can_go(case):
    """The fitted sequence is what `build` makes of the words and context it says it keeps, and holds at most
    `budget` tokens, unless every word went and the context too (the template alone is over)."""
    lengths, budget = case
    fitted = _fit(lengths, budget)
    assert fitted.built == lengths.build(fitted.words, fitted.context)
    assert len(fitted.built) <= budget or (fitted.words == 0 and not fitted.context)


@given(sentence_and_budget())
def test_the_context_goes_before_any_word(case):
    """A cut sentence has lost its context first; where dropping the context is enough, no word is cut."""
    lengths, budget = case
    fitted = _fit(lengths, budget)
    if fitted.words < len(lengths.words):
        assert not fitted.context
    if len(lengths.build(len(lengths.words), False)) <= budget:
        assert fitted.words == len(lengths.words)


@given(sentence_and_budget())
def test_training_never_cuts_its_sentence(case):
    """With fewest = every word (training: the answer names every word), no word is cut, whatever the budget; an
    over-long sequence only loses its context."""
    lengths, budget = case
    fitted = _fit(lengths, budget, fewest=len(lengths.words))
    assert fitted.words == len(lengths.words)
    assert fitted.context == (lengths.context > 0 and len(lengths.build(len(lengths.words), True)) <= budget)


@given(sentence_and_budget(), st.integers(0, 40))
def test_a_cut_stops_at_fewest(case, fewest):
    """No cut keeps fewer than `fewest` words, nor more words than the sentence has."""
    lengths, budget = case
    fewest = min(fewest, len(lengths.words))
    assert fewest <= _fit(lengths, budget, fewest).words <= len(lengths.words)


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir):
    return load_tokenizer(llama2_tokenizer_dir)


@given(
    tokens=st.lists(word, min_size=1, max_size=30),
    context=st.one_of(st.just(""), st.lists(word, min_size=1, max_size=40).map(" ".join)),
    template=st.sampled_from(list(TEMPLATES)),
    slack=st.integers(-200, 20),
)
def test_a_fitted_prompt_is_the_prompt_of_what_it_keeps(llama2, tokens, context, template, slack):
    """With the real LLaMA-2 tokenizer, a prompt fitted to a budget (the bare prompt's length moved by `slack`) is
    the prompt of its kept words and context, within the budget unless no word is left."""
    prompting = Prompting(template, "lines", CONLL)
    budget = max(0, len(prompting.ids(llama2, tokens)) + slack)
    fitted = prompting.fitted(llama2, tokens, context, budget)
    assert fitted.built == prompting.ids(llama2, tokens[: fitted.words], context if fitted.context else "")
    assert len(fitted.built) <= budget or fitted.words == 0


@pytest.mark.parametrize(
    "tokens, context, slack",
    [
        (["Schwarzenegger-Ökonomie", "’s", "“Bonn”"], "", -1),  # multi-token words, no context: cut at once
        (["EU", "rejects", "German", "call"], "Peter Blackburn BRUSSELS 1996-08-22", 0),  # fits once the context goes
        (["EU"], "Peter Blackburn", -1000),  # the template alone is over: every word goes
        (["x"] * 300, "", -1),  # a long sentence of one-token words
        (["EU", "rejects"], "", 10**6),  # room to spare
    ],
)
def test_nasty_prompts_fit_as_the_policy_says(llama2, tokens, context, slack):
    """Real cases: a word never half kept, the context dropped before any word, a template over its budget."""
    prompting = Prompting("context", "json", CONLL)
    budget = max(0, len(prompting.ids(llama2, tokens)) + slack)
    fitted = prompting.fitted(llama2, tokens, context, budget)
    assert fitted.built == prompting.ids(llama2, tokens[: fitted.words], context if fitted.context else "")
    assert len(fitted.built) <= budget or fitted.words == 0
    assert fitted.context == (bool(context) and len(prompting.ids(llama2, tokens, context)) <= budget)
    assert fitted.words == len(tokens) or not fitted.context
