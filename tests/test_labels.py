import importlib.util
import json
import string
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraner import ENTITY_TYPES, QloranerError
from qloraner.bio import bio_to_entities, entities_to_bio, spans
from qloraner.config import TrainConfig, load_recipe
from qloraner.conll import read_split
from qloraner.data import instruction_data
from qloraner.evaluate import report_types
from qloraner.labels import CONLL, LabelSet, name_errors, types_seen
from qloraner.metrics import score
from qloraner.parse import RENDERERS, canonical_type, parse_response, render_response, tag_response
from qloraner.prompts import TEMPLATES, build_prompt
from tests.conftest import ROOT, run_entry, tiny_args
from tests.strategies import gold_and_pred, label_set, tagged_sentence, word

PLAIN_WORD = st.text(alphabet=string.ascii_letters + "éüß", min_size=1, max_size=6)
BASE = "a6aebd0"  # the commit before label sets: its prompts are CoNLL-2003's, which the default must keep


def _module_at(commit: str, path: str, name: str):
    """A module's source as of `commit`, loaded beside today's package (None where git or the commit is missing:
    a source archive, a shallow clone)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


OLD_DATA = _module_at(BASE, "qloraner/data.py", "qloraner_data_before_label_sets")


@pytest.mark.skipif(OLD_DATA is None, reason=f"git history with {BASE} is not here")
@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("response_format", RENDERERS)
@given(tokens=st.lists(word, min_size=1, max_size=8), context=st.text(max_size=20))
def test_default_prompts_are_those_before_label_sets(template, response_format, tokens, context):
    """With CoNLL-2003's label set (the default, and what CoNLL-2003's training split gives), every template and
    response format builds the prompt the code before label sets built: the default recipe's prompts, its
    instruction-data cache and its F1 do not move."""
    before = OLD_DATA.build_prompt(tokens, template, response_format, context)
    assert build_prompt(tokens, template, response_format, context) == before
    assert build_prompt(tokens, template, response_format, context, LabelSet.from_data(ENTITY_TYPES)) == before


def test_conll_training_data_gives_the_default_label_set(conll_dir, tmp_path):
    """CoNLL-2003's training split reads as exactly CONLL (its types, today's descriptions), and the instruction
    data's manifest records it in the form an adapter saves."""
    assert LabelSet.from_data(types_seen(s.tags for s in read_split(conll_dir, "train"))) == CONLL
    _, manifest = instruction_data(conll_dir, "typed", tmp_path / "data.json", limit=5)
    assert LabelSet.from_saved(manifest["labels"]) == CONLL


@given(label_set)
def test_saved_label_sets_read_back_as_themselves(labels):
    """An adapter's recorded label set (to_saved, through JSON) reads back as the same set; nothing recorded is
    CoNLL-2003's."""
    assert LabelSet.from_saved(json.loads(json.dumps(labels.to_saved()))) == labels
    assert LabelSet.from_saved(None) == CONLL


@st.composite
def labelled_sentence(draw, formats=tuple(RENDERERS), brackets=True) -> tuple[LabelSet, list[str], list[str], str]:
    """A random label set, a sentence tagged with its types, and a response format. With `brackets`, tokens may
    look like the set's own openers and canonical heads (`[TYPE`, `[[TYPE`, `[TYPE]`, `TYPE]`); without, they
    are letters only (an inline answer's mention keeps a token's escape, which only inline_tags reads back; a JSON
    answer's values lose their quotes)."""
    labels = draw(label_set)
    look_alikes = [f"{b}{t}{e}" for t in labels.types for b, e in (("[", ""), ("[[", ""), ("[", "]"), ("", "]"))]
    token = st.one_of(word, st.sampled_from(look_alikes)) if brackets else PLAIN_WORD
    tokens, tags = draw(tagged_sentence(token, st.sampled_from(labels.types)))
    return labels, tokens, tags, draw(st.sampled_from(formats))


@given(labelled_sentence(("lines", "inline")))
def test_a_perfect_answer_tags_back_to_its_tags_with_any_label_set(case):
    """For any label set, the perfect answer in the lines and inline formats tags back to exactly the gold tags,
    whatever look-alikes of the set's own brackets the tokens hold."""
    labels, tokens, tags, fmt = case
    assert tag_response(tokens, render_response(tokens, tags, fmt, labels), labels) == tags


@given(labelled_sentence(brackets=False))
def test_every_format_parses_back_to_its_entities_with_any_label_set(case):
    """For any label set, render_response -> parse_response recovers the sentence's entities by type in every
    response format (JSON groups them by type, so there the order within each type is what holds)."""
    labels, tokens, tags, fmt = case
    parsed = parse_response(render_response(tokens, tags, fmt, labels), labels)
    assert dict(parsed) == dict(bio_to_entities(tokens, tags))


