"""`gptlab run STAGE [accelerate launch options]`: how dvc.yaml starts every stage.

It is `accelerate launch --config_file accelerate.yaml [options] -m stages.STAGE`, through accelerate's own
parser and launchers (one process, gloo ranks, many GPUs alike), with what a user needs when a run ends early:

- a stage that rejects its input has printed one `error:` line (once, whatever the process count); the
  launcher adds no traceback and no torch.distributed failure report, and exits with the stage's exit code;
- Ctrl-C stops every process within seconds and prints one line;
- under `dvc repro`, when the dvc process dies (kill -9), the stage stops instead of training on as an
  orphan beside the next run (each rank also dies with its launcher: see `gptlab.stage.run`).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

STAGES = ("check", "tokenize", "pretrain", "sft", "dpo", "evaluate")
DEFAULT_CONFIG = "accelerate.yaml"
LAUNCHER_PID = "GPTLAB_LAUNCHER_PID"  # tells the ranks `gptlab run` started them: it prints the Ctrl-C line
SHELLS = {"sh", "dash", "bash", "zsh", "fish", "ksh"}
POLL_SECONDS = 0.5


def error_marker(launcher_pid: int | str) -> Path:
    """The file whose creation elects the one rank that prints a failed run's `error:` line."""
    return Path(tempfile.gettempdir()) / f"gptlab-error-{launcher_pid}"


def launch_argv(stage: str, options: list[str]) -> list[str]:
    """accelerate launch's argv: the project's accelerate.yaml unless the options name another config."""
    if not any(o == "--config_file" or o.startswith("--config_file=") for o in options):
        options = ["--config_file", DEFAULT_CONFIG, *options]
    return [*options, "-m", f"stages.{stage}"]


def check_config(path: Path) -> None:
    """accelerate reads its config with no message that names the file; say what is wrong, and exit 2."""
    fix = f"fix it, or recreate it with `accelerate config --config_file {path}`"
    problem = None
    try:
        raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except FileNotFoundError:
        problem = "not found; run from the project root"
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        problem = f"not readable as YAML/JSON ({' '.join(str(e).split())[:160]})"
    else:
        if not isinstance(raw, dict):
            problem = "not a mapping of accelerate settings"
    if problem:
        print(f"error: {path}: {problem}; {fix}", file=sys.stderr)
        sys.exit(2)


def _proc_stat(pid: int) -> tuple[str | None, int, str] | None:
    """(command name or None if it died, parent pid, start time) from /proc; None where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is the state: Z = dead, not yet reaped
    return (None if fields[0] in "ZX" else name), int(fields[1]), fields[19]


def _dvc_process() -> tuple[int, str] | None:
    """Under `dvc repro` (DVC_STAGE is set), the dvc process: the nearest ancestor that is not a shell."""
    if not os.environ.get("DVC_STAGE"):
        return None  # a user's own launch (nohup included) is not tied to its parent's life
    pid = os.getppid()
    while pid > 1:
        stat = _proc_stat(pid)
        if stat is None:
            return None
        name, parent, started = stat
        if name is None:
            return None
        if name not in SHELLS:
            return pid, started
        pid = parent
    return None


def _watch(anchor: tuple[int, str], stage: str) -> None:
    """Stop this launcher (and so, through their parent-death signal, every rank) once dvc is gone."""
    pid, started = anchor
    while True:
        time.sleep(POLL_SECONDS)
        stat = _proc_stat(pid)
        if stat is None or stat[0] is None or stat[2] != started:  # gone, dead, or the pid was reused
            print(f"error: [{stage}] the dvc process that started this stage (pid {pid}) is gone; stopping",
                  file=sys.stderr, flush=True)
            os._exit(1)


def _quiet_torch_elastic() -> None:
    """torch.distributed's launcher logs a failure report per rank; the ranks' own `error:` line says it all."""
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _exit_code(exc: BaseException) -> int:
    """The failed rank's exit code (a signal's number + 128), so callers see what the stage returned."""
    failures = getattr(exc, "failures", None) or {}
    for failure in failures.values():
        code = getattr(failure, "exitcode", 1)
        return 128 - code if code < 0 else code or 1
    return getattr(exc, "returncode", 1) or 1


def run_stage(stage: str, options: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(launch_argv(stage, options))
    check_config(Path(args.config_file))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # inherited by every rank
    _quiet_torch_elastic()
    anchor = _dvc_process()
    if anchor is not None:
        threading.Thread(target=_watch, args=(anchor, stage), daemon=True).start()
    try:
        launch_command(args)
    except ValueError as e:  # accelerate rejects the launch settings before starting any process
        print(f"error: {args.config_file}: accelerate launch refused it: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (subprocess.CalledProcessError, ChildFailedError) as e:
        return _exit_code(e)  # the stage has printed why
    except (KeyboardInterrupt, SignalException):
        print(f"error: [{stage}] interrupted; the stage stopped and wrote no new outputs", file=sys.stderr, flush=True)
        return 130
    finally:
        error_marker(os.getpid()).unlink(missing_ok=True)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in STAGES:
        print(f"error: gptlab run: name a stage ({', '.join(STAGES)}), then any `accelerate launch` options",
              file=sys.stderr)
        return 2
    return run_stage(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
