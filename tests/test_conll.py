import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraner import QloranerError
from qloraner.bio import SCHEMES, spans
from qloraner.conll import (
    Columns,
    Corpus,
    Sentence,
    labels_of,
    read_conll,
    read_split,
    resolve_corpus,
    resolve_data_dir,
)
from tests.strategies import free_type, scheme_tags, valid_iob2, word

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
        ("EU NNP B-NP b-org\n", 1, "bad NER tag 'b-org'"),
        ("EU NNP B-NP PER\n", 1, r"bad NER tag 'PER' in column -1 \(expected O or PREFIX-TYPE"),
        ("EU NNP B-NP B-ORG\nrejects VBZ B-VP O extra\n", 2, "expected 4 columns as on line 1, got 5"),
        ("EU\n", 1, "expected at least 2 columns"),
        ("EU NNP B-NP S-ORG\n\nPeter NNP B-NP U-PER\n", 3, "BILOU tag 'U-PER', but line 1 has the BIOES tag 'S-ORG'"),
        ("-DOCSTART- O\n\nEU NNP B-NP E-ORG\n\nx NN O L-PER\n", 5, "BILOU tag 'L-PER', but line 3 has the BIOES"),
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
    assert str(err.value).startswith(f"{f}:1: expected at least 2 columns") and len(str(err.value)) < 400


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


def _sentences_of(n_tags):
    """Sentences of words, each with valid IOB2 tags of any types."""
    return st.lists(
        st.lists(word, min_size=1, max_size=5).flatmap(lambda t: st.tuples(st.just(t), valid_iob2(len(t)))),
        min_size=1,
        max_size=n_tags,
    )


@given(
    _sentences_of(4),
    st.integers(2, 12).flatmap(
        lambda w: st.tuples(st.just(w), st.permutations(range(w)), st.booleans(), st.booleans())
    ),
    st.sampled_from(["\t", " ", " \t ", "\t\t"]),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
)
def test_any_columns_read_back_the_sentences_written(sentences, layout, sep, ending, docstart):
    """Sentences written in a file of 2 to 12 columns, the token and the tag in any two of them (each given by its
    index or by a negative one from the end), split by spaces or tabs, LF or CRLF, with or without -DOCSTART-, read
    back as exactly the sentences written."""
    import tempfile
    from pathlib import Path

    width, order, token_neg, tag_neg = layout
    token_at, tag_at = order[0], order[1]
    lines = ["-DOCSTART-" + sep + "O", ""] if docstart else []
    for tokens, tags in sentences:
        for token, tag in zip(tokens, tags):
            row = [f"x{i}" for i in range(width)]
            row[token_at], row[tag_at] = token, tag
            lines.append(sep.join(row))
        lines.append("")
    columns = Columns(token_at - width if token_neg else token_at, tag_at - width if tag_neg else tag_at)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.tsv"
        path.write_bytes(ending.join(lines).encode())
        assert [(list(s.tokens), list(s.tags)) for s in read_conll(path, columns)] == [(t, g) for t, g in sentences]


@given(
    st.sampled_from(tuple(SCHEMES)).flatmap(
        lambda s: st.tuples(st.just(s), st.lists(st.integers(1, 8).flatmap(lambda n: scheme_tags(s, n)), max_size=4))
    ),
    st.booleans(),
)
def test_a_file_in_any_scheme_reads_as_its_iob2(case, detect):
    """A column file whose tags are written in IOB1, IOB2, BIOES or BILOU, the scheme given or detected from the
    file (auto), reads as the IOB2 tags they render."""
    import tempfile
    from pathlib import Path

    scheme, sentences = case
    body = "".join("".join(f"w{i}\tNN\t{tag}\n" for i, tag in enumerate(written)) + "\n" for _, written in sentences)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.bioes"
        path.write_text(body)
        read = read_conll(path, Columns(scheme="auto" if detect else scheme))
    assert [list(s.tags) for s in read] == [iob2 for iob2, _ in sentences]


