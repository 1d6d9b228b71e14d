"""Sweeps: one `dvc exp run --queue` command queues a grid, `dvc queue start` runs it, and the docs'
`dvc exp show` recipe compares the results in one table; the stages upstream of the swept params run once."""
from __future__ import annotations

import itertools
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import sh

pytestmark = pytest.mark.slow
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "04-experiments-and-sharing.md"
BETAS, LRS = ("0.05", "0.2"), ("0.0001", "0.0003")  # none is the baseline (0.1, 2.0e-4): each run trains
CACHED = ("tokenize", "pretrain", "sft", "ref_logps", "evaluate@pretrain", "evaluate@sft")


def readme_sweep_commands() -> list[str]:
    """The commands of the sweep block in docs/04-experiments-and-sharing.md, in order."""
    text = GUIDE.read_text()
    block = text[text.index("<!-- sweep -->"):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def wait_for_queue(project: Path, timeout: float = 900) -> dict[str, str]:
    """{experiment name: status} once nothing is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [line.split() for line in sh("dvc queue status", project).stdout.splitlines()]
        status = {r[1]: r[-1] for r in rows if len(r) >= 3 and r[-1] in ("Queued", "Running", "Success", "Failed")}
        if status and not {"Queued", "Running"} & set(status.values()):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish in {timeout} s: {status}"
        time.sleep(5)


def test_a_2x2_sweep_from_one_command_runs_the_upstream_stages_once_and_reads_as_one_table(tiny_project, tmp_path):
    p = tmp_path / "proj"
    shutil.copytree(tiny_project, p, symlinks=True)  # the shared project keeps no queued experiments
    sh("git add -A && (git diff --cached --quiet || git commit -qm run)", p)  # queued runs start from HEAD
    queue, start, _status, show = readme_sweep_commands()
    assert queue.startswith("dvc exp run --queue -S 'dpo.beta=") and start.startswith("dvc queue start")
    out = sh(f"dvc exp run --queue -S 'dpo.beta={','.join(BETAS)}' -S 'dpo.lr=1.0e-4,3.0e-4'", p).stdout
    assert out.count("Queued experiment") == 4  # the grid's product, from one command
    sh(f"{start} > queue.log 2>&1", p)  # its workers keep running after it returns
    status = wait_for_queue(p)
    assert sorted(status.values()) == ["Success"] * 4, status
    for name in status:  # each experiment reran dpo and its evaluation only: the rest came from the cache
        log = sh(f"dvc queue logs {name}", p).stdout
        assert "Running stage 'dpo'" in log and "Running stage 'evaluate@dpo'" in log, name
        for stage in CACHED:
            assert f"Stage '{stage}' didn't change, skipping" in log, (name, stage)
    table = sh(f"COLUMNS=400 {show}", p).stdout
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    assert header[0] == "Experiment" and header[-2:] == ["dpo.lr", "dpo.beta"]
    assert all(re.fullmatch(r"(metrics/evaluate/dpo/metrics\.json:)?(exact_match|exact_match_stderr|pref_acc|reward_acc)", h)
               for h in header[1:-2]), header
    # a row per queued experiment (the copied project may hold earlier tests' experiments too): the grid
    rows = [line.split() for line in table.splitlines() if any(f"[{name}]" in line for name in status)]
    assert sorted((r[-2], r[-1]) for r in rows) == sorted(itertools.product(LRS, BETAS))
