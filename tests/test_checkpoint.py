"""Checkpoint folders: a save killed at any filesystem step leaves the old or the new checkpoint, whole, and
the next save clears up after it, while a load only reads (it refuses a folder a killed save moved aside); a
damaged folder is one CheckpointError naming it and the fix."""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptlab import fileio
from gptlab.checkpoint import (
    META_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_tokenizer,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from gptlab.config import TokenizerConfig
from gptlab.fileio import FAULT_ENV, recover
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer

TOK = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
CONFIG = GPTConfig(1, 2, 16, 64, TOK.n_vocab)


def tiny(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG)


def save(folder: Path, seed: int) -> GPT:
    model = tiny(seed)
    save_checkpoint(folder, model, {"stage": f"seed{seed}"}, TOK)
    return model


def holds(folder: Path) -> int | None:
    """The seed of the model the checkpoint at `folder` holds, None if it has none; fails on anything else."""
    try:
        model, meta = load_checkpoint(folder)
    except CheckpointError as e:
        assert "meta.json: not found" in str(e) and "interrupted" not in str(e), e
        return None
    seed = int(meta["stage"].removeprefix("seed"))
    expected = tiny(seed).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()), "weights of another save"
    return seed


def holds_after_recovery(folder: Path) -> int | None:
    """What a kill left, seen by a reader and then by the next save: a load changes nothing on disk (it
    loads the old or the new checkpoint, or refuses one moved aside, saying so); then, on a copy of the parent
    folder (so the next save still meets whatever the kill left), the clearing up every save starts with
    (fileio.recover) leaves a tidy folder holding the old or the new checkpoint. Returns its seed, or None."""
    before = tree(folder.parent)
    try:
        holds(folder)
    except AssertionError as e:  # holds() met the refusal of a folder moved aside
        assert "was interrupted" in str(e) and f"dvc repro {folder.name}" in str(e), e
    assert tree(folder.parent) == before  # reading never writes
    copy = folder.parent.with_name(folder.parent.name + "-copy")
    shutil.copytree(folder.parent, copy, symlinks=True)
    try:
        recover(copy / folder.name)
        seed = holds(copy / folder.name)
        assert siblings(copy) <= {folder.name}
        return seed
    finally:
        shutil.rmtree(copy)


def siblings(parent: Path) -> set[str]:
    return {p.name for p in parent.iterdir()}


def tree(parent: Path) -> dict[str, bytes | None]:
    """Every path below `parent` and its bytes (None for a folder)."""
    return {str(p.relative_to(parent)): None if p.is_dir() else p.read_bytes() for p in parent.rglob("*")}


def save_killed_after(k: int, folder: Path, seed: int) -> bool:
    """Save in a child process that SIGKILLs itself after its k-th filesystem step (the FAULT_ENV hook);
    True if the save finished first. A fork, not a fresh interpreter: importing torch would take seconds."""
    model = tiny(seed)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ[FAULT_ENV] = str(k)
            save_checkpoint(folder, model, {"stage": f"seed{seed}"}, TOK)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return False
    assert os.WEXITSTATUS(status) == 0
    return True


@pytest.fixture(params=["exchange", "renames"])
def swap(request, monkeypatch) -> str:
    """Both ways a save swaps its folder in: renameat2's exchange, and the two renames used without it."""
    if request.param == "renames":
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    elif fileio._renameat2() is None:
        pytest.skip("no renameat2 here")
    return request.param


# --- a save is atomic ---------------------------------------------------------------------------------

def test_round_trip_records_the_weights_checksum(tmp_path):
    model = save(tmp_path / "ck", 1)
    meta = read_meta(tmp_path / "ck")
    data = (tmp_path / "ck" / WEIGHTS_FILE).read_bytes()
    assert meta["weights"]["bytes"] == len(data) and len(meta["weights"]["sha256"]) == 64
    assert meta["model"] == CONFIG.__dict__ and meta["stage"] == "seed1"
    again, _ = load_checkpoint(tmp_path / "ck")
    assert again.lm_head.weight is again.transformer.wte.weight
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert checkpoint_tokenizer(tmp_path / "ck").fingerprint == TOK.fingerprint


@pytest.mark.parametrize("had_old", [True, False], ids=["replacing", "first-save"])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, swap, had_old):
    base = tmp_path / "base"
    base.mkdir()
    if had_old:
        save(base / "ck", 1)
    for k in itertools.count():
        run = tmp_path / f"k{k}"
        shutil.copytree(base, run)
        finished = save_killed_after(k, run / "ck", 2)
        assert holds_after_recovery(run / "ck") in ({1, 2} if had_old else {None, 2}), k
        if finished:
            assert siblings(run) == {"ck"}
            break
        save(run / "ck", 3)  # the next save clears up after the killed one
        assert siblings(run) == {"ck"} and holds(run / "ck") == 3
        shutil.rmtree(run)
    assert k >= 7  # the hook really counted the steps: make, 3 files, fsync, rename(s), fsync, and any delete


