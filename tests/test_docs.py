"""The README and docs/ stay true: every relative link resolves, and every command shown in a fenced
block of the README parses (Hydra commands compose, key=value commands parse, make targets exist)."""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

from agree import cli, demo, pretrain, study
from agree.data import synthetic
from agree.prepare import __main__ as prepare
from agree.report.__main__ import ReportConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HYDRA = {
    "agree.train": "train",
    "agree-train": "train",
    "agree.evaluate": "evaluate",
    "agree-evaluate": "evaluate",
}
KEY_VALUE = {  # command -> its config dataclass
    "agree.demo": demo.DemoConfig,
    "agree-demo": demo.DemoConfig,
    "agree.study": study.StudyConfig,
    "agree-study": study.StudyConfig,
    "agree.report": ReportConfig,
    "agree-report": ReportConfig,
    "agree.pretrain": pretrain.PretrainCommand,
    "agree-pretrain": pretrain.PretrainCommand,
    "agree.data.synthetic": synthetic.GenerateConfig,
}


def relative_links(page: Path) -> list[str]:
    """The link targets of ``page`` that are paths in the repository (no URL, no bare anchor)."""
    targets = LINK.findall(page.read_text())
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def fenced_commands(page: Path) -> list[str]:
    """The shell commands of the fenced ``bash``/``sh``/``console`` blocks, continuations joined."""
    commands, block = [], None
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            block = line[3:].strip() in ("bash", "sh", "console", "shell") if block is None else None
            continue
        if block:
            text = line.strip().removeprefix("$ ")
            if commands and commands[-1].endswith("\\"):
                commands[-1] = commands[-1][:-1] + " " + text
            elif text and not text.startswith("#"):
                commands.append(text)
    return [re.sub(r"\s+#.*$", "", c) for c in commands]


def _program(words: list[str]) -> tuple[str, list[str]]:
    """(``agree.train``-style name, its arguments) of ``python -m X ...``, ``torchrun ... -m X ...``,
    ``srun python -m X``, ``agree-X ...``; environment assignments in front are skipped."""
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    if "-m" in words and words[0] in ("python", "python3", "torchrun", "srun"):
        i = words.index("-m")
        return words[i + 1], words[i + 2 :]
    return words[0], words[1:]


def _hydra_overrides(arguments: list[str]) -> list[str]:
    """The overrides of one job: ``-m`` dropped, each sweep (``a=1,2``, ``glob(*)``) at its first value."""
    parsed = OverridesParser.create().parse_overrides([a for a in arguments if a not in ("-m", "--multirun")])
    one_job = []
    for override in parsed:
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            one_job.append(f"{override.get_key_element()}={first}")
        else:
            one_job.append(override.input_line)
    return [o for o in one_job if not o.split("=")[0].lstrip("+~").startswith(("hydra.", "hydra/"))]


def check_command(command: str) -> None:
    """Raise if ``command`` would be refused for its arguments (it is not run)."""
    words = [w for w in shlex.split(command) if w != "..."]  # "..." stands for more of the same
    program, arguments = _program(words)
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert all(a in targets or "=" in a for a in arguments), f"{command}: no such make target"
    elif program in HYDRA:
        with initialize_config_module("agree.conf", version_base="1.3"):
            compose(HYDRA[program], _hydra_overrides(arguments))
    elif program in KEY_VALUE:
        cli.parse(program, KEY_VALUE[program], arguments)
    elif program in ("agree.prepare", "agree-prepare"):
        prepare.parse(arguments)
    elif program in ("python", "python3") and arguments and arguments[0].endswith(".py"):
        assert (REPO / arguments[0]).is_file(), f"{command}: no such script"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert missing == [], f"{page.name}: links to nothing: {missing}"


@pytest.mark.parametrize("command", fenced_commands(REPO / "README.md"))
def test_every_readme_command_parses(command):
    check_command(command)


def test_the_checks_can_fail(tmp_path):
    """A broken link, an unknown key, a missing make target and an unknown step are all caught."""
    page = tmp_path / "page.md"
    page.write_text("[a](missing.md) [b](https://example.org) [c](#anchor)\n```bash\nmake nope\n```\n")
    assert relative_links(page) == ["missing.md"] and fenced_commands(page) == ["make nope"]
    for bad in [
        "make nope",
        "python -m agree.train nope=1",
        "python -m agree.evaluate rerank=nope",
        "agree-report directory=x queries=many",
        "python -m agree.prepare nope",
    ]:
        with pytest.raises(Exception):  # noqa: B017  (each checker raises its own error type)
            check_command(bad)
    check_command("python -m agree.train -m +experiment=ablation 'drop_loss=clip,prompt' hydra.run.dir=x")