@given(labelled_sentence())
def test_tagger_round_trip_with_any_label_set(case):
    """entities_to_bio over a label set's types rebuilds the tags that bio_to_entities read."""
    labels, tokens, tags, _ = case
    assert entities_to_bio(tokens, bio_to_entities(tokens, tags), labels.types) == tags


@given(st.data())
def test_per_type_metrics_are_the_label_sets(data):
    """The per-type report holds exactly the given types, whatever the tags hold."""
    labels = data.draw(label_set)
    gold, pred = data.draw(gold_and_pred(st.sampled_from(labels.types)))
    assert list(score(gold, pred, labels.types)["per_type"]) == list(labels.types)


@given(label_set, st.data())
def test_a_type_name_reads_in_any_letter_case(labels, data):
    """Each type of the set is read by its own name in any letter case, in every line form."""
    type_ = data.draw(st.sampled_from(labels.types))
    name = "".join(c.lower() if data.draw(st.booleans()) else c for c in type_)
    assert canonical_type(name, labels) == type_
    assert dict(parse_response(f"{name}: Bonn7", labels)) == {type_: ["Bonn7"]}


@pytest.mark.parametrize(
    "types,name,expected",
    [
        pytest.param(("PSN",), "Person", None, id="no-conll-synonyms-without-conll-types"),
        pytest.param(("LOC", "PSN"), "Person", None, id="only-the-synonyms-of-the-conll-types-present"),
        pytest.param(("LOC", "PSN"), "location names", "LOC", id="a-conll-type-keeps-its-synonyms"),
        pytest.param(("PER", "PERSON"), "person", "PERSON", id="a-type-of-the-set-wins-over-a-synonym"),
        pytest.param(("PER",), "MISC", None, id="a-conll-type-outside-the-set"),
        pytest.param(("WORK_OF_ART",), "work_of_art", "WORK_OF_ART", id="underscores"),
        pytest.param(("geo-loc",), "GEO-LOC", "geo-loc", id="hyphen-and-lower-case"),
    ],
)
def test_type_names_real_cases(types, name, expected):
    """Names the parser reads as a type of the set, or not."""
    assert canonical_type(name, LabelSet(types)) == expected


def test_a_type_outside_the_set_is_not_read():
    """An answer of a type the model does not tag gives nothing of it, in every form."""
    labels = LabelSet(("DRUG", "GENE"))
    text = "[PER] Peter\n[GENE] BRCA1\nLOC: Bonn\n"
    assert dict(parse_response(text, labels)) == {"GENE": ["BRCA1"]}
    assert tag_response(["[PER", "Mary]", "BRCA1"], "[[PER [PER Mary]] [GENE BRCA1]", labels) == ["O", "O", "B-GENE"]


@given(label_set, st.sampled_from(list(TEMPLATES)), st.sampled_from(list(RENDERERS)))
def test_prompts_name_the_label_sets_types(labels, template, response_format):
    """Every prompt's rules list exactly the set's types; the few-shot example shows only where its types (ORG,
    MISC) are the set's, and then tags only with them."""
    prompt = build_prompt(["Bonn"], template, response_format, "", labels)
    assert labels.listed in prompt
    example = "Example answer:" in prompt
    assert example == (template == "fewshot" and {"MISC", "ORG"} <= set(labels.types))


def test_descriptions_show_in_the_typed_prompt():
    """A recipe's descriptions describe their types in the typed prompt; a CoNLL type keeps its own unless given;
    a type with none is named."""
    labels = LabelSet.from_data(("PER", "PSN", "ZZ"), {"PSN": "pet names"})
    prompt = build_prompt(["x"], "typed", "lines", "", labels)
    assert "Types: PSN = pet names; PER = people; ZZ.\n" in prompt


@pytest.mark.parametrize(
    "names,error",
    [
        pytest.param(["NONE"], "reserved", id="the-empty-answer"),
        pytest.param(["none"], "reserved", id="the-empty-answer-in-lower-case"),
        pytest.param(["1ST"], "use a letter", id="a-digit-first"),
        pytest.param(["A B"], "use a letter", id="a-space"),
        pytest.param(["A]"], "use a letter", id="a-bracket"),
        pytest.param(["PER", "per"], "differ only in letter case", id="case-twins"),
        pytest.param(["X" * 41], "use a letter", id="too-long"),
    ],
)
def test_type_names_no_prompt_can_carry(names, error):
    """Type names that would break an answer are refused, each with its reason."""
    assert error in " ".join(name_errors(names))
    with pytest.raises(QloranerError, match=error):
        LabelSet(tuple(sorted(names)))


