import re
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qloraner import ROOT, QloranerError
from qloraner.config import (
    DEFAULT_RECIPE,
    RECIPE_PATHS,
    RECIPES,
    DataSettings,
    DecodeSettings,
    EvalConfig,
    TrainConfig,
    flag,
    from_args,
    load_recipe,
    parser_for,
)
from qloraner.serve import ServeConfig
from qloraner.tag_cli import TagConfig


@pytest.mark.parametrize(
    ("cls", "settings", "message"),
    [
        (TrainConfig, {"lora_r": 0}, "--lora-r: must be > 0"),
        (TrainConfig, {"lora_dropout": 1.0}, "--lora-dropout: must be in [0, 1)"),
        (TrainConfig, {"epochs": 0, "max_steps": 0}, "--epochs or --max-steps: one must be > 0"),
        (TrainConfig, {"target_modules": " , "}, "--target-modules: name at least one module"),
        (TrainConfig, {"micro_batch_size": -1}, "--micro-batch-size: must be >= 0"),
        (TrainConfig, {"response_format": "yaml"}, "--response-format: 'yaml' is not one of lines, json"),
        (EvalConfig, {"response_format": "xml"}, "--response-format: 'xml' is not one of lines, json"),
        (TrainConfig, {"prompt": "chatty"}, "--prompt: 'chatty' is not one of simple, typed, fewshot"),
        (EvalConfig, {"split": "dev"}, "--split: 'dev' is not one of train, valid, test"),
        (EvalConfig, {"merge": True}, "--merge: needs --adapter"),
        (EvalConfig, {"compare_base": True}, "--compare-base: needs --adapter"),
        (EvalConfig, {"batch_size": 0}, "--batch-size: must be > 0"),
        (TrainConfig, {"epochs": float("inf")}, "--epochs: must be a finite number"),
        (TrainConfig, {"lr": float("nan")}, "--lr: must be a finite number"),
        (TrainConfig, {"train_split": "train+valid", "eval_split": "valid"}, "--eval-split valid: the adapter learns"),
        (TrainConfig, {"train_split": "valid"}, "--train-split: 'valid' is not one of train, train+valid"),
    ],
)
def test_invalid_setting_is_named(cls, settings, message):
    """Each invalid setting is refused with its flag named."""
    with pytest.raises(QloranerError, match="invalid settings: .*" + re.escape(message)):
        cls(**settings)


def test_all_errors_are_reported_at_once():
    """Three bad flags give one error that names all three."""
    with pytest.raises(QloranerError) as err:
        from_args(TrainConfig, ["--lora-r", "0", "--lr", "-1", "--lora-dropout", "1"], "test")
    assert all(flag in str(err.value) for flag in ("--lora-r", "--lr", "--lora-dropout"))


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_each_recipe_loads_and_validates(recipe):
    """Every recipe file parses, names only known settings of the right type, and passes the settings' checks."""
    name, values = load_recipe(TrainConfig, recipe)
    config = TrainConfig(**values, recipe=name)
    assert name == recipe and values and all(getattr(config, k) == v for k, v in values.items())


def test_no_recipe_flag_means_the_default_recipe():
    """Without --recipe the embedded default's recipe applies, and its name is recorded."""
    _, values = load_recipe(TrainConfig, DEFAULT_RECIPE)
    config = from_args(TrainConfig, [], "test")
    assert config.recipe == DEFAULT_RECIPE and all(getattr(config, k) == v for k, v in values.items())


@given(lr=st.floats(1e-6, 1.0), batch=st.integers(1, 512), steps=st.integers(1, 10_000))
def test_flags_override_the_recipe_which_overrides_defaults(lr, batch, steps):
    """Flags win over the recipe; the recipe wins over the built-in defaults; unset, unrecipied fields keep them."""
    config = from_args(TrainConfig, ["--recipe", DEFAULT_RECIPE, "--lr", repr(lr), "--max-steps", str(steps)], "test")
    _, recipe = load_recipe(TrainConfig, DEFAULT_RECIPE)
    assert (config.lr, config.max_steps) == (lr, steps)
    assert config.batch_size == recipe["batch_size"] != TrainConfig.batch_size
    assert config.warmup_steps == TrainConfig.warmup_steps and "warmup_steps" not in recipe
    flagged = from_args(TrainConfig, ["--recipe", DEFAULT_RECIPE, "--batch-size", str(batch)], "test")
    assert flagged.batch_size == batch


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr = 1e-3\nlearning_rate = 1e-3\n", "unknown key 'learning_rate'"),
        ("lora_r = 8.5\n", "lora_r = 8.5 is not int"),
        ("gradient_checkpointing = 1\n", "gradient_checkpointing = 1 is not bool"),
        ("batch_size = true\n", "batch_size = True is not int"),
        ("lr = [\n", "not a valid TOML recipe"),
    ],
)
def test_bad_recipe_is_one_line_naming_the_file(tmp_path, text, message):
    """A recipe with an unknown key, a wrong type or broken TOML is refused in one line that names the file."""
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(QloranerError) as err:
        from_args(TrainConfig, ["--recipe", str(path)], "test")
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key", RECIPE_PATHS)
def test_a_recipes_relative_paths_are_its_own_and_a_flags_the_users(tmp_path, monkeypatch, key):
    """A relative path in a TOML file given by path is that file's folder's, an absolute one stays as written, and
    the same path as a flag is the folder's the command runs in; a recipe in recipes/ reads from the project."""
    (tmp_path / "mine").mkdir()
    recipe = tmp_path / "mine" / "r.toml"
    recipe.write_text(f'{key} = "data/x"\n')
    monkeypatch.chdir(tmp_path)
    assert getattr(from_args(TrainConfig, ["--recipe", str(recipe)], "test"), key) == str(tmp_path / "mine/data/x")
    recipe.write_text(f'{key} = "{tmp_path}/abs"\n')
    assert getattr(from_args(TrainConfig, ["--recipe", str(recipe)], "test"), key) == f"{tmp_path}/abs"
    flag = "--" + key.replace("_", "-")
    assert getattr(from_args(TrainConfig, ["--recipe", str(recipe), flag, "data/x"], "test"), key) == "data/x"
    project = {k: v for name in RECIPES.glob("*.toml") for k, v in load_recipe(TrainConfig, name.stem)[1].items()}
    assert all(Path(project[k]).is_relative_to(ROOT) for k in RECIPE_PATHS if k in project)


