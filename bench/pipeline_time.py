"""Benchmark: wall time of each stage of `dvc repro` with the default params, from a clean copy.

    python bench/pipeline_time.py            # writes bench/results/pipeline_time.json

Copies the project's files (not data/, checkpoints/, metrics/) into a temporary git repo, runs each stage of
dvc.yaml in order with `dvc repro --single-item` (evaluate once per model: evaluate@pretrain, ...), and records
seconds per stage, the total, the machine (and how busy it was) and every model's evaluate metrics, so the
README's time and results table come from a file rather than from memory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from machine_facts import busy_fraction, machine_facts, write_report

ROOT = Path(__file__).resolve().parents[1]


def copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file() and not rel.startswith(("data/", "checkpoints/", "metrics/", "bench/results/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)


def stage_names(work: Path) -> list[str]:
    """dvc.yaml's stages in order, a foreach stage as one name per item (evaluate@pretrain, ...)."""
    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    models = yaml.safe_load((work / "params.yaml").read_text())["evaluate"]["models"]
    return [f"{name}@{m}" if "foreach" in spec else name for name, spec in stages.items()
            for m in (models if "foreach" in spec else [None])]


def main() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": "src", "DVC_NO_ANALYTICS": "1"}
    busy = busy_fraction(2.0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "proj"
        copy_project(work)
        (work / "dvc.lock").unlink(missing_ok=True)
        subprocess.run("git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm b",
                       shell=True, cwd=work, check=True)
        seconds = {}
        for stage in stage_names(work):
            t0 = time.perf_counter()
            subprocess.run(["dvc", "repro", "--single-item", stage], cwd=work, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds[stage] = round(time.perf_counter() - t0, 1)
            print(f"{stage}: {seconds[stage]} s", flush=True)
        models = [s.split("@", 1)[1] for s in seconds if "@" in s]
        metrics = {m: json.loads((work / "metrics" / "evaluate" / m / "metrics.json").read_text()) for m in models}
    write_report(ROOT / "bench" / "results" / "pipeline_time.json", {
        "total_seconds": round(sum(seconds.values()), 1),
        "seconds": seconds,
        "machine": machine_facts(busy_before=round(busy, 2)),
        "evaluate": metrics,
        "command": "python bench/pipeline_time.py",
    })


if __name__ == "__main__":
    main()
