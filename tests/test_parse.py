import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraner import ENTITY_TYPES
from qloraner.bio import Entities
from qloraner.parse import (
    RENDERERS,
    is_explicit_empty,
    parse_response,
    render_json,
    render_response,
    tag_response,
)
from tests.strategies import bracket_word, json_like, mention, tagged_sentence, type_name

text_with_structure = st.lists(
    st.sampled_from(["[PER] ", "LOC: ", "{", "}", "'", '"', "\n", "\n\n", ",", " - ", "(ORG)", "[", "]", "\\", "None"])
    | st.text(max_size=8),
    max_size=20,
).map("".join)


def _shape_ok(result):
    return set(result) <= set(ENTITY_TYPES) and all(
        isinstance(v, list) and all(isinstance(m, str) and m for m in v) for v in result.values()
    )


@given(st.text())
def test_never_raises_on_arbitrary_text(text):
    """Any text parses without raising, to non-empty string mentions under the four keys only."""
    assert _shape_ok(parse_response(text))


@given(text_with_structure)
def test_never_raises_on_format_fragments(text):
    """Fragments of every accepted format, shuffled and broken, never make it raise."""
    assert _shape_ok(parse_response(text))


@given(json_like)
def test_never_raises_on_json_and_reprs(obj):
    """Arbitrary JSON and Python reprs (nested, wrong types) parse to the four keys only."""
    assert _shape_ok(parse_response(json.dumps(obj)))
    assert _shape_ok(parse_response(repr(obj)))


@given(st.dictionaries(st.sampled_from(ENTITY_TYPES), st.lists(mention, min_size=1, max_size=3), min_size=1))
def test_json_objects_parse_to_themselves(entities):
    """A JSON object of types to mention lists (no null words) parses back to the same mentions."""
    assert dict(parse_response(json.dumps(entities))) == entities
    assert dict(parse_response(repr(entities))) == entities


@given(st.lists(st.tuples(st.sampled_from(ENTITY_TYPES), mention), max_size=8))
def test_json_format_round_trip(pairs):
    """Our JSON response format parses back to the same mentions per type, each type's in listed order."""
    entities = Entities(pairs)
    assert dict(parse_response(render_json(entities))) == dict(entities)


typed_groups = st.dictionaries(st.sampled_from(ENTITY_TYPES), st.lists(mention, min_size=1, max_size=3), min_size=1)


@given(typed_groups, st.sampled_from(["; ", " | ", ";", "|"]), st.data())
def test_groups_on_one_line_parse_like_one_group_a_line(entities, separator, data):
    """`TYPE: a, b; TYPE: c | …` on one line, with full-word type names in any case, gives what one `TYPE: a, b`
    line per type gives: every mention under its type, in order."""
    groups = [f"{data.draw(type_name(t))}: {', '.join(ms)}" for t, ms in entities.items()]
    assert dict(parse_response(separator.join(groups))) == entities
    assert dict(parse_response("\n".join(groups))) == entities


@given(typed_groups)
def test_dict_values_may_be_one_comma_joined_string(entities):
    """{"PER": "a, b"} reads as {"PER": ["a", "b"]}, in JSON and in a Python repr."""
    joined = {t: ", ".join(ms) for t, ms in entities.items()}
    assert dict(parse_response(json.dumps(joined))) == entities
    assert dict(parse_response(repr(joined))) == entities


@pytest.mark.parametrize("response_format", RENDERERS)
def test_empty_answer_is_explicit_in_every_format(response_format):
    """No entities renders, in each format, as an answer the parser counts as an explicit empty (no parse failure)."""
    text = render_response(["EU", "rejects", "it"], ["O", "O", "O"], response_format)
    assert is_explicit_empty(text) and parse_response(text) == {}


def test_non_string_input_gives_nothing():
    """None or bytes give an empty result instead of an exception."""
    assert parse_response(None) == {} and parse_response(b"[PER] x") == {}


