"""The README's facts and commands are true: the people it names exist, its numbers match params.yaml, its
set-up commands are the ones CI runs, and its `gptlab generate` commands run on a real checkpoint."""
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
# the Sampling section's commands run on the embedded default (others need a GPT-2 run and the network)
SAMPLING = README.split("## Sampling")[1].split("\n## ")[0]
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
    counts = {int(n) for n in re.findall(r"\b(\d+) people\b", README)}
    assert counts == {Params().data.world.n_people}


def test_the_cpu_torch_note_comes_before_the_install_commands():
    assert README.index("download.pytorch.org/whl/cpu") < README.index("pip install -r requirements.txt")


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in README.splitlines() if line.endswith("&& python -m pytest"))
    for step in command.split(" && ")[2:]:  # after creating and activating the environment
        assert step.replace("pip install", "pip install -q") in ci or step in ci, step


@pytest.mark.slow
@pytest.mark.parametrize("command", GENERATE)
def test_the_readme_generate_commands_run(tiny_project, command):
    out = sh(command, tiny_project)
    assert out.stdout.startswith(prompt_of(command)) or out.stdout.startswith("Question: " + prompt_of(command))
