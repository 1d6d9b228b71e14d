"""`gptlab generate` on a real checkpoint folder, and on damaged ones and bad options."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptlab import cli
from gptlab.checkpoint import save_checkpoint
from gptlab.cli import generate_text, main
from gptlab.config import TokenizerConfig
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer


def make_checkpoint(tmp_path, meta=None):
    torch.manual_seed(0)
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["Question: Answer abcdefgh\n"])
    save_checkpoint(tmp_path, GPT(GPTConfig(1, 2, 16, 64, tok.n_vocab)), meta or {"stage": "t"}, tok)
    return tok


def test_generate_greedy_is_deterministic_and_sampling_is_seeded(tmp_path):
    make_checkpoint(tmp_path)
    greedy = [generate_text(str(tmp_path), "abc", 10, 0.0, 50, 0.9, seed=s) for s in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("abc")
    sampled = [generate_text(str(tmp_path), "abc", 20, 1.0, 0, 1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    # --chat needs the template the checkpoint was fine-tuned with; a pretrained one has none
    with pytest.raises(cli.UsageError, match="--chat: .* names no template"):
        generate_text(str(tmp_path), "abc", 5, 0.0, 50, 0.9, 0, chat=True)


def test_chat_renders_the_prompt_in_the_checkpoints_template(tmp_path):
    make_checkpoint(tmp_path, {"stage": "sft", "template": "question"})
    assert generate_text(str(tmp_path), "abc", 5, 0.0, 50, 0.9, 0, chat=True).startswith("Question: abc\nAnswer:")


def test_console_script_defaults_and_errors(tmp_path, capsys):
    make_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-m", "gptlab.cli", "generate", str(tmp_path), "--prompt", "ab",
                          "--max_tokens", "5", "--temperature", "0"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ab")
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "meta.json: not found" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x", "--temperature", "-1"]) == 2


# --- bad input: one `error:` line, exit 2, never a traceback ---------------------------------------------

def truncate_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    replace(folder / "model.safetensors", data[: len(data) // 2])


def edit_meta(change) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        change(meta)
        replace(folder / "meta.json", json.dumps(meta).encode())
    return damage


def nan_weights(folder: Path) -> None:
    tok = make_checkpoint(folder)
    model = GPT(GPTConfig(1, 2, 16, 64, tok.n_vocab))
    for p in model.parameters():
        p.data.fill_(float("nan"))
    save_checkpoint(folder, model, {"stage": "t"}, tok)


def replace(path: Path, data: bytes) -> None:
    path.unlink()  # never write through a file DVC may have linked from its cache
    path.write_bytes(data)


CONSOLE_CASES = {  # name: (damage to a fresh checkpoint folder, extra options, what the line must name)
    "truncated-weights": (truncate_weights, [], "model.safetensors"),
    "meta-not-json": (lambda f: replace(f / "meta.json", b"{"), [], "meta.json"),
    "unknown-model-key": (edit_meta(lambda m: m["model"].update(foo=1)), [], "'foo'"),
    "nan-weights": (nan_weights, [], "NaN"),
    "not-a-checkpoint": (lambda f: (f / "meta.json").unlink(), [], "not a checkpoint folder"),
    "missing-tokenizer": (lambda f: shutil.rmtree(f / "tokenizer"), [], "tokenizer"),
    "temperature-nan": (lambda f: None, ["--temperature", "nan"], "--temperature"),
}


@pytest.fixture(scope="module")
def console_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case through the real console path, `python -m gptlab.cli generate`, all at once: each process
    spends seconds importing torch, and two cores can do that in parallel."""
    root = tmp_path_factory.mktemp("console")
    procs = {}
    for name, (damage, options, _) in CONSOLE_CASES.items():
        folder = root / name
        make_checkpoint(folder)
        damage(folder)
        cmd = [sys.executable, "-m", "gptlab.cli", "generate", str(folder), "--prompt", "ab", *options]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[name] = (folder, cmd, proc)
    runs = {}
    for name, (folder, cmd, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        runs[name] = (folder, subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return runs


@pytest.mark.parametrize("name", CONSOLE_CASES)
def test_console_refuses_bad_input_with_one_line(console_runs, name):
    folder, run = console_runs[name]
    needle = CONSOLE_CASES[name][2]
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert needle in lines[0]
    if not needle.startswith("--"):
        assert str(folder) in lines[0]


@pytest.mark.parametrize("option, value", [
    ("--temperature", "inf"), ("--temperature", "-0.5"), ("--temperature", "1e-300"), ("--top_p", "0"),
    ("--top_p", "nan"), ("--top_p", "1.5"), ("--top_k", "-1"), ("--max_tokens", "-1"), ("--seed", "-1"),
])
def test_bad_options_are_refused_before_anything_is_loaded(tmp_path, capsys, option, value):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x", option, value]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}: ") and value in lines[0], lines


def test_a_prompt_the_tokenizer_cannot_encode_is_one_line(tmp_path, capsys):
    make_checkpoint(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "abZ"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --prompt: ") and "'Z'" in lines[0], lines


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate_text", interrupted)
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_programming_error_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "generate_text", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", str(tmp_path), "--prompt", "x"])
