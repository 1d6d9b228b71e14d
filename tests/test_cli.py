"""`gptlab generate` on a real checkpoint folder."""
import subprocess
import sys

import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.cli import generate_text, main
from gptlab.config import TokenizerConfig
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer


def make_checkpoint(tmp_path):
    torch.manual_seed(0)
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["Question: Answer abcdefgh\n"])
    save_checkpoint(tmp_path, GPT(GPTConfig(1, 2, 16, 64, tok.n_vocab)), {"stage": "t"}, tok)
    return tok


def test_generate_greedy_is_deterministic_and_sampling_is_seeded(tmp_path):
    make_checkpoint(tmp_path)
    greedy = [generate_text(str(tmp_path), "abc", 10, 0.0, 50, 0.9, seed=s) for s in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("abc")
    sampled = [generate_text(str(tmp_path), "abc", 20, 1.0, 0, 1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert generate_text(str(tmp_path), "abc", 5, 0.0, 50, 0.9, 0, question=True).startswith("Question: abc\nAnswer:")


def test_console_script_defaults_and_errors(tmp_path, capsys):
    make_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-m", "gptlab.cli", "generate", str(tmp_path), "--prompt", "ab",
                          "--max_tokens", "5", "--temperature", "0"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ab")
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "meta.json: not found" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x", "--temperature", "-1"]) == 2
