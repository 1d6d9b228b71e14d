"""gptlab.export_hf: a checkpoint as a transformers GPT2LMHeadModel folder, and the refusals around it."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import CheckpointError, save_checkpoint
from gptlab.config import GptlabError, TokenizerConfig
from gptlab.export_hf import export_hf, hf_tokenizer_files, tiktoken_to_hf
from gptlab.fileio import FAULT_ENV
from gptlab.hf_gpt2 import load_hf_gpt2
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import EOT, GPT2_PATTERN, TiktokenTokenizer, gpt2_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VARIED = ["Hello world", " leading space and trailing  ", "numbers 12345 678 and 3.14159, 1e-5",
          "naïve café — 日本語のテキスト 🤖🎉 İstanbul ß", "tabs\tand\nnewlines\n\n    indented\r\n", "don't you'll WE'VE",
          "def f(x):\n    return {'a': [1, 2]}  # code", "!!!???...---", "   ", ""]
HF_WEIGHTS_FILES = {"config.json", "model.safetensors", "generation_config.json", "gptlab_meta.json", "README.md"}


def hf():
    return pytest.importorskip("transformers")


def make_checkpoint(folder: Path, tok, config: GPTConfig, seed: int = 0) -> GPT:
    """A checkpoint whose every parameter is random (biases and LayerNorms too, so none can go missing unseen)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    save_checkpoint(folder, model, {"stage": "pretrain", "step": 7}, tok)
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def random_ids(n_vocab: int, block_size: int) -> torch.Tensor:
    return torch.randint(0, n_vocab, (2, block_size), generator=torch.Generator().manual_seed(1))


def load_hf_model(out: Path):
    """GPT2LMHeadModel.from_pretrained(out), asserting transformers had nothing to warn about."""
    transformers = hf()
    logger = transformers.logging.get_logger()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        model, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert [r.getMessage() for r in records] == []
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, as in ours
    return model.eval()


def error(match: str, checkpoint, out, overwrite: bool = False, kind=GptlabError) -> str:
    with pytest.raises(kind) as e:
        export_hf(checkpoint, out, overwrite)
    text = str(e.value)
    assert "\n" not in text and match in text, text
    return text


# --- 1. GPT-2's tokenizer: weights, tokenizer and generation config all load in transformers ----------------

@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    tok = gpt2_tokenizer()
    model = make_checkpoint(root / "ckpt", tok, GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64,
                                                          vocab_size=50304))
    summary = export_hf(root / "ckpt", root / "out")
    return root / "ckpt", root / "out", model, tok, summary


def test_gpt2_export_loads_in_transformers_with_the_same_logits(gpt2_export):
    ckpt, out, model, tok, summary = gpt2_export
    ids = random_ids(tok.n_vocab, 64)
    diff = (logits(load_hf_model(out), ids) - logits(model, ids)).abs().max().item()
    assert diff < 1e-4

    files = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_WEIGHTS_FILES | files) == summary["files"]
    weights = (ckpt / "model.safetensors").read_bytes()
    assert summary == {"out_dir": str(out), "files": summary["files"], "tokenizer_exported": True,
                       "tokenizer_kind": "gpt2", "sha256": hashlib.sha256(weights).hexdigest()}
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "architectures", "n_positions", "n_ctx", "vocab_size",
                                   "bos_token_id", "eos_token_id", "tie_word_embeddings", "torch_dtype")} == {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": 64, "n_ctx": 64,
        "vocab_size": 50304, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
        "torch_dtype": "float32"}
    assert json.loads((out / "gptlab_meta.json").read_text()) == json.loads((ckpt / "meta.json").read_text())
    generation = hf().GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id,
            generation.max_length) == (50256, 50256, 50256, 64)


def test_gpt2_export_tokenizer_gives_gpt2_ids(gpt2_export):
    _, out, _, tok, _ = gpt2_export
    hf_tok = hf().AutoTokenizer.from_pretrained(out)
    assert hf_tok("Hello world")["input_ids"] == [15496, 995]
    for text in VARIED:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.model_max_length) == (50256, 50256, 64)


# --- 3. round trip through gptlab's own importer ---------------------------------------------------------------