def test_kills_while_clearing_up_after_earlier_kills(tmp_path, swap):
    """Kill saves one after another in one folder, so later ones die while recovering from earlier ones."""
    folder = tmp_path / "p" / "ck"
    save(folder, 0)
    current = 0
    for i, k in enumerate([*range(14), *range(0, 14, 3), *range(14)]):
        target = i + 1
        save_killed_after(k, folder, target)
        now = holds_after_recovery(folder)
        assert now in (current, target), (k, now)
        current = now
    save(folder, 99)
    assert siblings(folder.parent) == {"ck"} and holds(folder) == 99


def test_load_refuses_a_checkpoint_a_killed_save_moved_aside_and_the_next_save_puts_it_back(tmp_path):
    save(tmp_path / "ck", 1)
    dead = dead_pid()
    os.rename(tmp_path / "ck", tmp_path / f".ck.old-{dead}")
    (tmp_path / f".ck.tmp-{dead}").mkdir()  # the new one, half written
    before = tree(tmp_path)
    for reader in (load_checkpoint, read_meta, checkpoint_tokenizer):
        with pytest.raises(CheckpointError) as e:
            reader(tmp_path / "ck")
        message = str(e.value)
        assert message.startswith(f"{tmp_path / 'ck' / META_FILE}: not found; a save of {tmp_path / 'ck'} was "
                                  f"interrupted") and f".ck.old-{dead}" in message and "\n" not in message
        assert "dvc repro ck" in message  # the fix: rerun the stage, whose save clears it up
    assert tree(tmp_path) == before  # reading never writes
    recover(tmp_path / "ck")  # what the next save of the folder starts with
    assert holds(tmp_path / "ck") == 1 and siblings(tmp_path) == {"ck"}


def test_a_half_deleted_folder_is_never_put_back(tmp_path):
    save(tmp_path / "ck", 1)
    dead = dead_pid()
    os.rename(tmp_path / "ck", tmp_path / f".ck.del-{dead}")  # a folder is renamed .del before it is deleted
    (tmp_path / f".ck.del-{dead}" / META_FILE).unlink()
    assert holds(tmp_path / "ck") is None
    save(tmp_path / "ck", 2)
    assert siblings(tmp_path) == {"ck"} and holds(tmp_path / "ck") == 2


def test_a_live_writer_s_temp_folder_is_left_alone(tmp_path):
    save(tmp_path / "ck", 1)
    live = f".ck.tmp-{os.getppid()}"
    (tmp_path / live).mkdir()
    (tmp_path / ".ck.tmp-notapid").mkdir()  # not a name gptlab writes: not ours to delete
    save(tmp_path / "ck", 2)
    assert siblings(tmp_path) == {"ck", live, ".ck.tmp-notapid"} and holds(tmp_path / "ck") == 2


def test_files_dvc_linked_from_its_cache_are_replaced_never_written_through(tmp_path, swap):
    save(tmp_path / "ck", 1)
    cache = tmp_path / "cache"
    cache.mkdir()
    for f in (tmp_path / "ck").rglob("*"):
        if f.is_file():
            os.link(f, cache / f.name)
            f.chmod(0o444)
    before = {f.name: f.read_bytes() for f in cache.iterdir()}
    save(tmp_path / "ck", 2)
    assert {f.name: f.read_bytes() for f in cache.iterdir()} == before
    assert holds(tmp_path / "ck") == 2 and siblings(tmp_path) == {"ck", "cache"}


def test_an_error_during_a_save_leaves_the_old_checkpoint_and_no_temp_folder(tmp_path, monkeypatch):
    save(tmp_path / "ck", 1)

    def fail(directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TOK, "save", fail)
    with pytest.raises(OSError, match="No space"):
        save(tmp_path / "ck", 2)
    assert siblings(tmp_path) == {"ck"} and holds(tmp_path / "ck") == 1


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- a damaged folder is refused with one line --------------------------------------------------------

def edit_meta(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text())
        change(meta)
        replace(folder / META_FILE, json.dumps(meta).encode())
    return damage


def set_model(**values) -> Callable[[Path], None]:
    return edit_meta(lambda m: m["model"].update(values))


