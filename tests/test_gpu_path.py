"""The GPU path: bf16 autocast, TF32, fused AdamW, torch.compile, flash attention through SDPA and pinned,
non-blocking batch copies. The GPU tests skip without CUDA (CI has none); what runs on a CPU runs here too:
fused AdamW and compile, which a GPU run uses the same way."""
import pytest
import torch
from accelerate import Accelerator

from gptlab.config import TokenizerConfig, TrainConfig
from gptlab.data.loader import to_device
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer
from gptlab.train import Task, build_optimizer, train

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cycle_run(tmp_path, monkeypatch, accelerator, compile=False, steps=30):
    """A tiny model learning a cycle a→b→…→h→a; returns (val loss before, after, the model)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=8, vocab_size=16))
    data = torch.tensor([[i % 8 for i in range(s, s + 9)] for s in range(8)])

    def batch(step, micro):
        return to_device(data[:, :-1], accelerator.device), to_device(data[:, 1:], accelerator.device)

    def evaluate(m):
        idx, targets = batch(0, 0)
        return {"val_loss": token_loss(m(idx), targets).item()}

    cfg = TrainConfig(max_steps=steps, micro_batch_size=8, tokens_per_step=64, lr=1.0e-2, min_lr=1.0e-3,
                      warmup_steps=3, eval_interval=steps, log_interval=10, save_interval=0, compile=compile)
    task = Task(batch, lambda m, b: (token_loss(m(b[0]), b[1]), {}, b[0].numel()), evaluate)
    with torch.no_grad():
        before = evaluate(model.to(accelerator.device))["val_loss"]
    final = train(model, task, cfg, 1, accelerator, "pretrain", {"stage": "pretrain", "params": {}}, tok, {})
    return before, final["val_loss"], model


def test_fused_adamw_on_cpu():
    """torch has a fused AdamW for CPU tensors (one kernel for all parameters): about 10% faster per step."""
    opt = build_optimizer(GPT(GPTConfig(1, 2, 16, 8, 32)), TrainConfig(), torch.device("cpu"))
    assert all(group["fused"] for group in opt.param_groups)


@pytest.mark.slow
def test_compile_keeps_names_and_learns_on_cpu(tmp_path, monkeypatch):
    before, after, model = cycle_run(tmp_path, monkeypatch, Accelerator(cpu=True), compile=True)
    assert after < before - 1.5
    assert "transformer.wte.weight" in model.state_dict()  # compiled in place: checkpoints keep GPT-2's names
    assert (tmp_path / "checkpoints/pretrain/model.safetensors").is_file()


@gpu
def test_bf16_autocast_fused_adamw_and_compile_learn_on_a_gpu(tmp_path, monkeypatch):
    accelerator = Accelerator(mixed_precision="bf16")
    before, after, model = cycle_run(tmp_path, monkeypatch, accelerator, compile=True)
    assert after < before - 1.5
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32 under autocast


@gpu
def test_tf32_is_on_for_stages(monkeypatch, tmp_path):
    from gptlab.stage import start

    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    start("check")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@gpu
def test_flash_attention_runs_the_model_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=128, vocab_size=512)).cuda()
    idx = torch.randint(0, 512, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot take these inputs
            flash = model(idx).float()
        with sdpa_kernel(SDPBackend.MATH):
            math = model(idx).float()
    assert (flash - math).abs().max().item() < 0.1


@gpu
def test_batches_reach_the_gpu_from_pinned_memory():
    t = to_device(torch.arange(8), "cuda")
    assert t.is_cuda and torch.equal(t.cpu(), torch.arange(8))
