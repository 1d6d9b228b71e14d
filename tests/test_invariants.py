"""Numerical invariants of training: how a step's batch is split (micro-batches, accumulation, processes)
does not change what is learnt, and a golden file pins the first pretraining losses exactly, so an unintended
change to the numerics (model, optimizer, schedule, data order) fails loudly.

To regenerate the golden file after an intended change: GPTLAB_UPDATE_GOLDEN=1 python -m pytest
tests/test_invariants.py -k golden, and say why in the commit."""
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from gptlab import paths
from gptlab.config import TokenizerConfig, TrainConfig, WorldConfig
from gptlab.data.loader import Slicer, StepCache, Windows, step_windows
from gptlab.data.world import build_world
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer
from gptlab.train import Task, train

GOLDEN = Path(__file__).parent / "golden" / "pretrain_losses.json"
T = 32


@pytest.fixture(scope="module")
def corpus():
    """The embedded world's pretraining text in a char tokenizer: real data, no tokenizer training cost."""
    world = build_world(WorldConfig(n_people=20, bios_per_person=2, n_arithmetic=10), seed=7)
    docs = world.pretrain_docs("train")
    tok = train_tokenizer(TokenizerConfig(kind="char"), docs)
    ids = np.array([i for d in docs for i in [*tok.encode(d), tok.eot_id]], dtype=np.uint16)
    return tok, Windows([types.SimpleNamespace(tokens=ids)], T)


def pretrain_run(corpus, micro_batch_size: int, grad_accum: int, steps: int = 10):
    """pretrain's task (distinct random windows per step, sliced into micro-batches) through the real loop;
    returns the per-step losses it logged and the final weights."""
    tok, windows = corpus
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=tok.n_vocab))
    slicer = Slicer(micro_batch_size, grad_accum, 0, 1)
    step_batch = StepCache(lambda step: step_windows(windows.n, 1337, step, slicer.global_rows))
    task = Task(
        lambda step, micro: windows.batch(slicer.take(step_batch(step), micro), "cpu"),
        lambda m, b: (token_loss(m(b[0]), b[1]), {}, b[0].numel()),
        lambda m: {"val_loss": 0.0},
    )
    cfg = TrainConfig(max_steps=steps, micro_batch_size=micro_batch_size, tokens_per_step=8 * T, lr=3.0e-3,
                      min_lr=3.0e-4, warmup_steps=3, eval_interval=steps, log_interval=1, save_interval=0)
    train(model, task, cfg, grad_accum, Accelerator(cpu=True), "pretrain", {"stage": "pretrain", "params": {}}, tok, {})
    rows = (paths.metrics_dir("pretrain") / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    losses = [float(r.split("\t")[1]) for r in rows]
    shutil.rmtree(paths.METRICS)
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, whatever the machine's core count
    yield tmp_path
    torch.set_num_threads(threads)


def test_micro_batch_8_equals_8_accumulated_micro_batches_of_1(workdir, corpus):
    whole, w1 = pretrain_run(corpus, micro_batch_size=8, grad_accum=1)
    split, w8 = pretrain_run(corpus, micro_batch_size=1, grad_accum=8)
    assert len(whole) == len(split) == 10
    assert max(abs(a - b) for a, b in zip(whole, split)) < 1e-5, (whole, split)
    assert whole[-1] < whole[0] - 0.5  # and it learns
    assert max((w1[k] - w8[k]).abs().max().item() for k in w1) < 1e-4


def test_the_first_20_pretrain_losses_match_the_golden_file_exactly(workdir, corpus):
    losses, _ = pretrain_run(corpus, micro_batch_size=4, grad_accum=2, steps=20)
    if os.environ.get("GPTLAB_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"losses": losses, "torch": torch.__version__}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert losses == golden["losses"], (
        "the numerics of training changed: if that was intended, regenerate tests/golden/pretrain_losses.json "
        "(see this file's docstring); first difference at step "
        f"{next(i + 1 for i, (a, b) in enumerate(zip(losses, golden['losses'])) if a != b)}"
    )
