"""qloraner.tag and ./run_tag.sh: a trained adapter tags any text, with exact character offsets, as the evaluator."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qloraner import ENTITY_TYPES
from qloraner.bio import spans
from qloraner.config import EvalConfig
from qloraner.conll import read_split
from qloraner.evaluate import evaluate_model
from qloraner.tag import Tagger
from qloraner.tag_cli import conll_documents
from qloraner.text import sentences, tokenize
from tests.conftest import ROOT, last_line
from tests.strategies import raw_text

MAX_NEW = 24  # enough for the tiny adapter's answers on short sentences; keeps CPU decoding short


@pytest.fixture(scope="module")
def tagger(tiny_adapter) -> Tagger:
    return Tagger.load(tiny_adapter, "cpu", max_new_tokens=MAX_NEW, progress=False)


@pytest.fixture(scope="module")
def train_text(conll_dir) -> str:
    """The sentences the tiny adapter learned, written as plain text: it finds entities in them."""
    return "\n".join(" ".join(s.tokens) for s in read_split(conll_dir, "train")[:8])


def _adapter_with_prompt(tmp_path: Path, adapter: Path, prompt: str) -> Path:
    """A copy of `adapter` whose training settings name `prompt` as its template (the weights stay)."""
    copy = tmp_path / f"{prompt}-adapter" / "final"
    shutil.copytree(adapter, copy)
    settings_file = copy / "train_config.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "prompt": prompt}))
    return copy


@pytest.mark.parametrize("prompt", ["simple", "context"])
def test_tag_tokens_gives_the_evaluators_tags_on_conll_test_sentences(prompt, tmp_path, tiny_adapter, conll_dir):
    """On the first document of the CoNLL-2003 test split, Tagger.tag_tokens (with the documents of the file) gives
    exactly the predicted tags that the evaluator writes for the same adapter, prompt template included (`context`
    shows each sentence its neighbours)."""
    adapter = _adapter_with_prompt(tmp_path, tiny_adapter, prompt)
    first = conll_documents((conll_dir / "test.txt").read_text(encoding="utf-8"))[0]
    tokens = [[t.text for t in s] for s in first.sentences]
    out = tmp_path / "eval"
    config = EvalConfig(
        adapter=str(adapter), data_dir=str(conll_dir), limit=len(tokens), max_new_tokens=MAX_NEW, output_dir=str(out)
    )
    evaluate_model(config)
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == tokens
    tagger = Tagger.load(adapter, "cpu", max_new_tokens=MAX_NEW, progress=False)
    assert tagger.prompting.prompt == prompt
    assert tagger.tag_tokens(tokens, documents=[0] * len(tokens)) == [r["pred_tags"] for r in rows]


def test_entities_are_the_tagged_tokens_at_their_offsets(tagger, train_text):
    """On text it learned, the tiny adapter finds entities; each is the run of tokens that tag_tokens tags in the
    text's sentences (one document), at that run's character offsets."""
    (entities,) = tagger.tag([train_text])
    assert entities
    found = sentences(train_text)
    tags = tagger.tag_tokens([[t.text for t in s] for s in found], documents=[0] * len(found))
    expected = [(s[span.start].start, s[span.end - 1].end, span.type) for s, t in zip(found, tags) for span in spans(t)]
    assert [(e.start, e.end, e.label) for e in entities] == expected
    assert all(train_text[e.start : e.end] == e.text for e in entities)


@st.composite
def text_with_names(draw, words: list[str]) -> str:
    """Words of the learned sentences (so that entities come) between arbitrary Unicode and odd whitespace."""
    picked = draw(st.lists(st.sampled_from(words), max_size=12))
    gaps = draw(st.lists(st.one_of(st.just(" "), raw_text), min_size=len(picked) + 1, max_size=len(picked) + 1))
    return "".join(g + w for g, w in zip(gaps, [*picked, ""]))


def test_every_entity_is_the_text_at_its_offsets(tagger, train_text):
    """For arbitrary Unicode text (odd whitespace, brackets, empty) every entity is text[start:end], starts and
    ends on token boundaries, has an entity type, and entities come in order without overlapping."""
    words = train_text.split()

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(text_with_names(words), min_size=1, max_size=4))
    def check(texts):
        for text, entities in zip(texts, tagger.tag(texts)):
            starts, ends = {t.start for t in tokenize(text)}, {t.end for t in tokenize(text)}
            for before, e in zip([None, *entities], entities):
                assert text[e.start : e.end] == e.text and e.label in ENTITY_TYPES
                assert e.start in starts and e.end in ends
                assert before is None or before.end <= e.start

    check()


def test_the_package_exports_the_tagger():
    """`from qloraner import Tagger` is the API the issue documents; an unknown name is still an AttributeError."""
    import qloraner

    assert qloraner.Tagger is Tagger
    with pytest.raises(AttributeError):
        qloraner.NoSuchThing  # noqa: B018


def test_no_text_and_empty_texts_give_no_entities(tagger):
    """No texts, an empty one and one of whitespace give nothing, without decoding anything."""
    assert tagger.tag([]) == []
    assert tagger.tag(["", " \r\n\t\u200b"]) == [[], []]
    assert tagger.tag_tokens([]) == []


def run_tag(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """./run_tag.sh ARGS as a user runs it, in this interpreter's environment (env.sh's container mode: the venv's
    python3, no venv setup) and `env`."""
    env = {
        **os.environ,
        "QLORANER_IN_CONTAINER": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **(env or {}),
    }
    proc = subprocess.run(
        [str(ROOT / "run_tag.sh"), *args], input=stdin.encode(), capture_output=True, env=env, timeout=600
    )
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()[-3000:]
    return proc


def test_run_tag_sh_text_in_jsonl_out(tagger, tiny_adapter, train_text):
    """Text on standard input comes back as one JSON record holding the text exactly (CRLF, emoji, tabs) and the
    entities the Python API finds, in its character offsets; standard error (a log here, not a terminal) holds no
    redrawn progress bar of the model's loading."""
    text = "😀\t" + train_text.replace("\n", "\r\n") + " (x) "
    proc = run_tag("--adapter", str(tiny_adapter), "--max-new-tokens", str(MAX_NEW), stdin=text)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert b"Loading weights" not in proc.stderr and b"\r" not in proc.stderr
    (record,) = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert record["text"] == text
    assert record["entities"] == [asdict(e) for e in tagger.tag([text])[0]] != []


