"""The machine facts (and how busy the machine is) every benchmark records beside its figures (`python bench/<name>.py` puts bench/ on
sys.path, so the scripts import this module directly)."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def machine_facts(**extra) -> dict:
    """CPU model and counts, platform and Python, plus what the benchmark adds (library versions, threads)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus": os.cpu_count(), "usable_cpus": usable, "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), **extra}


def torch_machine(threads: int) -> dict:
    """machine_facts plus what a torch benchmark depends on: versions, threads, MKL-DNN, the CPU's vector ISA."""
    import torch
    import transformers

    return machine_facts(torch_threads=threads, torch=torch.__version__, transformers=transformers.__version__,
                         mkldnn=torch.backends.mkldnn.is_available(), cpu_capability=torch.backends.cpu.get_cpu_capability())


def write_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def busy_fraction(interval: float = 0.5) -> float:
    """Share of all CPUs busy over `interval` (others' work: the machine is shared), from /proc/stat."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    (t0, i0), _, (t1, i1) = sample(), time.sleep(interval), sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)
