"""`gptlab plan` against numbers worked out by hand for the gpt2-124m preset, and its bad-option errors."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.cli import main
from gptlab.config import ConfigError, load_params
from gptlab.plan import PlanError, count_model, format_plan, plan
from gptlab.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]  # presets are found relative to the project root

# GPT-2 124M, counted by hand (C = 768, T = 1024, 12 layers, biases on):
#   wte   50304*768                                  = 38,633,472   (50257 ids padded to a multiple of 64)
#   wpe   1024*768                                   =    786,432
#   per layer: ln_1 2*768                            =      1,536
#              c_attn 768*2304 + 2304                =  1,771,776
#              attn c_proj 768*768 + 768             =    590,592
#              ln_2 2*768                            =      1,536
#              c_fc 768*3072 + 3072                  =  2,362,368
#              mlp c_proj 3072*768 + 768             =  2,360,064
#              sum                                   =  7,087,872;  x 12 = 85,054,464
#   ln_f  2*768                                      =      1,536
#   total 38,633,472 + 786,432 + 85,054,464 + 1,536  = 124,475,904  (lm_head is tied to wte: counted once)
PARAMS_124M = 124_475_904
NON_EMBEDDING_124M = PARAMS_124M - 786_432  # = 123,689,472: without wpe
# the unpadded vocab: 47 fewer rows, 47*768 = 36,096 fewer: GPT-2's well-known 124.4M
PARAMS_124M_UNPADDED = 124_439_808
# 6 * 123,689,472 = 742,136,832 (matmuls, forward + backward) + 12*12*768*1024 = 113,246,208 (attention scores)
FLOPS_PER_TOKEN_124M = 855_383_040
TOKENS_PER_STEP = 524_288  # 2**19
TOTAL_TOKENS = 9_999_745_024  # 19,073 steps * 524,288 tokens
# activations at micro-batch 64: 12 layers * 34*64*1024*768 = 20,535,312,384 bytes
#                              + fp32 logits 4*64*1024*50304 = 13,186,891,776 bytes
ACTIVATIONS_B64 = 33_722_204_160


@pytest.fixture(scope="module")
def defaults_file(tmp_path_factory) -> Path:
    """A params file of documented defaults, so edits to the project's params.yaml cannot move the numbers."""
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text("seed: 1337\n")
    return path


@pytest.fixture(scope="module")
def gpt2_params(defaults_file):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # configs/presets/ is looked up from the project root
        return load_params(defaults_file, "gpt2-124m")


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_gpt2_124m_counts(gpt2_params, at_root):
    p = plan(gpt2_params, gpus=1)
    assert p["model"]["vocab_rows"] == 50304 and p["model"]["tokenizer_ids"] == 50257
    assert p["parameters"] == PARAMS_124M
    assert p["parameters_non_embedding"] == NON_EMBEDDING_124M == 123_689_472
    assert count_model(gpt2_params, 50257)[0] == PARAMS_124M_UNPADDED
    assert p["flops_per_token"] == FLOPS_PER_TOKEN_124M == 6 * NON_EMBEDDING_124M + 12 * 12 * 768 * 1024
    assert p["tokens_per_step"] == TOKENS_PER_STEP
    assert p["grad_accum_steps"] == 8  # 524,288 / (64 seqs * 1024 tokens * 1 GPU)
    assert p["steps"] == 19073
    assert p["total_tokens"] == TOTAL_TOKENS == 19073 * 524288


def test_gpt2_124m_memory(gpt2_params, at_root):
    ddp = plan(gpt2_params, gpus=8)["memory_per_gpu_bytes"]["ddp"]
    assert ddp["weights"] == ddp["grads"] == 4 * PARAMS_124M  # fp32: 497,903,616 bytes
    assert ddp["optimizer"] == 8 * PARAMS_124M  # AdamW's two fp32 moments
    assert ddp["weights"] + ddp["grads"] + ddp["optimizer"] == 16 * PARAMS_124M == 1_991_614_464
    assert ddp["activations"] == ACTIVATIONS_B64
    assert ddp["total"] == 1_991_614_464 + ACTIVATIONS_B64
    fsdp = plan(gpt2_params, gpus=8)["memory_per_gpu_bytes"]["fsdp"]
    assert fsdp["weights"] + fsdp["grads"] + fsdp["optimizer"] == 1_991_614_464 // 8 == 248_951_808
    assert fsdp["activations"] == ACTIVATIONS_B64  # sharding does not split a GPU's own micro-batch


