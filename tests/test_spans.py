import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings

from qloraner import QloranerError
from qloraner.bio import spans
from qloraner.conll import read_file
from qloraner.spans import tag_document
from tests.strategies import span_document


def _doccano(documents) -> str:
    return "".join(json.dumps({"text": t, "entities": [list(s) for s in found]}) + "\n" for t, found in documents)


def _label_studio(documents) -> str:
    tasks = [
        {
            "id": i,
            "data": {"text": text},
            "annotations": [
                {
                    "was_cancelled": False,
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "text",
                            "type": "labels",
                            "value": {"start": a, "end": b, "text": text[a:b], "labels": [type_]},
                        }
                        for a, b, type_ in found
                    ],
                }
            ],
        }
        for i, (text, found) in enumerate(documents, 1)
    ]
    return json.dumps(tasks)


@settings(deadline=None)
@given(span_document())
def test_spans_tokens_tags_spans_round_trip(document):
    """Spans that start and end on tokens -> tokens and IOB2 tags -> the same spans (a span across a sentence end
    joins the sentences, so none is cut), and no span counted as widened."""
    text, found = document
    doc = tag_document(text, found, "doc")
    back = []
    for tokens, tags in doc.sentences:
        back += [(tokens[c.start].start, tokens[c.end - 1].end, c.type) for c in spans(tags)]
    assert back == found and doc.widened == 0


@settings(deadline=None)
@given(span_document(), span_document())
def test_doccano_and_label_studio_files_read_to_the_same_sentences(one, two):
    """The same documents exported by doccano (.jsonl) and by Label Studio (.json) read to the same sentences, each
    record a document of its own (the context never crosses records), as the tokens and tags tag_document gives."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "d.jsonl").write_text(_doccano([one, two]))
        (Path(tmp) / "ls.json").write_text(_label_studio([one, two]))
        doccano, studio = read_file(Path(tmp) / "d.jsonl"), read_file(Path(tmp) / "ls.json")
    expected = [
        ([t.text for t in tokens], list(tags))
        for text, found in (one, two)
        for tokens, tags in tag_document(text, found, "doc").sentences
    ]
    assert doccano == studio
    assert [(list(s.tokens), list(s.tags)) for s in doccano] == expected


def test_a_span_that_cuts_a_token_is_widened_and_counted(tmp_path, capsys):
    """A span that starts or ends inside a token tags the whole token, and the file's count of such spans is printed
    with the first record; white space at a span's ends is left out, not counted."""
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"text": "Visit Paris-based firms.", "entities": [[6, 11, "LOC"]]})
        + "\n"
        + json.dumps({"text": "Mr Blackburn said so", "entities": [[3, 8, "PER"], [2, 13, "PER"]][1:]})
        + "\n"
        + json.dumps({"text": "the EUropean Union", "entities": [[4, 6, "ORG"]]})
        + "\n"
    )
    read = read_file(f)
    assert [(s.tokens, s.tags) for s in read] == [
        (("Visit", "Paris-based", "firms", "."), ("O", "B-LOC", "O", "O")),
        (("Mr", "Blackburn", "said", "so"), ("O", "B-PER", "O", "O")),
        (("the", "EUropean", "Union"), ("O", "B-ORG", "O")),
    ]
    assert capsys.readouterr().out.strip() == (
        f"qloraner: {f}: 2 spans cut a token and were widened to whole tokens (the first at {f}:1)"
    )


