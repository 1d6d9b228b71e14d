"""`gptlab generate` on a real checkpoint folder (streaming, stop strings, samples, stdin, a chat), and on damaged
ones and bad options."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptlab import cli, sampling
from gptlab.checkpoint import save_checkpoint
from gptlab.cli import Continuation, chat_prompt, generate_text, main
from gptlab.config import TokenizerConfig
from gptlab.data.formats import Message
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
    assert f"{tmp_path / 'missing'}: not found; a model folder is a gptlab checkpoint" in capsys.readouterr().err
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
    "not-a-checkpoint": (lambda f: (f / "meta.json").unlink(), [], "holds neither meta.json"),
    "missing-tokenizer": (lambda f: shutil.rmtree(f / "tokenizer"), [], "tokenizer"),
    "temperature-nan": (lambda f: None, ["--temperature", "nan"], "--temperature"),
    "tokenizer-fingerprint": (edit_meta(lambda m: m["tokenizer"].update(fingerprint="0" * 16)), [], "fingerprint"),
    "tokenizer-beyond-vocab": (edit_meta(lambda m: m["model"].update(vocab_size=4)), [], "the model has only 4"),
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
    ("--repetition_penalty", "0"), ("--repetition_penalty", "nan"), ("--repetition_penalty", "-2"),
    ("--num_samples", "0"), ("--stop", ""),
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


# --- streaming, stop strings, samples, stdin, chat ------------------------------------------------------------

def test_greedy_is_the_same_with_and_without_the_cache(tmp_path):
    make_checkpoint(tmp_path)
    runs = [generate_text(str(tmp_path), "abc", 80, 0.0, 50, 0.9, 0, use_cache=c) for c in (True, False)]
    assert runs[0] == runs[1]  # 80 new tokens: past the 64-token block


def test_the_text_streams_out_piece_by_piece(tmp_path):
    make_checkpoint(tmp_path)
    pieces = []
    out = generate_text(str(tmp_path), "abc", 20, 1.0, 0, 1.0, 3, write=pieces.append)
    assert "".join(pieces) == out and pieces[0] == "abc" and len([p for p in pieces if p]) > 3


def test_stop_strings_end_a_sample_and_are_cut(tmp_path):
    make_checkpoint(tmp_path)
    full = generate_text(str(tmp_path), "abc", 40, 1.0, 0, 1.0, 5)[3:]
    stop = full[10:12]
    cut = full[: full.index(stop)]
    pieces = []
    assert generate_text(str(tmp_path), "abc", 40, 1.0, 0, 1.0, 5, stop=("zzz", stop), write=pieces.append) == "abc" + cut
    assert "".join(pieces) == "abc" + cut


def test_num_samples_are_different_and_reproducible(tmp_path, capsys):
    make_checkpoint(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "ab", "--num_samples", "3", "--temperature", "1",
                 "--top_k", "0", "--top_p", "1", "--max_tokens", "20", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert generate_text(str(tmp_path), "ab", 20, 1.0, 0, 1.0, 4, num_samples=3) + "\n" == out
    blocks = out.split("--- sample ")[1:]
    assert [b.split(" ---\n")[0] for b in blocks] == ["1", "2", "3"]
    samples = {b.split(" ---\n", 1)[1].rstrip("\n") for b in blocks}
    assert len(samples) == 3 and all(s.startswith("ab") for s in samples)


def test_the_prompt_can_come_on_stdin(tmp_path, capsys, monkeypatch):
    make_checkpoint(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("abc\n"))
    assert main(["generate", str(tmp_path), "--max_tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == generate_text(str(tmp_path), "abc", 8, 0.0, 50, 0.9, 0) + "\n"


class Terminal(io.StringIO):
    """Typed lines, as stdin on a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_chat_goes_turn_by_turn_in_the_template(tmp_path, capsys, monkeypatch):
    tok = make_checkpoint(tmp_path, {"stage": "sft", "template": "question"})
    prompts = []
    real_stream = sampling.stream

    def recording(model, rows, *args, **kwargs):
        prompts.append(rows[0])
        return real_stream(model, rows, *args, **kwargs)

    monkeypatch.setattr(sampling, "stream", recording)
    monkeypatch.setattr("sys.stdin", Terminal("abc\nZZ\nbad\n\nnever read\n"))
    assert main(["generate", str(tmp_path), "--chat", "--temperature", "0", "--max_tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert len(prompts) == 2  # "ZZ" cannot be encoded: refused, and the talk goes on; the empty line ends it
    assert err.startswith("error: char tokenizer: character 'Z'") and len(err.splitlines()) == 1
    first = tok.decode(prompts[0])
    assert first == "Question: abc\nAnswer:"
    answer = out.split("> ")[1].removesuffix("\n")
    assert answer and out == f"> {answer}\n> > {out.split('> ')[3]}> \n"
    said = (Message("user", "abc"), Message("assistant", answer), Message("user", "bad"))
    ids, text = chat_prompt(tok, "question", said)
    assert prompts[1] == ids and text.startswith(first + answer) and text.endswith("Question: bad\nAnswer:")


def test_no_prompt_on_a_terminal_needs_chat(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", Terminal(""))
    assert main(["generate", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --prompt: give the prompt")
    assert main(["generate", str(tmp_path), "--chat", "--num_samples", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --num_samples: ")


class ByteTokenizer:
    """One id per UTF-8 byte, as a BPE tokenizer may split a character."""

    eot_id = 256

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_streaming_never_splits_a_character_or_shows_a_stop_string():
    row = Continuation(ByteTokenizer(), ("\n\n",))
    pieces = []
    for b in "aé€\nb\n\nc".encode():
        row.add(b)
        pieces.append(row.fresh())
        if row.done:
            break
    assert "".join(pieces) == row.text == "aé€\nb" and "\ufffd" not in "".join(pieces)
    assert pieces[:6] == ["a", "", "é", "", "", "€"]  # the held-back newline comes out with the "b" after it
    assert "\nb" in pieces