def test_gpt2_124m_on_8_gpus(gpt2_params, at_root):
    p = plan(gpt2_params, gpus=8, peak_tflops=312.0, mfu=0.5)  # e.g. 8 A100s at 50% MFU
    assert p["grad_accum_steps"] == 1  # 524,288 / (64 * 1024 * 8)
    assert p["total_flops"] == FLOPS_PER_TOKEN_124M * TOTAL_TOKENS  # = 8.5536e18
    # 8.5536e18 FLOPs / (8 GPUs * 312e12 FLOP/s * 0.5) = 6,853.9 s = 1.904 h
    assert p["hours"] == pytest.approx(855_383_040 * 9_999_745_024 / (8 * 312e12 * 0.5) / 3600)
    assert p["hours"] == pytest.approx(1.9038, abs=1e-4)
    # 8 * 312e12 * 0.5 / 855,383,040 = 1,458,995 tokens/s
    assert p["tokens_per_second"] == pytest.approx(1_458_995.49)
    # the defaults: 989 TFLOP/s (H100 SXM dense bf16) at 40% MFU: 2,702.7 s
    assert plan(gpt2_params, gpus=8)["seconds"] == pytest.approx(2702.73, abs=0.01)


def test_micro_batch_override(gpt2_params, at_root):
    p = plan(gpt2_params, gpus=8, micro_batch_size=16)
    assert p["grad_accum_steps"] == 4  # 524,288 / (16 * 1024 * 8)
    assert p["memory_per_gpu_bytes"]["ddp"]["activations"] == ACTIVATIONS_B64 // 4  # linear in B
    with pytest.raises(ConfigError, match="tokens_per_step"):
        plan(gpt2_params, gpus=3)  # 524,288 is not a multiple of 64*1024*3


@pytest.mark.parametrize("kwargs, option", [({"gpus": 0}, "--gpus"), ({"peak_tflops": 0.0}, "--peak_tflops"),
                                            ({"mfu": 1.5}, "--mfu"), ({"mfu": 0.0}, "--mfu"),
                                            ({"micro_batch_size": 0}, "--micro_batch_size")])
def test_bad_assumptions_name_the_option(gpt2_params, kwargs, option):
    with pytest.raises(PlanError, match=f"^{option}:"):
        plan(gpt2_params, **kwargs)


def test_char_vocab_read_from_tokenizer_or_guessed(gpt2_params, tmp_path, at_root):
    params = dataclasses.replace(gpt2_params, tokenizer=dataclasses.replace(gpt2_params.tokenizer, kind="char"))
    guessed = plan(params, gpus=8, tokenizer_dir=tmp_path / "missing")
    assert guessed["model"]["tokenizer_ids"] == 256 and "UNKNOWN" in guessed["model"]["vocab_source"]
    assert "UNKNOWN" in format_plan(guessed)  # the text says the size is a guess
    tok = train_tokenizer(params.tokenizer, ["abc"])
    tok.save(tmp_path)
    built = plan(params, gpus=8, tokenizer_dir=tmp_path)
    assert built["model"]["tokenizer_ids"] == tok.n_vocab and built["model"]["vocab_rows"] == 64


def test_bpe_vocab_comes_from_params(defaults_file):
    p = plan(load_params(defaults_file), gpus=1)  # no preset: bpe with the default vocab_size 2048
    assert p["model"]["tokenizer_ids"] == p["model"]["vocab_rows"] == 2048


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab.cli", "plan", *args], check=False, capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_prints_the_plan():
    out = cli("--preset", "gpt2-124m", "--gpus", "8")
    assert out.returncode == 0, out.stderr
    assert "124,475,904" in out.stdout and "855,383,040" in out.stdout and "0.75 h" in out.stdout


@pytest.mark.parametrize("args, names", [(["--mfu", "2"], "--mfu"), (["--preset", "nosuch"], "nosuch")])
def test_cli_errors_are_one_line(args, names):
    out = cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], out.stderr


def test_cli_json(capsys, at_root):
    assert main(["plan", "--preset", "gpt2-124m", "--gpus", "8", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["parameters"] == PARAMS_124M and p["grad_accum_steps"] == 1
    assert main(["plan", "--gpus", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --gpus:")
