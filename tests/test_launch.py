"""`gptlab run`: accelerate launch's argv, exit codes, and the stage-side pieces (one report, the lock)."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from gptlab import stage
from gptlab.config import GptlabError
from gptlab.launch import _exit_code, launch_argv, main


def test_argv_uses_the_project_config_unless_another_is_named():
    assert launch_argv("sft", []) == ["--config_file", "accelerate.yaml", "-m", "stages.sft"]
    assert launch_argv("sft", ["--multi_gpu", "--num_processes", "2"])[:2] == ["--config_file", "accelerate.yaml"]
    assert launch_argv("sft", ["--config_file=x.yaml"]) == ["--config_file=x.yaml", "-m", "stages.sft"]


def test_evaluate_at_a_model_runs_the_evaluate_module_with_the_model_name():
    assert launch_argv("evaluate@sft", [])[-3:] == ["-m", "stages.evaluate", "sft"]


@pytest.mark.parametrize("name,needle", [
    ("evaluate", "name the model: evaluate@MODEL"),
    ("evaluate@", "name the model: evaluate@MODEL"),
    ("sft@x", "only evaluate takes @MODEL"),
    ("pretrian", "name a stage"),
])
def test_stage_names_gptlab_run_refuses(capsys, name, needle):
    assert main([name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gptlab run: ") and needle in err and err.count("\n") == 1


def test_the_failed_rank_s_exit_code_is_passed_on():
    assert _exit_code(SimpleNamespace(failures={0: SimpleNamespace(exitcode=2)})) == 2
    assert _exit_code(SimpleNamespace(failures={1: SimpleNamespace(exitcode=-15)})) == 143  # SIGTERM
    assert _exit_code(subprocess.CalledProcessError(2, ["python"])) == 2


def test_an_unknown_stage_is_one_line(capsys):
    assert main(["pretrian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gptlab run: name a stage") and err.count("\n") == 1


def test_a_second_holder_of_a_stage_lock_waits_then_names_the_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(stage.LOCK_WAIT, "0.5")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gptlab.stage import hold_lock; "
                               "hold_lock('sft'); print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GptlabError, match=rf"\[sft\] another run of this stage \(pid {holder.pid}\)"):
            stage.hold_lock("sft")
    finally:
        holder.kill()
        holder.wait()
    stage.hold_lock("sft")  # the kernel released the dead holder's lock: no stale lock survives a kill


@pytest.mark.parametrize("text,needle", [
    ("compute_environment: [LOCAL\n", "not readable as YAML"),
    ("- just a list\n", "not a mapping"),
    ("distributed_type: NOT_A_TYPE\nnum_processes: 1\n", "accelerate launch refused it"),
])
def test_a_bad_accelerate_config_is_one_line_naming_it(tmp_path, monkeypatch, capsys, text, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTLAB_LAUNCHER_PID", "")  # run_stage sets it: monkeypatch removes it afterwards
    (tmp_path / "accelerate.yaml").write_text(text)
    try:
        code = main(["check"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: accelerate.yaml: ") and needle in err and err.count("\n") == 1, err