# (response, expected entities, provenance). Provenance "SmolLM2 ..." marks responses recorded from runs.
RESPONSES = [
    ("[ORG] EU\n[MISC] German\n[MISC] British", {"ORG": ["EU"], "MISC": ["German", "British"]}, "canonical"),
    (
        "[PER] Peter Blackburn\n\n### Sentence:\nBRUSSELS 1996-08-22\n\n### Response:\n[LOC] BRUSSELS",
        {"PER": ["Peter Blackburn"]},
        "rambles past its answer into a new example",
    ),
    ('{"LOC": ["Japan"], "PER": [], "ORG": null}', {"LOC": ["Japan"]}, "JSON with empty values"),
    (
        "{'LOC': ['Japan'], 'MISC': ['Asian Cup']}",
        {"LOC": ["Japan"], "MISC": ["Asian Cup"]},
        "python dict repr (original few-shot format)",
    ),
    (
        'Sure! Here are the entities:\n{"entities": [{"type": "PERSON", "text": "Nadim Ladki"}]}\nHope this helps.',
        {"PER": ["Nadim Ladki"]},
        "JSON record list inside chatter",
    ),
    (
        "PERSON: Nadim Ladki, Al-Ain\nLocation: United Arab Emirates\nOrganization: None",
        {"PER": ["Nadim Ladki", "Al-Ain"], "LOC": ["United Arab Emirates"]},
        "TYPE: a, b lines with synonyms",
    ),
    ("- **ORG** - Reuters\n- **LOC** - Syria", {"ORG": ["Reuters"], "LOC": ["Syria"]}, "markdown TYPE - a bullets"),
    ("1. Japan (LOC)\n2. Syria (location)", {"LOC": ["Japan", "Syria"]}, "mention (TYPE) list"),
    (
        "The sentence identifies four named entities:\nLOC: Japan\n\nTHE SENTENCE IDENTIFIES FOUR NAMED ENTITIES: x",
        {"LOC": ["Japan"]},
        "junk label line from the original project's report",
    ),
    ("DATE: Friday\nPER: []\nMISC: N/A", {}, "unknown types and empty values"),
    # Real answers of the SmolLM2-135M-Instruct base to the simple prompt ...
    (
        "\nThe answer is:\n\nSoccer, China, Victory, China, Soccer, China, China,",
        {},
        "SmolLM2 base: list without types",
    ),
    (
        "\nThe sentence is a list of named entities, with the type of LOC, MISC, or ORG, "
        "and the order of the entity's type."
        "\n\n### Answer:\nThe answer is 1.\n\nThe answer is 1.",
        {},
        "SmolLM2 base: talks about the types",
    ),
    # ... and after one epoch of QLoRA (q_proj/v_proj) on the train split
    (
        "[LOC] China\n[PER] Igor Shkvyrin\n[MISC] Uzbek\n[PER] Igor Shkvyrin",
        {"LOC": ["China"], "PER": ["Igor Shkvyrin", "Igor Shkvyrin"], "MISC": ["Uzbek"]},
        "SmolLM2 fine-tuned: out of order, repeated",
    ),
    ("[ORLANDO] ORLANDO", {}, "SmolLM2 fine-tuned: mention written as the type"),
    # Base-model answer shapes that used to escape the parser (issue 19)
    (
        "PER: Nadim Ladki; LOC: Al-Ain, United Arab Emirates | ORG: None",
        {"PER": ["Nadim Ladki"], "LOC": ["Al-Ain", "United Arab Emirates"]},
        "several TYPE: a, b groups on one line",
    ),
    (
        "Person names: Nadim Ladki\nORGANISATIONS: Reuters\nmiscellaneous entities: Asian Cup",
        {"PER": ["Nadim Ladki"], "ORG": ["Reuters"], "MISC": ["Asian Cup"]},
        "full-word type names of several words, any case",
    ),
    (
        '{"PERSON": "Nadim Ladki, Igor Shkvyrin", "location": "Japan"}',
        {"PER": ["Nadim Ladki", "Igor Shkvyrin"], "LOC": ["Japan"]},
        "dict value one comma-joined string",
    ),
]


@pytest.mark.parametrize("response,expected,provenance", RESPONSES, ids=[r[2] for r in RESPONSES])
def test_real_responses(response, expected, provenance):
    """Each real messy response parses to the entities listed beside it."""
    assert dict(parse_response(response)) == expected


@pytest.mark.parametrize(
    "text,empty",
    [
        ("[NONE]", True),
        ("None.", True),
        ("{}", True),
        ("[NONE]\n\nchatter", True),
        ("Entities:\n\n[NONE]", True),
        ("Named entities:\n[NONE]\n\nchatter", True),
        ("Entities:", False),
        ("Entities:\n\nThere are some.", False),
        ("I cannot find any", False),
        ("[PER] x", False),
    ],
)
def test_explicit_empty(text, empty):
    """Explicit 'no entities' answers are told apart from unparseable text."""
    assert is_explicit_empty(text) is empty


@pytest.mark.parametrize("response_format", ["lines", "inline"])
@given(sentence=tagged_sentence(bracket_word))
def test_a_perfect_answer_tags_back_to_its_gold_tags_whatever_brackets_the_tokens_hold(response_format, sentence):
    """The perfect answer (RENDERERS) of any tagged sentence, its tokens holding the answer format's own brackets
    (`[PER`, `Mary]`, `[`, `]`) or not, tags back to exactly its gold tags."""
    tokens, tags = sentence
    assert tag_response(tokens, render_response(tokens, tags, response_format)) == tags


# Sentences whose tokens hold brackets: (tokens, gold tags); each format's perfect answer must tag back to the gold.
BRACKETED = [
    pytest.param("[PER Mary] said".split(), "B-PER I-PER O".split(), id="a-token-looks-like-an-opener-in-a-mention"),
    pytest.param("[PER Mary] said".split(), "O B-PER O".split(), id="an-opener-look-alike-before-a-mention"),
    pytest.param("[PER Mary] said".split(), "O O B-PER".split(), id="an-opener-look-alike-outside"),
    pytest.param("the [ Paris ] hotel".split(), "O O B-LOC O O".split(), id="lone-brackets-around-a-mention"),
    pytest.param("the [ Paris ] hotel".split(), "O B-LOC I-LOC I-LOC O".split(), id="lone-brackets-in-a-mention"),
    pytest.param("Mary] met John".split(), "B-PER O B-PER".split(), id="a-mention-ending-in-a-bracket"),
    pytest.param("[NONE] Bonn".split(), "O B-LOC".split(), id="the-empty-answer-as-a-token"),
    pytest.param("[PER] Bonn".split(), "O B-LOC".split(), id="a-canonical-line-head-as-a-token"),
    pytest.param("[[PER x".split(), "B-ORG I-ORG".split(), id="an-escaped-look-alike-as-a-token"),
]


@pytest.mark.parametrize("response_format", ["lines", "inline"])
@pytest.mark.parametrize("tokens,tags", BRACKETED)
def test_bracketed_tokens_real_cases(tokens, tags, response_format):
    """Each nasty bracketed sentence's perfect answer tags back to its gold tags."""
    assert tag_response(tokens, render_response(tokens, tags, response_format)) == tags
