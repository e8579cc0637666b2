import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraner import QloranerError
from qloraner.bio import spans
from qloraner.conll import read_conll, read_split, resolve_data_dir
from tests.strategies import valid_iob2, word

README_COUNTS = {"train": (14041, 23499), "valid": (3250, 5942), "test": (3453, 5648)}


@pytest.mark.parametrize("split", README_COUNTS)
def test_real_split_counts_match_readme(conll_dir, split):
    """Sentence and entity counts of each real split equal the data README's."""
    sentences = read_split(conll_dir, split)
    assert (len(sentences), sum(len(spans(s.tags)) for s in sentences)) == README_COUNTS[split]


def test_iob1_is_normalised(tmp_path):
    """IOB1 input (I- starting a chunk, B- only between touching chunks) reads as IOB2."""
    f = tmp_path / "x.txt"
    f.write_text(
        "-DOCSTART- -X- -X- O\n\nU.N. NNP I-NP I-ORG\nofficial NN I-NP O\nEkeus NNP I-NP I-PER\nRolf NNP I-NP B-PER\n"
    )
    (s,) = read_conll(f)
    assert s.tags == ("B-ORG", "O", "B-PER", "B-PER")


def test_context_is_the_neighbours_in_the_same_document(tmp_path):
    """A sentence's context is the sentence before it and the one after it, one per line, never from another
    document; a document of one sentence gives none."""
    docs = [["A a"], ["B b", "C c", "D d"], ["E e"], ["F f", "G g"]]
    body = "".join(
        "-DOCSTART- -X- -X- O\n\n" + "".join("".join(f"{w} NN O O\n" for w in text.split()) + "\n" for text in doc)
        for doc in docs
    )
    (tmp_path / "x.txt").write_text(body)
    contexts = {" ".join(s.tokens): s.context for s in read_conll(tmp_path / "x.txt")}
    assert contexts == {
        "A a": "",
        "B b": "C c",
        "C c": "B b\nD d",
        "D d": "C c",
        "E e": "",
        "F f": "G g",
        "G g": "F f",
    }


@pytest.mark.parametrize("split", README_COUNTS)
def test_real_contexts_stop_at_each_document_boundary(conll_dir, split):
    """On each real split, every context line is the text of the sentence just before or just after; exactly one
    sentence per document (its first) has none before it, and one (its last) none after it."""
    sentences = read_split(conll_dir, split)
    texts = [" ".join(s.tokens) for s in sentences]
    docs = (conll_dir / f"{split}.txt").read_text().count("-DOCSTART-")
    no_before = no_after = 0
    for i, s in enumerate(sentences):
        lines = s.context.split("\n") if s.context else []
        before = i > 0 and bool(lines) and lines[0] == texts[i - 1]
        after = i + 1 < len(texts) and bool(lines) and lines[-1] == texts[i + 1] and (len(lines) == 2 or not before)
        assert len(lines) == before + after
        no_before += not before
        no_after += not after
    assert no_before == no_after == docs