@pytest.mark.parametrize(
    "body,columns,expected",
    [
        pytest.param(  # CoNLL-U's ten columns, tabs and CRLF, the NER tag last in BIOES, the token second
            "1\tJohn\tjohn\tPROPN\tNNP\t_\t2\tnsubj\t_\tB-PSN\r\n"
            + "2\tSmith\tsmith\tPROPN\tNNP\t_\t3\tnsubj\t_\tE-PSN\r\n"
            + "3\tleft\tleave\tVERB\tVBD\t_\t0\troot\t_\tO\r\n"
            + "4\tOslo\tOslo\tPROPN\tNNP\t_\t3\tobl\t_\tS-GPE\r\n\r\n",
            Columns(token=1),
            [("John Smith left Oslo", "B-PSN I-PSN O B-GPE")],
        ),
        pytest.param(  # WNUT-17's two tab-separated columns, lower-case types with hyphens
            "@paul\tO\nloves\tO\nNew\tB-creative-work\nYork\tI-creative-work\n \t\n",
            Columns(),
            [("@paul loves New York", "O O B-creative-work I-creative-work")],
        ),
        pytest.param(  # the tag first, the token last, trailing blanks, BILOU given
            "U-DATE 1996-08-22 \t\nO on  \nB-LOC Los\nL-LOC Angeles\n",
            Columns(token=-1, tag=0, scheme="bilou"),
            [("1996-08-22 on Los Angeles", "B-DATE O B-LOC I-LOC")],
        ),
    ],
)
def test_real_column_layouts(tmp_path, body, columns, expected):
    """Real corpora's layouts (CoNLL-U, WNUT-17, tag first) read as their sentences in IOB2, any entity types."""
    f = tmp_path / "data.txt"
    f.write_bytes(body.encode())
    assert [(" ".join(s.tokens), " ".join(s.tags)) for s in read_conll(f, columns)] == expected


@pytest.mark.parametrize(
    "body,columns,line,what",
    [
        (
            "EU NNP S-ORG\n",
            Columns(scheme="iob2"),
            1,
            r"bad NER tag 'S-ORG' in column -1 \(expected O or PREFIX-TYPE, ",
        ),
        ("1\tEU\tNNP\t_\n", Columns(token=1), 1, "bad NER tag '_' in column -1"),
        (
            "EU B-ORG\n",
            Columns(token=0, tag=2),
            1,
            "expected at least 2 columns, with the token in column 0 and the tag",
        ),
        ("EU B-ORG\n", Columns(token=-2, tag=0), 1, "expected at least 2 columns"),  # the same column
        ("EU\tX\tB-ORG\n\nPeter\tB-PER\n", Columns(), 3, "expected 3 columns as on line 1, got 2: 'Peter\\\\tB-PER'"),
    ],
)
def test_column_errors_name_file_and_line(tmp_path, body, columns, line, what):
    """A tag the scheme does not allow, a tag column that holds no tags, columns that a line lacks, and a line of
    fewer columns than the file's first each name file:line and quote the line's fault."""
    f = tmp_path / "bad.tsv"
    f.write_text(body)
    with pytest.raises(QloranerError, match=rf"bad\.tsv:{line}: {what}"):
        read_conll(f, columns)


@given(_sentences_of(5))
def test_labels_of_are_the_types_of_the_chunks(sentences):
    """labels_of gives each type that a chunk of the sentences has, once, sorted; none for sentences of O."""
    read = [Sentence(tuple(t), tuple(g)) for t, g in sentences]
    assert labels_of(read) == tuple(sorted({c.type for s in read for c in spans(s.tags)}))


@given(st.lists(free_type, min_size=1, max_size=12, unique=True))
def test_labels_of_any_types(types):
    """Sentences tagged with 1 to 12 types of any names give back exactly those types, sorted."""
    read = [Sentence(("a", "b"), (f"B-{t}", f"I-{t}")) for t in types]
    assert labels_of(read) == tuple(sorted(types))


def _settings(**given):
    """Data settings as TrainConfig's, the defaults where not given."""
    from qloraner.config import TrainConfig

    return TrainConfig(**given)


def test_files_by_name_read_any_names_and_formats(tmp_path):
    """--train-file, --valid-file and --test-file name files of any names and formats; a split left without one is
    an error naming the flags (never CoNLL-2003 beside a user's own data) unless --data-dir is given."""
    (tmp_path / "mine.tsv").write_text("EU\tS-ORG\nrejects\tO\n")
    (tmp_path / "dev.jsonl").write_text('{"text": "Peter left.", "entities": [[0, 5, "PER"]]}\n')
    corpus = resolve_corpus(
        _settings(train_file=str(tmp_path / "mine.tsv"), valid_file=str(tmp_path / "dev.jsonl")), tmp_path
    )
    assert [s.tags for s in corpus.read("train")] == [("B-ORG", "O")]
    assert [(s.tokens, s.tags) for s in corpus.read("valid")] == [(("Peter", "left", "."), ("B-PER", "O", "O"))]
    with pytest.raises(QloranerError, match=r"no test split: give --test-file \(the other splits are named by file"):
        corpus.read("test")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "test.txt").write_text("Oslo NNP B-NP B-LOC\n")
    corpus = resolve_corpus(_settings(train_file=str(tmp_path / "mine.tsv"), data_dir=str(folder)), tmp_path)
    assert [s.tags for s in corpus.read("test")] == [("B-LOC",)]
    with pytest.raises(QloranerError, match="--valid-file: empty; give a path"):
        resolve_corpus(_settings(valid_file=" "), tmp_path)
    (tmp_path / "empty.tsv").write_text("-DOCSTART- O\n\n")
    with pytest.raises(QloranerError, match=r"empty\.tsv: the test split holds no sentences"):
        Corpus((("test", str(tmp_path / "empty.tsv")),)).read("test")


