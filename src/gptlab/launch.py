"""`gptlab run STAGE [accelerate launch options]`: how dvc.yaml starts every stage.

It is `accelerate launch --config_file accelerate.yaml [options] -m stages.STAGE`, through accelerate's own
parser and launchers (one process, gloo ranks, many GPUs alike), with what a user needs when a run ends early:

- a stage that rejects its input has printed one `error:` line (once, whatever the process count); the
  launcher adds no traceback and no torch.distributed failure report, and exits with the stage's exit code;
- Ctrl-C stops every process within seconds and prints one line;
- under `dvc repro`, when the dvc process dies (kill -9), the stage stops instead of training on as an
  orphan beside the next run (each rank also dies with its launcher: see `gptlab.stage.run`).

Launch settings reach the stages that dvc.yaml starts through GPTLAB_LAUNCH_OPTIONS (e.g.
`--config_file configs/accelerate/8gpu.yaml`); options given on the command line come after them and win.
Several machines under SLURM: the node that runs `dvc repro` starts one `gptlab run` per node with srun,
and each of those adds its node's rank and the rendezvous address from SLURM's variables (slurm_fanout).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

STAGES = ("check", "tokenize", "pretrain", "sft", "ref_logps", "dpo", "evaluate")
PER_MODEL = "evaluate"  # one stage per model in dvc.yaml (foreach): `gptlab run evaluate@NAME`
DEFAULT_CONFIG = "accelerate.yaml"
LAUNCHER_PID = "GPTLAB_LAUNCHER_PID"  # tells the ranks `gptlab run` started them: it prints the Ctrl-C line
SHELLS = {"sh", "dash", "bash", "zsh", "fish", "ksh"}
POLL_SECONDS = 0.5
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
LAUNCH_OPTIONS = "GPTLAB_LAUNCH_OPTIONS"  # accelerate launch options for every stage dvc.yaml starts
NODE_LAUNCH = "GPTLAB_NODE_LAUNCH"  # set in the per-node `gptlab run` that srun starts on each machine
DEFAULT_PORT = "29500"
STOP_GRACE_SECONDS = 120  # how long an interrupted launcher waits for its ranks to save their state


def error_marker(launcher_pid: int | str) -> Path:
    """The file whose creation elects the one rank that prints a failed run's `error:` line."""
    return Path(tempfile.gettempdir()) / f"gptlab-error-{launcher_pid}"


def launch_argv(stage: str, options: list[str]) -> list[str]:
    """accelerate launch's argv: the project's accelerate.yaml unless the options name another config.
    `evaluate@NAME` (dvc.yaml's name for the evaluate stage of model NAME) runs stages.evaluate NAME."""
    if not any(o == "--config_file" or o.startswith("--config_file=") for o in options):
        options = ["--config_file", DEFAULT_CONFIG, *options]
    module, _, model = stage.partition("@")
    return [*options, "-m", f"stages.{module}", *([model] if model else [])]


def stage_name_problem(name: str) -> str | None:
    """Why `name` is not a stage `gptlab run` starts (None when it is one)."""
    module, at, model = name.partition("@")
    if module not in STAGES:
        return f"name a stage ({', '.join(STAGES)}, or {PER_MODEL}@MODEL), then any `accelerate launch` options"
    if at and module != PER_MODEL:
        return f"only {PER_MODEL} takes @MODEL (a name under evaluate.models in params.yaml), got {name!r}"
    if module == PER_MODEL and not model:
        return f"name the model: {PER_MODEL}@MODEL, MODEL one of the names under evaluate.models in params.yaml"
    return None


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
            try:  # dvc's end of the pipe may be closed already: the line is lost, the exit must not be
                print(f"error: [{stage}] the dvc process that started this stage (pid {pid}) is gone; stopping",
                      file=sys.stderr, flush=True)
            except (OSError, ValueError):  # BrokenPipeError; ValueError: stderr closed in this process
                pass
            finally:
                os._exit(1)


def _wait_for_ranks(seconds: float) -> None:
    """Reap this launcher's child processes, for up to `seconds`: a rank that got the Ctrl-C finishes its
    step and saves its resume state, and it dies (parent-death signal) if the launcher exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        except KeyboardInterrupt:
            return  # a second Ctrl-C: stop waiting
        if pid == 0:
            time.sleep(0.05)


def _quiet_torch_elastic() -> None:
    """torch.distributed's launcher logs a failure report per rank; the ranks' own `error:` line says it all."""
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _exit_code(exc: BaseException) -> int:
    """The failed rank's exit code (a signal's number + 128), so callers see what the stage returned."""
    code = _raw_exit_code(exc)
    return 128 - code if code < 0 else code or 1


def _raw_exit_code(exc: BaseException) -> int:
    """The first failed rank's exit status as Python reports it: negative for a rank killed by a signal
    (torch elastic's exitcode and subprocess's returncode alike)."""
    failures = list((getattr(exc, "failures", None) or {}).values())
    if failures:  # the earliest: the others are often ranks the launcher stopped because of it
        return getattr(min(failures, key=lambda f: getattr(f, "timestamp", 0)), "exitcode", 1)
    return getattr(exc, "returncode", 1)


def _killed_line(stage: str, exc: BaseException) -> str | None:
    """The `error:` line for a rank killed by a signal (it printed nothing): which signal, and what to do."""
    code = _raw_exit_code(exc)
    if code >= 0:
        return None  # it exited by itself, having printed why
    try:
        name = signal.Signals(-code).name.removeprefix("SIG")
    except ValueError:
        name = str(-code)
    oom = " (out of memory? the kernel's OOM killer sends KILL; see `dmesg`)" if -code == signal.SIGKILL else ""
    return (f"error: [{stage}] killed by signal {name}{oom}; run it again to resume (a training stage continues "
            "from its last saved state, the others start over)")


def machines(args) -> int:
    """The machine count the launch asks for: the option, else the config file's, else 1."""
    if args.num_machines:
        return int(args.num_machines)
    raw = yaml.safe_load(Path(args.config_file).read_text()) or {}
    return int(raw.get("num_machines") or 1)