@pytest.mark.parametrize(
    "body,line,what",
    [
        ("EU NNP B-NP B-ORG\nrejects VBZ B-VP\n", 2, "expected 4 columns"),
        ("EU NNP B-NP B-ORG\n\nrejects VBZ B-VP X-ORG\n", 3, "bad NER tag"),
        ("EU NNP B-NP B-\n", 1, "bad NER tag"),
        ("EU NNP B-NP B-FOO\n", 1, r"bad NER tag 'B-FOO' \(CoNLL-2003 tags: O, B-LOC, I-LOC, B-MISC,"),
        ("EU NNP B-NP b-org\n", 1, "bad NER tag 'b-org'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, body, line, what):
    """A malformed line raises an error naming file:line and the fault."""
    f = tmp_path / "bad.txt"
    f.write_text(body)
    with pytest.raises(QloranerError, match=rf"bad\.txt:{line}: {what}"):
        read_conll(f)


def test_byte_order_mark_is_not_read_as_a_token(tmp_path):
    """A UTF-8 byte-order mark before -DOCSTART- is skipped: the file reads exactly as without it."""
    body = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
    (tmp_path / "plain.txt").write_text(body, encoding="utf-8")
    (tmp_path / "bom.txt").write_text(body, encoding="utf-8-sig")
    assert (tmp_path / "bom.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_conll(tmp_path / "bom.txt") == read_conll(tmp_path / "plain.txt")
    assert len(read_conll(tmp_path / "bom.txt")) == 1


def test_a_long_bad_line_is_quoted_short(tmp_path):
    """A file of 16,000 NUL bytes gives one error line of readable length that still names file:line."""
    f = tmp_path / "nul.txt"
    f.write_bytes(b"\0" * 16_000)
    with pytest.raises(QloranerError) as err:
        read_conll(f)
    assert str(err.value).startswith(f"{f}:1: expected 4 columns") and len(str(err.value)) < 400


def test_non_utf8_names_file_and_line(tmp_path):
    """A non-UTF-8 byte is reported with the file and its line."""
    f = tmp_path / "latin1.txt"
    f.write_bytes("EU NNP B-NP B-ORG\n\nM\xfcller NNP B-NP B-PER\n".encode("latin-1"))
    with pytest.raises(QloranerError, match=r"latin1\.txt:3: not UTF-8"):
        read_conll(f)


def test_missing_file_and_empty_split(tmp_path):
    """A missing file and a split with no sentences are clear errors."""
    with pytest.raises(QloranerError, match="train.txt: file not found"):
        read_split(tmp_path, "train")
    (tmp_path / "test.txt").write_text("-DOCSTART- -X- -X- O\n\n")
    with pytest.raises(QloranerError, match="holds no sentences"):
        read_split(tmp_path, "test")


def test_missing_data_dir_says_how_to_fix(tmp_path, monkeypatch):
    """No --data-dir, no CONLL_DIR and no datasets/conll2003: the error says what to set."""
    monkeypatch.delenv("CONLL_DIR", raising=False)
    with pytest.raises(QloranerError, match="CONLL_DIR"):
        resolve_data_dir(None, tmp_path)
    monkeypatch.setenv("CONLL_DIR", str(tmp_path))
    assert resolve_data_dir(None, tmp_path / "elsewhere") == tmp_path


def test_fetch_script_unpacks_the_three_splits_or_says_how_to_point_at_a_copy(tmp_path, conll_dir, monkeypatch):
    """With no data configured, resolve_data_dir runs datasets/fetch_conll2003.sh: it unpacks the public zip's
    three files (here served from a local file:// URL), and when the download fails it says what to set."""
    import shutil
    import zipfile

    from tests.conftest import ROOT

    project = tmp_path / "project"
    (project / "datasets").mkdir(parents=True)
    shutil.copy(ROOT / "datasets" / "fetch_conll2003.sh", project / "datasets")
    monkeypatch.delenv("CONLL_DIR", raising=False)
    monkeypatch.setenv("CONLL_URL", f"file://{tmp_path / 'missing.zip'}")
    with pytest.raises(QloranerError, match="set CONLL_DIR or pass --data-dir"):
        resolve_data_dir(None, project)
    with zipfile.ZipFile(tmp_path / "conll2003.zip", "w") as z:
        for split in ("train", "valid", "test"):
            z.write(conll_dir / f"{split}.txt", f"{split}.txt")
    monkeypatch.setenv("CONLL_URL", f"file://{tmp_path / 'conll2003.zip'}")
    data = resolve_data_dir(None, project)
    assert data == project / "datasets" / "conll2003"
    assert len(read_split(data, "test")) == 3453


def _conll_text(sentences, ending: str, blank: str) -> str:
    """CoNLL text of (tokens, tags) sentences: each line ended by `ending` after `blank` trailing blanks."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for tokens, tags in sentences:
        lines += [f"{t} NNP I-NP {g}" for t, g in zip(tokens, tags)] + [""]
    return "".join(line + (blank if line else "") + ending for line in lines)


@given(
    st.lists(
        st.lists(word, min_size=1, max_size=6).flatmap(lambda t: st.tuples(st.just(t), valid_iob2(len(t)))), max_size=5
    ),
    st.sampled_from(["\n", "\r\n", "\r\r\n", "\r"]),
    st.sampled_from(["", " ", "\t "]),
)
def test_any_line_ending_and_trailing_blanks_read_back_the_same_sentences(sentences, ending, blank):
    """Sentences written with LF, CRLF, CR CR LF or lone CR line endings, with or without trailing blanks, read back
    as exactly the sentences written."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.txt"
        path.write_bytes(_conll_text(sentences, ending, blank).encode())
        assert [(list(s.tokens), list(s.tags)) for s in read_conll(path)] == [(t, g) for t, g in sentences]


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param("\r\n", id="crlf"),
        pytest.param("\r\r\n", id="cr-cr-lf"),
        pytest.param("\r", id="lone-cr"),
        pytest.param("  \t\n", id="trailing-blanks"),
    ],
)
def test_a_line_ending_never_splits_a_sentence(tmp_path, ending):
    """The first real test sentences, each ending written as `ending`, read as the same sentences as with LF."""
    real = tmp_path / "lf.txt"
    real.write_text(_conll_text([("EU rejects German call".split(), "B-ORG O B-MISC O".split())] * 2, "\n", ""))
    other = tmp_path / "other.txt"
    other.write_bytes(real.read_bytes().replace(b"\n", ending.encode()))
    assert [s.tokens for s in read_conll(other)] == [s.tokens for s in read_conll(real)]
    assert len(read_conll(other)) == 2


def test_mixed_line_endings_in_one_file(tmp_path):
    """One file mixing LF, CRLF and CR CR LF (pasted pieces) reads as its sentences: each break is one line end."""
    f = tmp_path / "x.txt"
    f.write_bytes(
        b"EU NNP I-NP I-ORG\r\r\nrejects VBZ I-VP O\r\n\r\nPeter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\r\n"
    )
    assert [s.tags for s in read_conll(f)] == [("B-ORG", "O"), ("B-PER", "I-PER")]
