"""The `gptlab` command on hostile input: sizes that would allocate terabytes, a mistyped checkpoint folder,
quoted numbers in params, a broken jsonl line, a reader that closes the pipe early and a Ctrl-C while the command
is still importing. Each ends in one `error:` line that names the thing to fix (or, for a closed pipe, in
silence), never a traceback."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptlab import sampling
from gptlab.checkpoint import save_checkpoint
from gptlab.cli import PIPE_CLOSED, main
from gptlab.config import ConfigError, GptlabError, SFTData, SourceConfig, TokenizerConfig, load_params
from gptlab.data import records, sources
from gptlab.data.finetune import sft_sets
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer

TERA = "1000000000000"


def make_checkpoint(folder: Path, meta: dict | None = None) -> Path:
    torch.manual_seed(0)
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["Question: Answer abcdefgh\n"])
    save_checkpoint(folder, GPT(GPTConfig(1, 2, 16, 64, tok.n_vocab)), meta or {"stage": "t"}, tok)
    return folder


def error_line(capsys, argv: list[str]) -> str:
    """main's one stderr line for argv, which must fail as bad input (exit 2)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    return err.strip()


# --- 1. sizes that cannot be allocated are refused before anything is ------------------------------------------

def test_generate_refuses_a_max_tokens_beyond_the_limit_before_loading(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "ck")
    (ck / "model.safetensors").unlink()  # loading would fail on this: the option must be refused first
    err = error_line(capsys, ["generate", str(ck), "--prompt", "ab", "--max_tokens", TERA])
    assert err == f"error: --max_tokens: must be at most {sampling.MAX_TOKENS}, got {TERA}"