def test_missing_recipe_lists_the_known_ones():
    """A recipe name that is neither in recipes/ nor a file is an error listing the recipes there are."""
    with pytest.raises(QloranerError, match=r"recipe not found: nope \(give a TOML file or one of: .*smollm2-135m"):
        from_args(TrainConfig, ["--recipe", "nope"], "test")


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("12", 12)])
def test_eval_batch_size_is_auto_or_a_number(value, expected):
    """--batch-size takes 'auto' (the default) or a whole number; anything else is named."""
    assert EvalConfig().batch_size == "auto"
    assert from_args(EvalConfig, ["--batch-size", value], "test").batch_size == expected
    with pytest.raises(QloranerError, match="--batch-size: 'big' is neither auto nor a whole number"):
        EvalConfig(batch_size="big")


def test_the_default_output_folder_is_the_projects_wherever_the_command_runs():
    """Without --output-dir a training writes into the project's outputs/run/, not into the folder the command runs
    from (the entry points no longer change into the project folder)."""
    from qloraner import ROOT

    assert TrainConfig().output_dir == str(ROOT / "outputs" / "run")


def test_engine_switches_are_accepted_but_left_out_of_help():
    """The engine's speed switches (fields marked `engine`) still parse, but --help lists none of them among the
    options: one epilog line names them and docs/ENGINE.md; every other field keeps its flag in --help."""
    parser = parser_for(TrainConfig, "x")
    engine = [flag(f) for f in fields(TrainConfig) if f.metadata.get("engine")]
    assert engine, "no field is marked as an engine switch"
    options = parser.format_help().partition("engine switches")[0]
    assert not [name for name in engine if re.search(rf"{name}\b(?!-)", options)]
    assert all(name in parser.epilog for name in engine) and "docs/ENGINE.md" in parser.epilog
    users = [flag(f) for f in fields(TrainConfig) if not (f.metadata.get("engine") or f.metadata.get("recipe_only"))]
    assert all(name in options for name in users)
    assert vars(parser.parse_args(["--no-compile", "--cuda-graphs"])) == {"compile": False, "cuda_graphs": True}


@pytest.mark.parametrize(
    ("cls", "shared", "title"),
    [
        (TrainConfig, DataSettings, "data"),
        (EvalConfig, DataSettings, "data"),
        (TagConfig, DecodeSettings, "decoding"),
        (ServeConfig, DecodeSettings, "decoding"),
    ],
)
def test_shared_settings_are_declared_once_and_shown_as_one_section(cls, shared, title):
    """A job's settings take the shared ones (data, decoding) from one class: the very same fields, docs and
    defaults; --help lists the job's own options first, then the shared ones in one section titled by that class,
    each flag once."""
    own = [f for f in fields(cls) if f.name not in {g.name for g in fields(shared)}]
    assert [f for f in fields(cls) if f not in own] == [
        f for f in fields(shared) if f.name not in vars(cls).get("__annotations__", {})
    ]
    head, found, section = parser_for(cls, "x").format_help().partition(f"\n{title}:\n")
    assert found
    options = head.partition("\noptions:\n")[2]
    inherited = [f for f in fields(cls) if f not in own and not f.metadata.get("engine")]
    assert inherited and all(re.search(rf"^  {flag(f)}\b", section, re.M) for f in inherited)
    assert not any(re.search(rf"^  {flag(f)}\b", options, re.M) for f in inherited)
    assert all(
        re.search(rf"^  {flag(f)}\b", options, re.M)
        for f in own
        if not f.metadata.get("recipe_only") and not f.metadata.get("engine")
    )