def test_round_trip_through_load_hf_gpt2(gpt2_export):
    ckpt, out, model, tok, _ = gpt2_export
    back, meta, back_tok = load_hf_gpt2(out)  # checks config.json, vocab.json and merges.txt against GPT-2's
    ids = random_ids(tok.n_vocab, 64)
    assert torch.equal(logits(back.eval(), ids), logits(model, ids))
    assert meta["model"] == json.loads((ckpt / "meta.json").read_text())["model"]
    assert back_tok.fingerprint == tok.fingerprint


# --- 2. tokenizers transformers has no copy of -----------------------------------------------------------------

def test_char_checkpoint_exports_weights_and_a_note_but_no_tokenizer(tmp_path):
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["Question: Answer abcdefgh\n"])
    # bias=False: GPT-2 always has biases, so the export adds zero ones, which compute the same
    model = make_checkpoint(tmp_path / "ckpt", tok, GPTConfig(2, 2, 16, 32, 64, bias=False, dropout=0.1))
    summary = export_hf(tmp_path / "ckpt", tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_WEIGHTS_FILES) == summary["files"]
    assert not summary["tokenizer_exported"] and summary["tokenizer_kind"] == "char"
    note = (out / "README.md").read_text()
    assert "not included" in note and f"load_tokenizer(\"{tmp_path / 'ckpt'}/tokenizer\")" in note
    assert "tokenizer.kind: gpt2" in note
    ids = random_ids(tok.n_vocab, 32)
    assert (logits(load_hf_model(out), ids) - logits(model, ids)).abs().max().item() < 1e-4
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eot_id == 21


