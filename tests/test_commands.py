"""The key=value commands: ``--help`` lists every key with its default, errors are one line, and each
console script of pyproject.toml names a function that exists."""

import importlib
from pathlib import Path

import pytest

from agree import cli, demo, folders, pretrain, study
from agree.data import synthetic
from agree.report.__main__ import ReportConfig
from agree.report.__main__ import main as report_main

REPO = Path(__file__).resolve().parents[1]
# the demo and the study hand an argument naming none of their keys to Hydra
UNKNOWN = {
    "python -m agree.demo": "Could not override 'nope'",
    "python -m agree.study": "Could not override 'nope'",
}
COMMANDS = {  # command -> (main, keys its --help must show, as they are typed)
    "python -m agree.demo": (demo.main, ["output_dir=outputs/demo", "overrides=[]"]),
    "python -m agree.study": (
        study.main,
        ["output_dir=outputs/study", "seeds=[0,1,2,3,4]", "lrs=[0.0003,0.001]", "render_only=false"],
    ),
    "python -m agree.pretrain": (pretrain.main, ["output=???", "corpus.seed=0", "steps=1500", "lr=0.001"]),
    "python -m agree.data.synthetic": (synthetic.main, ["root=???", "image_size=64", "mean=[0.48145466,"]),
    "python -m agree.folders": (folders.main, ["remove=[]"]),
    "python -m agree.report": (report_main, ["directory=???", "queries=6", "seed=0"]),
}
SCRIPTS = {
    "agree-train",
    "agree-evaluate",
    "agree-prepare",
    "agree-report",
    "agree-demo",
    "agree-study",
    "agree-pretrain",
}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_key_with_its_default_and_runs_nothing(command, tmp_path, monkeypatch, capsys):
    main, keys = COMMANDS[command]
    monkeypatch.chdir(tmp_path)
    main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"usage: {command} key=value ..." and lines[2] == "keys:"
    assert all(any(line.strip().startswith(key) for line in lines) for key in keys), lines
    assert not any(tmp_path.iterdir())


ONE_REQUIRED = {"python -m agree.pretrain", "python -m agree.data.synthetic", "python -m agree.report"}
CONFIGS = {
    "python -m agree.pretrain": pretrain.PretrainCommand,
    "python -m agree.data.synthetic": synthetic.GenerateConfig,
    "python -m agree.report": ReportConfig,
}
BAD_ARGUMENTS = [(c, "nope=1") for c in COMMANDS] + [
    (c, "some/folder") for c in COMMANDS if c not in ONE_REQUIRED
]


@pytest.mark.parametrize("command, argument", BAD_ARGUMENTS)
def test_a_bad_argument_is_one_line_naming_it(command, argument, tmp_path, monkeypatch):
    main, _ = COMMANDS[command]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        main([argument])
    message = str(stop.value)
    if argument == "nope=1":
        expected = UNKNOWN.get(command, f"config error: {command}: unknown key 'nope'; keys: ")
    else:
        expected = f"config error: {command}: 'some/folder' is not key=value; keys: "
    assert "\n" not in message and message.startswith("config error: ") and expected in message, message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "main, argv, fragment",
    [
        (pretrain.main, ["output=w.safetensors", "steps=many"], "steps: Value 'many'"),
        (pretrain.main, ["steps=3"], "missing required output"),
        (pretrain.main, ["output=w.safetensors", "corpus.sed=1"], "corpus.sed: Key 'sed' not in"),
        (synthetic.main, ["root=scenes", "image_size=big"], "image_size: Value 'big'"),
        (study.main, ["seeds=[zero]"], "seeds[0]: Value 'zero'"),
        (study.main, ["drop=[clip,nope]"], "drop: 'nope' is not a loss"),
        (demo.main, ["+experiment=nope"], "Could not find 'experiment/nope'"),
    ],
)
def test_a_bad_value_is_one_line_before_anything_is_written(main, argv, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value)
    assert "\n" not in message and message.startswith("config error: ") and fragment in message, message
    assert not any(tmp_path.iterdir())


def test_arguments_naming_no_key_of_the_command_are_its_hydra_overrides():
    argv = ["data.root=r", "output_dir=o", "overrides=[seed=1]", "+debug=default", "~callbacks.lr_monitor"]
    cfg = cli.parse("demo", demo.DemoConfig, argv)
    assert cfg.output_dir == "o"
    assert cfg.overrides == ["seed=1", "data.root=r", "+debug=default", "~callbacks.lr_monitor"]


def test_nested_and_frozen_configs_take_dotted_keys():
    cfg = cli.parse("pretrain", pretrain.PretrainCommand, ["output=w", "corpus.seed=2", "lr=3e-4"])
    assert cfg.corpus.seed == 2 and cfg.lr == 3e-4 and cfg.steps == pretrain.PretrainConfig.steps
    with pytest.raises(AttributeError):  # still frozen
        cfg.steps = 1


def test_the_generator_command_makes_the_same_dataset_as_the_config():
    """The command's lists become the tuples of ``SceneConfig``: the same manifest, the same folder claim."""
    cfg = cli.parse("scenes", synthetic.GenerateConfig, ["root=x", "seed=3", "mean=[0.5,0.5,0.5]"])
    assert cfg.scenes() == synthetic.SceneConfig(seed=3, mean=(0.5, 0.5, 0.5))


def test_every_console_script_names_a_function():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert SCRIPTS <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


@pytest.mark.parametrize("command", sorted(ONE_REQUIRED))
def test_a_lone_path_is_the_one_required_key(command):
    """``agree-report DIR`` is ``agree-report directory=DIR``; a second positional one is refused."""
    main, keys = COMMANDS[command]
    config = CONFIGS[command]
    key = next(k for k in keys if k.endswith("=???")).removesuffix("=???")
    assert getattr(cli.parse(command, config, ["some/folder"]), key) == "some/folder"
    assert getattr(cli.parse(command, config, [f"{key}=some/folder"]), key) == "some/folder"
    with pytest.raises(cli.ConfigError, match="'some/folder' is not key=value"):
        cli.parse(command, config, ["some/folder", "other"])


def test_report_takes_its_folder_as_the_argument(tmp_path, capsys):
    """``agree-report DIR`` writes the same report as ``directory=DIR`` (a missing folder: one line)."""
    with pytest.raises(SystemExit, match=str(tmp_path / "absent")):
        report_main([str(tmp_path / "absent")])
