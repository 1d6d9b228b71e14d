"""The README's and docs' facts and commands are true: the people they name exist, their numbers match
params.yaml, the README's set-up commands are the ones CI runs, and the `gptlab generate` commands of
docs/03-fine-tuning.md run on a real checkpoint."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import sh

from gptlab.config import Params
from gptlab.data.world import build_world

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
# the Sampling section's commands run on the embedded default (others need a GPT-2 run and the network)
SAMPLING = DOCS["03-fine-tuning.md"].split("\n## Sampling\n")[1].split("\n## ")[0]
TEST_COMMAND = "python -m pytest -n auto --durations=25"
GENERATE = [line.strip() for line in SAMPLING.splitlines() if line.strip().startswith("gptlab generate ")]


def prompt_of(command: str) -> str:
    args = shlex.split(command)
    return args[args.index("--prompt") + 1]


def test_the_people_the_readme_names_exist_in_the_default_world():
    params = Params()
    names = {name for name, _ in build_world(params.data.world, params.seed).people}
    assert GENERATE
    for command in GENERATE:
        named = re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", prompt_of(command))
        assert named and all(n in names for n in named), command


def test_the_readme_people_count_is_params_yaml_s():
    counts = {int(n) for text in [README, *DOCS.values()] for n in re.findall(r"\b(\d+) people\b", text)}
    assert counts == {Params().data.world.n_people}


def test_the_cpu_torch_note_comes_before_the_install_commands():
    assert README.index("download.pytorch.org/whl/cpu") < README.index("pip install -r requirements.txt")


def set_up_commands(last_step: str) -> tuple[str, str]:
    """The README's set-up command that ends in `last_step`, and its CPU-only variant."""
    lines = [line for line in README.splitlines() if line.startswith("python3 -m venv .venv && ")
             and line.endswith(f" && {last_step}")]
    plain = [line for line in lines if "whl/cpu" not in line]
    cpu = [line for line in lines if "whl/cpu" in line]
    assert len(plain) == 1 and len(cpu) == 1, lines
    return plain[0], cpu[0]


@pytest.mark.parametrize("last_step", ["dvc repro", TEST_COMMAND])
def test_each_set_up_command_has_a_cpu_only_variant_that_installs_cpu_torch_first(last_step):
    plain, cpu = set_up_commands(last_step)
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    torch_pin = next(line.split("#")[0].strip() for line in requirements if line.startswith("torch=="))
    activate = ". .venv/bin/activate && "
    cpu_step = f"pip install {torch_pin} --index-url https://download.pytorch.org/whl/cpu && "
    assert cpu == plain.replace(activate, activate + cpu_step)


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command, _cpu = set_up_commands(TEST_COMMAND)
    for step in command.split(" && ")[2:]:  # after creating and activating the environment
        assert step.replace("pip install", "pip install -q") in ci or step in ci, step
    assert TEST_COMMAND in ci.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("command", GENERATE)
def test_the_readme_generate_commands_run(tiny_project, command):
    out = sh(command, tiny_project)
    assert out.stdout.startswith(prompt_of(command)) or out.stdout.startswith("Question: " + prompt_of(command))