def test_checksums_follow_the_bytes_and_how_they_read(tmp_path, conll_dir):
    """A run's data checksum is a file's own for CoNLL-2003 read as ever (checkpoints made before still resume), the
    same for the same bytes under another name, and another when the same bytes read by other columns."""
    import shutil

    from qloraner.data import data_sha256, sha256_of

    assert data_sha256(conll_dir, ("train",)) == sha256_of(conll_dir / "train.txt")
    shutil.copy(conll_dir / "valid.txt", tmp_path / "renamed.conll")
    named = resolve_corpus(_settings(train_file=str(tmp_path / "renamed.conll")), tmp_path)
    assert data_sha256(named, ("train",)) == sha256_of(conll_dir / "valid.txt")
    other = resolve_corpus(_settings(train_file=str(tmp_path / "renamed.conll"), token_column=1), tmp_path)
    assert data_sha256(other, ("train",)) != data_sha256(named, ("train",))


def test_the_instruction_cache_is_rebuilt_when_the_columns_change(tmp_path):
    """The instruction data cached for a train file is rebuilt when the same file reads by other columns."""
    from qloraner.data import instruction_data

    f = tmp_path / "t.tsv"
    f.write_text("EU\tEuropean\tS-ORG\nrejects\trejects\tO\n")
    out = tmp_path / "cache.json"
    first, _ = instruction_data(resolve_corpus(_settings(train_file=str(f)), tmp_path), "simple", out)
    second, manifest = instruction_data(
        resolve_corpus(_settings(train_file=str(f), token_column=1), tmp_path), "simple", out
    )
    assert (first[0]["tokens"], second[0]["tokens"]) == (["EU", "rejects"], ["European", "rejects"])
    assert manifest["reading"] == {"format": "columns", "token": 1, "tag": -1, "scheme": "auto"}


def test_data_settings_in_help_and_checked_at_once():
    """--help shows the data flags with the defaults a run uses; one column for token and tag is refused among the
    other settings' errors, all in one line."""
    from qloraner.config import TrainConfig, parser_for

    shown = " ".join(parser_for(TrainConfig, "x").format_help().split())
    for flag, default in [
        ("--train-file", "<data dir>/train.txt"),
        ("--test-file", "<data dir>/test.txt"),
        ("--token-column", "0"),
        ("--tag-column", "-1"),
        ("--tag-scheme", "'auto'"),
    ]:
        assert flag in shown and f"(default: {default})" in shown
    with pytest.raises(QloranerError, match=r"--lr: must be > 0; --token-column, --tag-column: both 2"):
        TrainConfig(lr=0, token_column=2, tag_column=2)


def test_train_and_evaluate_from_named_bioes_files(tmp_path, tiny_model, conll_dir):
    """End to end on the tiny model: train 2 steps from a tab-separated 6-column BIOES file named by --train-file
    (valid and test by their own flags, other names), then evaluate on the test file: the run reads those files, its
    manifest names them, and the evaluation counts the test file's sentences."""
    import json

    from tests.conftest import run_entry, tiny_args

    rows = [
        [("EU", "S-ORG"), ("rejects", "O"), ("German", "S-MISC"), ("call", "O")],
        [("Peter", "B-PER"), ("Blackburn", "E-PER"), ("in", "O"), ("Brussels", "S-LOC")],
        [("New", "B-LOC"), ("York", "I-LOC"), ("City", "E-LOC"), ("grew", "O")],
    ]
    body = "".join(
        "".join(f"{i}\t{tok}\t_\tNNP\t_\t{tag}\r\n" for i, (tok, tag) in enumerate(sentence, 1)) + "\r\n"
        for sentence in rows * 3
    )
    files = {name: tmp_path / f"{name}.bioes.tsv" for name in ("mine", "dev", "held-out")}
    for f in files.values():
        f.write_text(body)
    out = tmp_path / "run"
    flags = [
        "--train-file",
        str(files["mine"]),
        "--valid-file",
        str(files["dev"]),
        "--test-file",
        str(files["held-out"]),
    ]
    args = tiny_args(tiny_model, conll_dir, out, *flags, "--token-column", "1", "--max-steps", "2", "--eval-limit", "3")
    proc = run_entry("train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "instruction_manifest.json").read_text())
    assert manifest["files"] == [str(files["mine"]), str(files["dev"])]  # the recipe learns from train+valid
    assert manifest["reading"]["token"] == 1
    (metrics,) = [json.loads(p.read_text()) for p in out.glob("eval*/metrics.json")]
    assert metrics["sentences"] == 3
    first = json.loads((out / "eval-limit3" / "responses.jsonl").read_text().splitlines()[0])
    assert (first["tokens"], first["gold_tags"]) == (["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"])
