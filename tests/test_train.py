"""The shared training loop: schedule, optimizer groups, a real (tiny) run, and checkpoints."""
import json
import math

import pytest
import torch
from accelerate import Accelerator

from gptlab.checkpoint import CheckpointError, checkpoint_tokenizer, load_checkpoint, read_meta
from gptlab.config import TokenizerConfig, TrainConfig
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer
from gptlab.train import Task, build_optimizer, log_line, lr_at, train

CFG = TrainConfig(max_steps=100, lr=1.0e-3, min_lr=1.0e-4, warmup_steps=10)


def test_lr_schedule_warmup_cosine_floor():
    lrs = [lr_at(s, CFG) for s in range(CFG.max_steps + 5)]
    assert lrs[0] == pytest.approx(1.0e-4) and lrs[9] == pytest.approx(1.0e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:100]))  # cosine falls
    assert lrs[55] == pytest.approx(0.5 * (1.0e-3 + 1.0e-4))  # half-way through the cosine
    assert lrs[100] == lrs[104] == pytest.approx(1.0e-4)  # then holds at the floor


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    opt = build_optimizer(model, CFG, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == CFG.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_log_line_is_compact():
    line = log_line(120, {"loss": 2.3141, "lr": 3.0e-4, "tokens_per_sec": 18200.0, "ms_per_step": 41.2})
    assert line == "step 120 | loss 2.3141 | lr 3.0e-04 | 18.2k tok/s | 41 ms"


def test_tiny_run_learns_and_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # train() writes checkpoints/<stage> and metrics/<stage> under the project root
    torch.manual_seed(0)
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=16))
    data = torch.tensor([[i % 8 for i in range(s, s + 9)] for s in range(8)])  # a cycle a→b→…→h→a

    def next_batch(step, micro):
        return data[:, :-1], data[:, 1:]

    def loss(m, batch):
        idx, targets = batch
        return token_loss(m(idx), targets), {}, idx.numel()

    def evaluate(m):
        return {"val_loss": token_loss(m(data[:, :-1]), data[:, 1:]).item()}

    cfg = TrainConfig(max_steps=40, micro_batch_size=8, tokens_per_step=128, lr=1.0e-2, min_lr=1.0e-3,
                      warmup_steps=5, eval_interval=20, log_interval=10)
    start = evaluate(model)["val_loss"]
    out = tmp_path / "checkpoints" / "t"
    final = train(model, Task(next_batch, loss, evaluate), cfg, 2, Accelerator(cpu=True), "t", {"stage": "t", "params": {}},
                  tok, {})
    assert start > math.log(16) - 0.5 and final["val_loss"] < 0.2  # it learnt the cycle
    meta = read_meta(out)
    assert meta["step"] == 40 and meta["model"]["n_embd"] == 32 and meta["tokenizer"]["kind"] == "char"
    assert json.loads((out / "meta.json").read_text())["metrics"]["val_loss"] == pytest.approx(final["val_loss"])
    again, _ = load_checkpoint(out)
    assert torch.equal(again(data[:, :-1]), model(data[:, :-1]))
    assert again.lm_head.weight is again.transformer.wte.weight
    assert checkpoint_tokenizer(out).fingerprint == tok.fingerprint


def test_checkpoint_mismatch_is_an_error(tmp_path):
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["ab"])
    from gptlab.checkpoint import save_checkpoint

    save_checkpoint(tmp_path, GPT(GPTConfig(1, 2, 16, 8, 32)), {"stage": "t"}, tok)
    meta = read_meta(tmp_path)
    meta["model"]["n_embd"] = 32
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        read_meta(tmp_path / "nothing")


def test_a_nan_loss_stops_training_before_the_update_and_writes_no_checkpoint(tmp_path, monkeypatch):
    """A non-finite loss is an error naming the step and the fix; the folder keeps what it held."""
    from gptlab.config import GptlabError

    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.tensor([[i % 8 for i in range(9)]] * 2)
    calls = []

    def loss(m, batch):
        calls.append(1)
        value = token_loss(m(batch[0]), batch[1])
        return (value * float("nan") if len(calls) == 3 else value), {}, batch[0].numel()

    task = Task(lambda step, micro: (data[:, :-1], data[:, 1:]), loss, lambda m: {"val_loss": 0.0})
    cfg = TrainConfig(max_steps=10, micro_batch_size=2, tokens_per_step=16, lr=1.0e-3, min_lr=1.0e-4, warmup_steps=1)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "checkpoints" / "pretrain"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    with pytest.raises(GptlabError, match=r"\[pretrain\] step 3: the training loss is nan; lower pretrain\.lr"):
        train(model, task, cfg, 1, Accelerator(cpu=True), "pretrain", {"stage": "pretrain", "params": {}}, tok, {})
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values())  # 2 good steps, no NaN
