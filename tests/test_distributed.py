"""Many processes train what one does: 2 gloo ranks on one machine, 2 "machines" started through SLURM's
srun (a stand-in that runs both on this one, over loopback), and FSDP's sharded resume state.

All on CPU: `ACCELERATE_USE_CPU=1` turns accelerate's multi-GPU launch into gloo ranks. accelerate enables
FSDP only on accelerators, so the FSDP test drives torch's fully_shard directly (tests/workers/fsdp_resume.py)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
from conftest import project_env, sh, tokenized_copy

WORKERS = Path(__file__).parent / "workers"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(project: Path) -> dict:
    return safetensors.torch.load_file(project / "checkpoints/pretrain/model.safetensors")


def step_line(log: str, step: int) -> str:
    return next(line for line in log.splitlines() if line.startswith(f"step {step} | loss")).split("|")[1]


@pytest.fixture(scope="module")
def one_process(tokenized, tmp_path_factory):
    """A tokenized tiny project and the pretrain weights and log of one process (2 accumulated micro-batches)."""
    project = tokenized_copy(tokenized, tmp_path_factory.mktemp("dist") / "proj")
    out = sh("gptlab run pretrain", project)
    assert "grad_accum 2" in out.stdout
    return project, weights(project), out.stdout


def close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_gloo_ranks_train_the_weights_one_process_does(one_process):
    project, single, log = one_process
    env = {**project_env(project), "ACCELERATE_USE_CPU": "1"}
    two = sh("gptlab run pretrain --multi_gpu --num_processes 2", project, env=env)
    assert "2 process(es), DistributedType.MULTI_CPU" in two.stdout and "grad_accum 1" in two.stdout
    assert close(single, weights(project)) < 1e-5
    assert step_line(two.stdout, 4) == step_line(log, 4)


def test_two_machines_under_slurm_through_dvc_repro(one_process):
    """`dvc repro` on the first node; GPTLAB_LAUNCH_OPTIONS names the multi-node config; gptlab run fans out
    with srun and each node joins with its SLURM_NODEID as machine rank."""
    project, single, _ = one_process
    env = {**project_env(project), "ACCELERATE_USE_CPU": "1", "SLURM_JOB_ID": "1", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "MASTER_PORT": str(free_port()),
           "GPTLAB_LAUNCH_OPTIONS": "--config_file configs/accelerate/multinode.yaml --num_processes 2 "
                                    "--mixed_precision no",
           "PATH": f"{WORKERS}:{project_env(project)['PATH']}"}
    out = sh("dvc repro -s -f pretrain", project, env=env)
    log = out.stdout + out.stderr
    assert log.count("[pretrain] 2 process(es), DistributedType.MULTI_CPU") == 1  # one main process, 2 machines
    assert "grad_accum 1" in log
    assert close(single, weights(project)) < 1e-5


def test_two_machines_under_slurm_refuse_a_node_count_the_allocation_lacks(one_process):
    project, _, _ = one_process
    env = {**project_env(project), "ACCELERATE_USE_CPU": "1", "SLURM_JOB_ID": "1", "SLURM_NNODES": "3",
           "PATH": f"{WORKERS}:{project_env(project)['PATH']}"}
    out = sh("gptlab run pretrain --config_file configs/accelerate/multinode.yaml", project, env=env, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: [pretrain] the launch asks for num_machines=2 but this SLURM allocation "
                                  "has 3 node(s); set num_machines to 3 (or allocate 2 nodes)")


def test_fsdp_sharded_resume_state_on_gloo(tmp_path):
    out = tmp_path / "report.json"
    env = {**project_env(Path(__file__).parents[1]), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(WORKERS / "fsdp_resume.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sharded"] == "DTensor"  # the parameters really were sharded
    assert report["full_shapes"] == {"transformer.wte.weight": [64, 32]}  # the state holds whole tensors
    assert report["keys"] and report["optimizer_keys"] == 3 * 28  # step, exp_avg, exp_avg_sq per parameter
    assert report["max_diff"] == 0.0  # resumed from the sharded state, it trains exactly what it would have


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with a GPU the FSDP config really shards")
def test_fsdp_config_on_a_machine_without_gpus_is_one_clear_error(one_process):
    """accelerate would start independent single processes that all write the same outputs."""
    project, _, _ = one_process
    out = sh("gptlab run check --config_file configs/accelerate/fsdp.yaml --num_processes 2", project, check=False)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["error: [check] the launch started 2 processes but accelerate joined them into none "
                     "(DistributedType.NO on cpu): FSDP and multi-GPU configs need GPUs; on a CPU, launch with "
                     "--multi_gpu and ACCELERATE_USE_CPU=1"], out.stderr