def bpe_texts() -> tuple[str, list[str]]:
    """Training text (this project's code and docs) and varied held-out strings: other prose and code, the
    VARIED cases, and random strings over a pool of scripts, digits, whitespace, apostrophes and emoji."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    train = "".join(p.read_text() for p in [*docs, *sorted((ROOT / "src/gptlab").glob("*.py"))])
    held_out = "".join(p.read_text() for p in sorted((ROOT / "tests").glob("test_*.py"))[:8])
    rng = random.Random(0)
    samples = [held_out[i:i + rng.randrange(1, 300)] for i in rng.sample(range(len(held_out)), 300)]
    pool = "ab Zz \n\t\r  '’sSlLtve1234567890.,!?-_(){}éüñ日本語テ🤖🎉\u0301\u00a0ßİКириллица"
    samples += ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 80))) for _ in range(300)]
    return train[:150_000], [s for s in samples + VARIED if EOT not in s]


def test_bpe_checkpoint_exports_a_tokenizer_json_with_gptlabs_exact_ids(tmp_path):
    transformers = hf()
    train, samples = bpe_texts()
    tok = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=1000), [train])
    model = make_checkpoint(tmp_path / "ckpt", tok, GPTConfig(1, 2, 16, 32, 1024))
    summary = export_hf(tmp_path / "ckpt", tmp_path / "out")
    out = tmp_path / "out"
    assert summary["tokenizer_exported"] and summary["tokenizer_kind"] == "bpe"
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} < set(summary["files"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.eos_token_id, hf_tok.model_max_length) == (tok.eot_id, 32)
    got = hf_tok(samples, add_special_tokens=False)["input_ids"]
    wrong = [s for s, ids in zip(samples, got) if ids != tok.encode(s)]
    assert not wrong, f"{len(wrong)} of {len(samples)} differ, e.g. {wrong[0]!r}"
    for s in samples[::10]:
        assert hf_tok.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    ids = random_ids(tok.n_vocab, 32)
    assert (logits(load_hf_model(out), ids) - logits(model, ids)).abs().max().item() < 1e-4


def test_ranks_that_are_no_bpe_give_no_tokenizer():
    ranks = {bytes([b]): b for b in range(256)} | {b"abc": 256}  # "abc" is no merge of two lower tokens
    tok = TiktokenTokenizer("bpe", GPT2_PATTERN, ranks)
    assert tiktoken_to_hf(tok) is None and hf_tokenizer_files(tok, 64) == {}


# --- 4. refusals ----------------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path) -> Path:
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abc\n"])
    make_checkpoint(tmp_path / "ckpt", tok, GPTConfig(1, 2, 16, 16, 64))
    return tmp_path / "ckpt"


def test_missing_or_non_checkpoint_source_is_named(tmp_path):
    missing = tmp_path / "missing"
    error(f"{missing}: not found; a model folder is a gptlab checkpoint", missing, tmp_path / "out",
          kind=CheckpointError)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hi")
    error(f"{plain}: holds neither meta.json", plain, tmp_path / "out", kind=CheckpointError)
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_is_kept_unless_overwrite(small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    error(f"{out}: exists and is not empty; pass --overwrite", small, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces an earlier export only: a folder of the user's is never deleted (it once was: `src`)
    error(f"{out}: is not an earlier export (it has keep.txt), so --overwrite will not replace it", small, out,
          overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_hf(small, out)
    (out / "README.md").write_text("edited")  # an earlier export, edited: still one
    export_hf(small, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_WEIGHTS_FILES)
    assert (out / "README.md").read_text() != "edited"
    (out / "gptlab_meta.json").unlink()  # export-like names without the provenance file: not recognisably ours
    error(f"{out}: is not an earlier export (it has no gptlab_meta.json)", small, out, overwrite=True)
    (out / "data").mkdir()
    error(f"{out}: is not an earlier export (it has data)", small, out, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(small, empty)  # an empty folder is no one's work: no --overwrite needed
    assert sorted(p.name for p in empty.iterdir()) == sorted(HF_WEIGHTS_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_out_dir_may_not_be_the_checkpoint_or_inside_it(small, tmp_path):
    error("is the checkpoint", small, small, overwrite=True)
    error("inside or around the checkpoint", small, small / "hf")
    error("inside or around the checkpoint", small, tmp_path, overwrite=True)
    (tmp_path / "file").write_text("x")
    error("exists and is not a folder", small, tmp_path / "file", overwrite=True)
    assert (small / "meta.json").is_file() and not (small / "hf").exists()


def test_damaged_weights_are_refused_naming_the_file(small, tmp_path):
    path = small / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.unlink()  # never write through a file DVC may have linked
    path.write_bytes(bytes(data))
    error(f"{path}: SHA-256", small, tmp_path / "out", kind=CheckpointError)
    assert not (tmp_path / "out").exists()


def test_a_killed_exports_temp_folder_is_cleared(small, tmp_path):
    dead = tmp_path / ".out.tmp-999999999"  # no process can have that id
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    export_hf(small, tmp_path / "out")
    assert not dead.exists() and (tmp_path / "out" / "config.json").is_file()
    export_hf(small, tmp_path / "new" / "parents" / "out")  # missing parent folders are made
    assert (tmp_path / "new" / "parents" / "out" / "model.safetensors").is_file()


def test_an_export_killed_at_any_step_leaves_the_old_or_the_new_folder(small, tmp_path):
    """SIGKILL after each write step (the FAULT_ENV hook, in a forked child): OUT_DIR holds the old folder or the
    new export, whole, or (between two renames) nothing, the old one aside; the next export clears up."""
    export_hf(small, tmp_path / "ref")
    new = folder_bytes(tmp_path / "ref")
    base = tmp_path / "base"
    (base / "out").mkdir(parents=True)
    (base / "out" / "gptlab_meta.json").write_text("old")  # an earlier export's provenance: replaceable
    for k in itertools.count():
        run = tmp_path / f"k{k}"
        shutil.copytree(base, run)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ[FAULT_ENV] = str(k)
                export_hf(small, run / "out", overwrite=True)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        now = folder_bytes(run / "out") if (run / "out").exists() else None
        assert now in ({"gptlab_meta.json": b"old"}, new) or (now is None and len(list(run.glob(".out.old-*"))) == 1), k
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0 and [p.name for p in run.iterdir()] == ["out"]
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        export_hf(small, run / "out", overwrite=True)
        assert folder_bytes(run / "out") == new and [p.name for p in run.iterdir()] == ["out"]
    assert k >= len(new) + 4  # the hook counted every file written


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_command_line_exports_and_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    ckpt = tmp_path / "ck"
    _cli_checkpoint(ckpt)
    run = [sys.executable, "-m", "gptlab.cli", "export-hf", str(ckpt), str(tmp_path / "out")]
    ok = subprocess.run(run, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith(f"wrote {tmp_path / 'out'}") and "model.safetensors" in ok.stdout
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def _cli_checkpoint(path):
    import torch

    from gptlab.checkpoint import save_checkpoint
    from gptlab.model import GPT, GPTConfig
    from gptlab.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    save_checkpoint(path, GPT(GPTConfig(1, 2, 16, 32, 50304)), {"stage": "t"}, gpt2_tokenizer())