def test_recipe_labels_section(tmp_path):
    """A recipe's [labels] section gives TrainConfig.labels; a description that is not one line is refused with
    the others' errors."""
    recipe = tmp_path / "mine.toml"
    recipe.write_text('epochs = 1.0\n[labels]\nPSN = "people"\nGEO = "places"\n')
    _, values = load_recipe(TrainConfig, str(recipe))
    assert TrainConfig(**values).labels == {"PSN": "people", "GEO": "places"}
    with pytest.raises(QloranerError) as err:
        TrainConfig(labels={"PSN": "a\nb", "1X": "y"})
    assert "labels: PSN = 'a\\nb' is not one line" in str(err.value) and "entity type '1X'" in str(err.value)


def test_a_type_the_model_lacks_is_reported_and_counted(capsys):
    """Gold types the model was not trained on join the report (their mentions count against recall), and one
    line names them; a --limit run does not list the model's types the few sentences lack."""
    from qloraner.conll import Sentence

    sentences = [Sentence(("Bonn", "BRCA1"), ("B-LOC", "B-GENE"))]
    assert report_types(CONLL, sentences, "test", whole=False) == ("GENE", "LOC", "MISC", "ORG", "PER")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "not trained on GENE" in out[0]
    report_types(CONLL, [Sentence(("Bonn",), ("B-LOC",))], "test", whole=True)
    assert "the test split's types are LOC" in capsys.readouterr().out
    report_types(CONLL, [Sentence(("Bonn",), ("B-LOC",))], "test", whole=False)
    assert capsys.readouterr().out == ""


def _relabel(conll_dir, out, rename, sizes=(60, 20, 20)) -> None:
    """CoNLL-2003's first sentences of each split, each mention's type renamed by rename(type, how many mentions of
    that type came before it in the split)."""
    out.mkdir()
    for split, n in zip(("train", "valid", "test"), sizes):
        lines, seen = [], dict.fromkeys(ENTITY_TYPES, 0)
        for s in read_split(conll_dir, split)[:n]:
            tags = list(s.tags)
            for span in spans(tags):
                new = rename(span.type, seen[span.type])
                seen[span.type] += 1
                tags[span.start : span.end] = [f"B-{new}"] + [f"I-{new}"] * (span.end - span.start - 1)
            lines += [f"{t} X X {tag}" for t, tag in zip(s.tokens, tags)] + [""]
        (out / f"{split}.txt").write_text("\n".join(lines))


TWELVE = {t: [f"{t}{v}" for v in "ABC"] for t in ENTITY_TYPES}  # 4 types x 3: LOCA, LOCB, ..., PERC


@pytest.mark.parametrize(
    "rename,expected",
    [
        pytest.param(lambda t, k: "THING", ("THING",), id="one-type"),
        pytest.param(lambda t, k: TWELVE[t][k % 3], tuple(sorted(sum(TWELVE.values(), []))), id="twelve-types"),
    ],
)
def test_a_label_set_end_to_end(tmp_path, tiny_model, conll_dir, rename, expected):
    """Train 2 steps on data of other types than CoNLL-2003's, then evaluate a few sentences: the adapter records
    exactly the data's types, and the evaluation's per-type report and responses hold exactly them."""
    data, out = tmp_path / "data", tmp_path / "run"
    _relabel(conll_dir, data, rename)
    assert types_seen(s.tags for s in read_split(data, "train")) == expected  # the data holds every type
    args = tiny_args(tiny_model, data, out, "--max-steps", "2", "--no-eval", "--prompt", "typed")
    train = run_entry("train", *args)
    assert train.returncode == 0, train.stderr[-2000:]
    saved = json.loads((out / "final" / "train_config.json").read_text())["labels"]
    assert tuple(sorted(saved)) == expected
    evaluate = run_entry(
        "evaluate", "--adapter", str(out / "final"), "--data-dir", str(data), "--limit", "4", "--batch-size", "4"
    )
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    metrics = json.loads((out / "eval-limit4" / "metrics.json").read_text())
    assert tuple(metrics["per_type"]) == expected
    assert tuple(metrics["labels"]) == expected
    rows = [json.loads(line) for line in (out / "eval-limit4" / "responses.jsonl").read_text().splitlines()]
    assert all(tuple(row["entities"]) == expected for row in rows)
    assert "warning" not in evaluate.stdout  # the data's types are the adapter's
