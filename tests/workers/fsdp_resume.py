"""Run under `torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=1 (gloo): shards a GPT with torch's FSDP2
(fully_shard), trains, saves a resume state through gptlab.resume, trains on; then a fresh sharded model
loads the state and trains the same steps. Rank 0 writes the comparison as JSON to argv[1].

accelerate enables FSDP only on accelerators, so this drives fully_shard directly: it exercises what FSDP
changes for gptlab (gathering full weights and AdamW state from shards, loading them back into shards)."""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gptlab import resume
from gptlab.config import TrainConfig
from gptlab.losses import token_loss
from gptlab.model import GPT, GPTConfig
from gptlab.train import build_optimizer


def sharded(accelerator):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, build_optimizer(model, TrainConfig(lr=1.0e-2), accelerator.device)


def step(model, optimizer, n, rank):
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(100 * n + rank))
    token_loss(model(data[:, :-1]), data[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    root = out.parent / "resume"
    model, optimizer = sharded(accelerator)
    for n in range(1, 4):
        step(model, optimizer, n, rank)
    print_ = {"params": {}, "inputs": {}}
    resume.save_state(root, 3, model, optimizer, accelerator, print_, out.parent / "metrics", keep=2)
    for n in range(4, 7):
        step(model, optimizer, n, rank)
    straight = resume.full_state(model)

    model2, optimizer2 = sharded(accelerator)
    saved = resume.latest(root, print_, "test")
    resume.load_into(saved, model2, optimizer2, accelerator)
    for n in range(4, 7):
        step(model2, optimizer2, n, rank)
    resumed = resume.full_state(model2)
    if rank == 0:
        saved_weights = resume._read_tensors(saved.folder / resume.MODEL_FILE)
        report = {
            "sharded": type(model.transformer.wte.weight).__name__,
            "keys": sorted(straight) == sorted(resumed) == sorted(saved_weights),
            "max_diff": max((straight[k] - resumed[k]).abs().max().item() for k in straight),
            "full_shapes": {k: list(v.shape) for k, v in saved_weights.items() if k == "transformer.wte.weight"},
            "optimizer_keys": len(resume._read_tensors(saved.folder / resume.OPTIMIZER_FILE)),
        }
        out.write_text(json.dumps(report))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