def test_generate_refuses_num_samples_that_cannot_fit_in_memory_before_loading(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    err = error_line(capsys, ["generate", str(ck), "--prompt", "ab", "--max_tokens", "10", "--num_samples", TERA])
    assert err.startswith(f"error: --num_samples: decoding {TERA} sequence(s) of 11 tokens needs about ")
    assert "GiB free; lower it" in err and err.endswith(f"got {TERA}")


def test_check_size_names_the_prompt_and_what_to_lower():
    config = GPTConfig(1, 2, 16, 64, 32)
    with pytest.raises(sampling.SamplingArgError) as e:  # prompt + new tokens past the limit
        sampling.check_size(config, 1, 10, sampling.MAX_TOKENS)
    assert e.value.arg == "max_new_tokens" and "(the prompt has 10)" in e.value.rule
    sampling.check_size(config, 4, 10, 100, torch.device("cpu"))  # small: fine
    with pytest.raises(sampling.SamplingArgError) as e:  # one row fits, 10**12 do not: fewer rows is the fix
        sampling.check_size(config, 10**12, 10, 100, torch.device("cpu"))
    assert e.value.arg == "rows" and e.value.value == 10**12
    deep = GPTConfig(10**9, 2, 16, 1024, 32)  # a KV cache of petabytes for a single row: shorter is the fix
    with pytest.raises(sampling.SamplingArgError) as e:
        sampling.check_size(deep, 1, 10, 1000, torch.device("cpu"))
    assert e.value.arg == "max_new_tokens" and "cpu has" in e.value.rule


def test_stream_checks_the_real_prompt_length_before_it_allocates():
    model = GPT(GPTConfig(1, 2, 16, 64, 32))
    steps = sampling.stream(model, [[1] * 10], sampling.Sampling(sampling.MAX_TOKENS))
    with pytest.raises(sampling.SamplingArgError, match="the prompt has 10"):
        next(steps)


# --- 2. a mistyped folder: what exists, not a stage that does not --------------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "checkpoints" / "pretrain")
    return tmp_path


@pytest.mark.parametrize("argv", [["generate", "checkpoints/nope", "--prompt", "a"], ["info", "checkpoints/nope"],
                                  ["export-hf", "checkpoints/nope", "out"]])
def test_a_missing_folder_lists_the_model_folders_beside_it(project, capsys, argv):
    err = error_line(capsys, argv)
    assert err.startswith("error: checkpoints/nope: not found; a model folder is a gptlab checkpoint")
    assert err.endswith("pass one that exists: checkpoints/pretrain") and "dvc repro" not in err
    assert not (project / "out").exists()


def test_a_missing_stage_folder_still_says_how_to_make_it(project, capsys):
    err = error_line(capsys, ["info", "checkpoints/sft"])
    assert err.startswith("error: checkpoints/sft: not found") and err.endswith("(dvc repro sft) or dvc pull")


def test_a_missing_folder_whose_parent_is_missing_says_so(project, capsys):
    err = error_line(capsys, ["info", "models/gpt2"])
    assert err.endswith("models does not exist either; check the path")


def test_a_damaged_folder_under_checkpoints_that_no_stage_makes_is_no_dvc_repro(project, capsys):
    mine = project / "checkpoints" / "mine"
    shutil.copytree(project / "checkpoints" / "pretrain", mine)
    shutil.rmtree(mine / "tokenizer")
    err = error_line(capsys, ["generate", "checkpoints/mine", "--prompt", "a"])
    assert err.startswith("error: checkpoints/mine/tokenizer: not found") and "dvc repro mine" not in err
    assert "dvc repro remakes only checkpoints/pretrain, checkpoints/sft, checkpoints/dpo" in err


# --- 3. a number as text: the fix for quotes is not the fix for 2e-4 --------------------------------------

def params_error(tmp_path: Path, lr: str) -> str:
    (tmp_path / "params.yaml").write_text(f"pretrain:\n  lr: {lr}\n")
    with pytest.raises(ConfigError) as e:
        load_params(tmp_path / "params.yaml")
    return str(e.value)


def test_a_quoted_number_is_told_to_lose_its_quotes(tmp_path):
    err = params_error(tmp_path, "'1.0'")
    assert err.endswith("pretrain.lr: expected a number, got the string '1.0' (the quotes make it text: write 1.0 "
                        "without quotes)")
    assert "decimal point" not in err


def test_an_exponent_without_a_decimal_point_is_told_how_yaml_reads_it(tmp_path):
    err = params_error(tmp_path, "2e-4")
    assert err.endswith("pretrain.lr: expected a number, got the string '2e-4' (YAML 1.1 reads an exponent as a "
                        "number only with a decimal point and a signed exponent: write 2.0e-4, without quotes)")
    assert "write 1.0e+5" in params_error(tmp_path, "1e5") and "quotes make" not in params_error(tmp_path, "1e5")
    assert params_error(tmp_path, "'inf'").endswith("(a finite number is needed here)")


# --- 4. a broken jsonl line is named by its line number ---------------------------------------------------

def jsonl_with_line_7(path: Path, line_7: str) -> Path:
    """Five good rows and a blank line (line 4), then line_7: a reader counting rows would say row 6."""
    good = json.dumps({"question": "q", "response": "r", "instruction": "i", "output": "o", "text": "t"})
    path.write_text("\n".join([good, good, good, "", good, good, line_7, good]) + "\n")
    return path


@pytest.mark.parametrize("line_7, needle", [('{"question": "q",', "not valid JSON"),
                                            ('{"question": "q"}', "field 'response' is missing")])
def test_records_name_the_file_and_line(tmp_path, line_7, needle):
    path = jsonl_with_line_7(tmp_path / "sft.jsonl", line_7)
    with pytest.raises(GptlabError, match=rf"^{re.escape(str(path))}:7: {needle}"):
        records.read_sft(path)


def test_mc_records_name_the_file_and_line(tmp_path):
    good = json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 0})
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join([good, "", "", good, good, good, json.dumps({"ctx": "c", "endings": ["a", "b"],
                                                                           "label": 2})]) + "\n")
    with pytest.raises(GptlabError, match=rf"^{re.escape(str(path))}:7: field 'label' is 2"):
        records.read_mc(path)


