"""Benchmark: wall time of each stage of `dvc repro` with the default params, from a clean copy.

    python bench/pipeline_time.py            # writes bench/results/pipeline_time.json

Copies the project's files (not data/, checkpoints/, metrics/) into a temporary git repo, runs each stage
with `dvc repro --single-item`, and records seconds per stage, the total, the machine's cores and the
evaluate metrics, so the README's figures come from a file rather than from memory.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptlab.launch import STAGES  # the DAG's stages, in order

ROOT = Path(__file__).resolve().parents[1]


def copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file() and not rel.startswith(("data/", "checkpoints/", "metrics/", "bench/results/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)


def main() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": "src", "DVC_NO_ANALYTICS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "proj"
        copy_project(work)
        (work / "dvc.lock").unlink(missing_ok=True)
        subprocess.run("git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm b",
                       shell=True, cwd=work, check=True)
        seconds = {}
        for stage in STAGES:
            t0 = time.perf_counter()
            subprocess.run(["dvc", "repro", "--single-item", stage], cwd=work, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds[stage] = round(time.perf_counter() - t0, 1)
            print(f"{stage}: {seconds[stage]} s", flush=True)
        metrics = json.loads((work / "metrics" / "evaluate" / "metrics.json").read_text())
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 1),
        "evaluate": metrics,
    }
    out = ROOT / "bench" / "results" / "pipeline_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"total: {result['total_seconds']} s -> {out}")


if __name__ == "__main__":
    main()