def test_a_span_across_a_sentence_end_joins_the_sentences(tmp_path):
    """A span over two of the tokenizer's sentences makes them one sentence; the other sentences of its record are
    its context."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "One went. Two came.", "entities": [[4, 13, "EVENT"]]}) + "\n")
    (read,) = read_file(f)
    assert read.tokens == ("One", "went", ".", "Two", "came", ".")
    assert read.tags == ("O", "B-EVENT", "I-EVENT", "I-EVENT", "O", "O")


@pytest.mark.parametrize(
    "name,body,where,what",
    [
        ("d.jsonl", '{"text": "Peter Blackburn", "entities": [[0, 15, "PER"], [6, 15, "PER"]]}\n', ":1", "overlap"),
        (  # two spans apart in characters that share a token once widened
            "d.jsonl",
            '\n{"text": "Paris-based firm", "entities": [[0, 5, "LOC"], [6, 11, "MISC"]]}\n',
            ":2",
            r'spans \[0, 5, "LOC"\] and \[6, 11, "MISC"\] overlap \(on whole tokens\)',
        ),
        (
            "ls.json",
            json.dumps(
                [
                    {"data": {"text": "a b"}, "annotations": []},
                    {
                        "data": {"text": "New York"},
                        "annotations": [
                            {
                                "result": [
                                    {"value": {"start": 0, "end": 8, "labels": ["LOC"]}},
                                    {"value": {"start": 4, "end": 8, "labels": ["LOC"]}},
                                ]
                            }
                        ],
                    },
                ]
            ),
            ": record 2",
            "overlap",
        ),
        ("d.jsonl", '{"text": "a  b", "entities": [[1, 3, "X"]]}\n', ":1", "holds only white space"),
        ("d.jsonl", '{"text": "ab", "entities": [[0, 3, "X"]]}\n', ":1", "offsets outside the text of 2 characters"),
        ("d.jsonl", '{"text": "ab", "entities": [[true, 2, "X"]]}\n', ":1", "start and end must be whole numbers"),
        ("d.jsonl", '{"text": "ab", "entities": [[0, 2, "Person name"]]}\n', ":1", "type must be a non-empty"),
        ("d.jsonl", '{"text": "ab", "label": ["positive"]}\n', ":1", "'\"positive\"' is not a span"),
        ("d.jsonl", '{"text": "ab"}\n{"txt": "ab"}\n', ":2", "expected a doccano record"),
        ("d.jsonl", '{"text": 5, "entities": []}\n', ":1", "the record holds no text"),
        ("d.jsonl", '{"text": "ab"}\n{"text": "ab",\n', ":2", "not JSON"),
        ("ls.json", '{"data": {"text": "ab"}}', "", "expected a JSON list of records"),
        ("ls.json", "[\n{]", ":2", "not JSON"),
        (  # Label Studio counts UTF-16 units: after an emoji its offsets are one further per emoji
            "ls.json",
            json.dumps(
                [
                    {
                        "data": {"text": "😀 Paris now"},
                        "annotations": [
                            {"result": [{"value": {"start": 3, "end": 8, "text": "Paris", "labels": ["L"]}}]}
                        ],
                    }
                ]
            ),
            ": record 1",
            r"covers 'aris ' in the text, but the annotation says 'Paris'",
        ),
        (
            "ls.json",
            json.dumps(
                [
                    {
                        "data": {"text": "ab"},
                        "annotations": [{"result": [{"value": {"start": 0, "end": 2, "labels": []}}]}],
                    }
                ]
            ),
            ": record 1",
            "give one label a span",
        ),
    ],
)
def test_span_file_errors_name_file_and_record(tmp_path, name, body, where, what):
    """Overlapping spans (in characters, or once widened to whole tokens), a span of white space, offsets outside
    the text or not whole numbers, a type with white space, a record of neither shape, text that is no string, a
    line that is not JSON, Label Studio offsets that miss the text they say they cover, and a result of no label
    each name the file and the record (file:line in JSONL)."""
    f = tmp_path / name
    f.write_text(body)
    with pytest.raises(QloranerError, match=rf"{f.name}{where}: .*{what}"):
        read_file(f)


def test_label_studio_reads_the_first_annotation_not_cancelled(tmp_path, capsys):
    """Label Studio: a cancelled annotation is passed over for the next; a task with no annotation is skipped and
    counted; results that are no span (a choice) are not read as one."""
    f = tmp_path / "ls.json"
    span = {"value": {"start": 0, "end": 5, "labels": ["PER"]}}
    f.write_text(
        json.dumps(
            [
                {"data": {"text": "Peter ran"}, "annotations": []},
                {
                    "data": {"text": "Peter ran"},
                    "annotations": [
                        {"was_cancelled": True, "result": []},
                        {"result": [span, {"value": {"choices": ["sports"]}}]},
                    ],
                },
            ]
        )
    )
    assert [(s.tokens, s.tags) for s in read_file(f)] == [(("Peter", "ran"), ("B-PER", "O"))]
    assert capsys.readouterr().out.strip() == f"qloraner: {f}: 1 tasks without an annotation skipped"


def test_newer_doccano_entity_objects(tmp_path):
    """Newer doccano's `{"start_offset", "end_offset", "label"}` entities read as its [start, end, TYPE] triples."""
    f = tmp_path / "d.jsonl"
    objects = [{"id": 1, "start_offset": 0, "end_offset": 2, "label": "ORG"}]
    f.write_text(json.dumps({"text": "EU rejects", "entities": objects}) + "\n")
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"text": "EU rejects", "label": [[0, 2, "ORG"]]}) + "\n")
    assert read_file(f) == read_file(g) and read_file(f)[0].tags == ("B-ORG", "O")