def replace(path: Path, data: bytes) -> None:
    path.unlink()  # as DVC's hard links demand
    path.write_bytes(data)


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS_FILE).read_bytes()
    replace(folder / WEIGHTS_FILE, data[: len(data) // 2])


def legacy_garbage(folder: Path) -> None:
    """A checkpoint from before meta.json recorded the checksum, with garbage weights."""
    edit_meta(lambda m: m.pop("weights"))(folder)
    replace(folder / WEIGHTS_FILE, b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\0" * 64)


def other_weights(folder: Path) -> None:
    """Same-sized weights from another save: what a kill between the weights and meta.json once left."""
    save(folder.with_name("other"), 7)
    replace(folder / WEIGHTS_FILE, (folder.with_name("other") / WEIGHTS_FILE).read_bytes())


def nan_weights(folder: Path) -> None:
    model = tiny(1)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 3] = math.nan
    save_checkpoint(folder, model, {"stage": "seed1"}, TOK)


DAMAGE = {  # name: (damage, reader, what the message must say besides the path)
    "missing-folder": (lambda f: shutil.rmtree(f), load_checkpoint, "does not exist"),
    "not-a-checkpoint": (lambda f: (f / META_FILE).unlink(), load_checkpoint, "not a checkpoint folder"),
    "meta-not-json": (lambda f: replace(f / META_FILE, b"{"), read_meta, "not valid JSON"),
    "meta-not-utf8": (lambda f: replace(f / META_FILE, b'{"a": "\xff"}'), read_meta, "UTF-8"),
    "meta-not-object": (lambda f: replace(f / META_FILE, b"[1]"), load_checkpoint, "JSON object"),
    "meta-no-model": (edit_meta(lambda m: m.pop("model")), load_checkpoint, "'model' is missing"),
    "meta-no-fingerprint": (edit_meta(lambda m: m["tokenizer"].pop("fingerprint")), read_meta, "fingerprint"),
    "unknown-model-key": (set_model(foo=1), load_checkpoint, "'foo'"),
    "missing-model-key": (edit_meta(lambda m: m["model"].pop("n_head")), read_meta, "'n_head' is missing"),
    "model-value-text": (set_model(n_layer="1"), load_checkpoint, "'n_layer' should be an integer"),
    "bias-not-bool": (set_model(bias=1), load_checkpoint, "'bias' should be true or false"),
    "dropout-nan": (set_model(dropout=math.nan), load_checkpoint, "'dropout'"),
    "zero-layers": (set_model(n_layer=0), load_checkpoint, "n_layer must be at least 1"),
    "heads-do-not-divide": (set_model(n_head=3), load_checkpoint, "not a multiple of n_head=3"),
    "wrong-width": (set_model(n_embd=32), load_checkpoint, "do not fit"),
    "bias-mismatch": (set_model(bias=False), load_checkpoint, "(missing [], unexpected"),
    "absurd-width": (set_model(n_embd=2**40, n_head=1), load_checkpoint, "do not fit"),
    "absurd-depth": (set_model(n_layer=10**12), load_checkpoint, "n_layer=1000000000000 but"),
    "absurd-vocab": (set_model(vocab_size=2**50), load_checkpoint, "do not fit"),
    "weights-missing": (lambda f: (f / WEIGHTS_FILE).unlink(), load_checkpoint, "safetensors: not found"),
    "weights-truncated": (truncate, load_checkpoint, "model.safetensors"),
    "weights-garbage": (legacy_garbage, load_checkpoint, "not a readable safetensors file"),
    "weights-from-another-save": (other_weights, load_checkpoint, "SHA-256"),
    "checksum-not-text": (edit_meta(lambda m: m["weights"].update(sha256=1)), read_meta, "'sha256'"),
    "nan-weights": (nan_weights, load_checkpoint, "h.0.mlp.c_fc.weight holds NaN"),
    "tokenizer-missing": (lambda f: shutil.rmtree(f / TOKENIZER_DIR), checkpoint_tokenizer,
                          "tokenizer: not found"),
    "tokenizer-json": (lambda f: replace(f / TOKENIZER_DIR / "tokenizer.json", b"{"), checkpoint_tokenizer,
                       "tokenizer.json"),
    "tokenizer-from-elsewhere": (edit_meta(lambda m: m["tokenizer"].update(fingerprint="0" * 16)),
                                 checkpoint_tokenizer, "fingerprint"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, name):
    damage, reader, needle = DAMAGE[name]
    folder = tmp_path / "ck"
    save(folder, 1)
    damage(folder)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        reader(folder)
    message = str(e.value)
    assert time.perf_counter() - start < 5  # refused before allocating what meta.json claims
    assert str(folder) in message and needle in message and "\n" not in message, message
    assert "dvc" in message  # says how to fix it


def test_a_checkpoint_from_before_the_checksum_still_loads(tmp_path):
    folder = tmp_path / "ck"
    save(folder, 1)
    edit_meta(lambda m: m.pop("weights"))(folder)
    assert holds(folder) == 1