def slurm_fanout(stage: str, options: list[str], n_machines: int) -> int | None:
    """In a SLURM allocation of several nodes, on the node running dvc: start `gptlab run` on every node
    with srun (each becomes one machine of the launch) and return srun's exit code. None when not needed."""
    if n_machines <= 1 or os.environ.get(NODE_LAUNCH) or "SLURM_JOB_ID" not in os.environ:
        return None
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    if nodes != n_machines:
        print(f"error: [{stage}] the launch asks for num_machines={n_machines} but this SLURM allocation has "
              f"{nodes} node(s); set num_machines to {nodes} (or allocate {n_machines} nodes)", file=sys.stderr)
        return 2
    cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
           sys.executable, "-m", "gptlab.cli", "run", stage, *options]
    env = {**os.environ, NODE_LAUNCH: "1", LAUNCH_OPTIONS: ""}  # the options travel on the command line
    try:
        return subprocess.call(cmd, env=env, preexec_fn=die_with_parent)  # srun stops the job step on every node when we are gone
    except FileNotFoundError:
        print(f"error: [{stage}] num_machines={n_machines} under SLURM needs srun on PATH", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # srun passed the Ctrl-C on to every node; they save their resume state
        _wait_for_ranks(STOP_GRACE_SECONDS)
        print(f"error: [{stage}] interrupted; run it again to continue", file=sys.stderr, flush=True)
        return 130


def node_options(env: dict) -> list[str]:
    """In a per-node `gptlab run` started by slurm_fanout: this machine's rank, the machine count and the
    rendezvous address (MASTER_ADDR/MASTER_PORT if set, else the allocation's first host and port 29500)."""
    if not env.get(NODE_LAUNCH):
        return []
    host = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
    return ["--machine_rank", env.get("SLURM_NODEID", "0"), "--num_machines", env.get("SLURM_NNODES", "1"),
            "--main_process_ip", host, "--main_process_port", env.get("MASTER_PORT", DEFAULT_PORT)]


def _first_host(nodelist: str) -> str:
    """SLURM's compressed node list (node[01-04]) expanded by scontrol; its first host runs rank 0."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send `sig` to this process when its parent dies (PR_SET_PDEATHSIG), so no rank,
    worker or srun goes on as an orphan. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def run_stage(stage: str, options: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(launch_argv(stage, options))
    check_config(Path(args.config_file))
    fanned = slurm_fanout(stage, options, machines(args))
    if fanned is not None:
        return fanned
    os.environ[LAUNCHER_PID] = str(os.getpid())  # inherited by every rank
    _quiet_torch_elastic()
    anchor = None if os.environ.get(NODE_LAUNCH) else _dvc_process()  # other nodes have no dvc to watch
    if anchor is not None:
        threading.Thread(target=_watch, args=(anchor, stage), daemon=True).start()
    try:
        launch_command(args)
    except ValueError as e:  # accelerate rejects the launch settings before starting any process
        print(f"error: {args.config_file}: accelerate launch refused it: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (subprocess.CalledProcessError, ChildFailedError) as e:
        killed = _killed_line(stage, e)
        if killed:  # a signal (the OOM killer's KILL) left the rank no chance to say anything; its progress
            print(f"\n{killed}", file=sys.stderr, flush=True)  # bar may have been mid-line: start a fresh one
        return _exit_code(e)  # else the stage has printed why
    except (KeyboardInterrupt, SignalException):
        _wait_for_ranks(STOP_GRACE_SECONDS)  # they are saving a resume state: returning would kill them
        print(f"error: [{stage}] interrupted; run it again to continue (a training stage resumes from its "
              f"last saved state)", file=sys.stderr, flush=True)
        return 130
    finally:
        error_marker(os.getpid()).unlink(missing_ok=True)
    return 0


def main(argv: list[str]) -> int:
    problem = stage_name_problem(argv[0]) if argv else stage_name_problem("")
    if problem:
        print(f"error: gptlab run: {problem}", file=sys.stderr)
        return 2
    options = [*shlex.split(os.environ.get(LAUNCH_OPTIONS, "")), *argv[1:], *node_options(dict(os.environ))]
    return run_stage(argv[0], options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