def test_run_tag_sh_conll_out_and_in(tmp_path, tagger, tiny_adapter, train_text):
    """--format conll writes each token of the text and its tag; read back with --input-format conll, the same
    tokens get the same tags."""
    source = tmp_path / "in.txt"
    source.write_text(train_text)
    first = run_tag("--adapter", str(tiny_adapter), "--max-new-tokens", str(MAX_NEW), "--format", "conll", str(source))
    assert first.returncode == 0, first.stderr.decode()[-3000:]
    lines = first.stdout.decode().split("\n")
    rows = [line.split("\t") for line in lines if line]
    assert [r[0] for r in rows] == [t.text for t in tokenize(train_text)]
    assert any(tag != "O" for _, tag in rows)
    conll = tmp_path / "out.conll"
    conll.write_bytes(first.stdout)
    args = ("--adapter", str(tiny_adapter), "--max-new-tokens", str(MAX_NEW), "--input-format", "conll")
    again = run_tag(*args, "--format", "conll", str(conll))
    assert again.returncode == 0 and again.stdout == first.stdout


def test_run_tag_sh_jsonl_in_passes_other_keys_through(tmp_path, tagger, tiny_adapter, train_text):
    """JSONL records of text or of tokens come back in order with their other keys, the tokens with their tags."""
    sentence = train_text.split("\n")[0]
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": 1, "text": sentence}) + "\r\n\n" + json.dumps({"id": "b", "tokens": sentence.split()}) + "\n"
    )
    proc = run_tag(
        "--adapter", str(tiny_adapter), "--max-new-tokens", str(MAX_NEW), "--input-format", "jsonl", str(source)
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    first, second = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert first["id"] == 1 and first["text"] == sentence
    assert first["entities"] == [asdict(e) for e in tagger.tag([sentence])[0]]
    assert second["id"] == "b" and second["tokens"] == sentence.split()
    assert second["tags"] == tagger.tag_tokens([sentence.split()])[0]


@pytest.mark.parametrize(
    ("input_format", "content", "message"),
    [
        ("jsonl", b'{"text": "fine"}\n{"text": oops}\n', r"in\.jsonl:2: not JSON"),
        ("jsonl", b'{"text": "a", "tokens": ["a"]}\n', r'in\.jsonl:1: expected an object with "text" or "tokens"'),
        ("jsonl", b'{"tokens": ["a b"]}\n', r'in\.jsonl:1: "tokens" must be a list of non-empty strings'),
        ("jsonl", b'{"text": 3}\n', r'in\.jsonl:1: "text" must be a string'),
        ("text", b"fine\nfine\n\xff\xfe bad\n", r"in\.jsonl:3: not UTF-8"),
    ],
)
def test_run_tag_sh_bad_input_is_one_line_and_exit_2(tmp_path, tiny_adapter, input_format, content, message):
    """Each kind of bad input stops ./run_tag.sh before the model loads, with one line naming FILE:LINE and what is
    wrong, exit code 2 and nothing on standard output."""
    import re

    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    proc = run_tag("--adapter", str(tiny_adapter), "--input-format", input_format, str(source))
    assert proc.returncode == 2 and proc.stdout == b""
    (line,) = proc.stderr.decode().splitlines()
    assert re.match(rf"error: .*{message}", line), line


def test_bad_input_is_refused_before_torch_loads(tmp_path):
    """./run_tag.sh reads its input before it imports torch and the model code: a bad file is refused in a fraction of
    the seconds those imports take. Python's own import log (PYTHONPROFILEIMPORTTIME) of the run names no torch
    module, and the error line is the same."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": 3}\n')
    proc = run_tag(
        "--adapter", str(tmp_path), "--input-format", "jsonl", str(source), env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    imported = [
        line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines() if line.startswith("import time:")
    ]
    assert proc.returncode == 2 and "qloraner.config" in imported, proc.stderr.decode()[-2000:]
    assert not [name for name in imported if name.split(".")[0] in ("torch", "transformers") or name == "qloraner.tag"]
    assert last_line(proc.stderr.decode()) == f'error: {source}:1: "text" must be a string, not int'


def test_run_tag_sh_missing_file_and_adapter(tmp_path, tiny_adapter):
    """A missing input file, and a folder that holds no adapter, are one line each and exit code 2."""
    proc = run_tag("--adapter", str(tiny_adapter), str(tmp_path / "none.txt"))
    assert proc.returncode == 2 and last_line(proc.stderr.decode()) == f"error: {tmp_path / 'none.txt'}: file not found"
    proc = run_tag("--adapter", str(tmp_path), stdin="Peter")
    assert proc.returncode == 2 and last_line(proc.stderr.decode()).startswith(f"error: adapter not found: {tmp_path}")