def test_finetune_files_name_the_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # sft.data.paths are relative to the project root
    (tmp_path / "finetune").mkdir()
    jsonl_with_line_7(tmp_path / "finetune" / "a.jsonl", '{"instruction": "i", "output": 3}')
    with pytest.raises(GptlabError, match=r"^finetune/a\.jsonl:7: field 'output'"):
        sft_sets(SFTData(format="alpaca", paths=("finetune/a.jsonl",), val_share=0.3), 0)


@pytest.mark.parametrize("line_7, needle", [('{"text": broken', "not a JSON object"),
                                            ('{"body": "t"}', "has no field 'text'"),
                                            ('{"text": null}', "field 'text' holds null")])
def test_pretraining_jsonl_sources_name_the_file_and_line(tmp_path, line_7, needle):
    jsonl_with_line_7(tmp_path / "corpus.jsonl", line_7)
    with pytest.raises(ConfigError, match=r"corpus\.jsonl:7\b") as e:
        list(sources.documents(0, SourceConfig(kind="files", paths=("corpus.jsonl",)), 0, tmp_path, None))
    assert needle in str(e.value) and "record" not in str(e.value)


# --- 5. a reader that stops early: no traceback -----------------------------------------------------------

def piped(command: str, cwd: Path) -> tuple[str, str, int]:
    """stdout, stderr and gptlab's exit status of `command | head -1` in bash."""
    script = f"set -o pipefail; {command} | head -1; echo \"gptlab status ${{PIPESTATUS[-2]}}\" >&2"
    out = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=120)
    status = int(out.stderr.strip().splitlines()[-1].split()[-1])
    return out.stdout, out.stderr, status


GPTLAB = f"{sys.executable} -m gptlab.cli"


def test_info_into_a_closed_pipe_ends_quietly(tmp_path):
    # params far larger than a pipe holds: head has gone before most of the text is written
    make_checkpoint(tmp_path / "ck", {"stage": "t", "params": {f"key{i}": "x" * 100 for i in range(20000)}})
    out, err, status = piped(f"{GPTLAB} info ck --params", tmp_path)
    assert out == "ck: a gptlab checkpoint\n"
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err
    assert status == PIPE_CLOSED


def test_generate_into_a_closed_pipe_ends_quietly(tmp_path):
    make_checkpoint(tmp_path / "ck")
    prompt = f"{sys.executable} -c \"print('ab\\n' * 100000, end='')\""  # 300 kB: more than a pipe holds
    out, err, status = piped(f"{prompt} | {GPTLAB} generate ck --max_tokens 3", tmp_path)
    assert out == "ab\n" and "Traceback" not in err and "Exception ignored" not in err, err
    assert status == PIPE_CLOSED


# --- 6. Ctrl-C while the command is still importing ---------------------------------------------------------

INTERRUPT_AT_IMPORT = textwrap.dedent("""
    import os, signal, sys

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as on a terminal, even if the test runs detached


    class CtrlC:  # presses Ctrl-C (a real SIGINT) the moment `module` is first imported
        def find_spec(self, name, path=None, target=None):
            if name == sys.argv[1]:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None


    sys.meta_path.insert(0, CtrlC())
    from gptlab.cli import main  # what the console script does
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("module", ["gptlab.config", "gptlab.plan", "torch"])
def test_ctrl_c_while_importing_is_one_line_and_130(tmp_path, module):
    # gptlab.config: while the console script imports gptlab.cli, before main runs; gptlab.plan: while main
    # builds its parser; torch: while the command loads its heavy modules
    make_checkpoint(tmp_path / "ck")
    out = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, module, "info", str(tmp_path / "ck")],
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr, out.stdout) == (130, "error: interrupted\n", "")
