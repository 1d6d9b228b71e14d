"""dvc.yaml and the code agree: each stage declares the paths it writes and the params sections it reads."""
import dataclasses
import re
from pathlib import Path

import yaml

from gptlab import paths
from gptlab.config import PIPELINE_MODELS, EvaluateConfig, SFTConfig
from gptlab.launch import PER_MODEL, STAGES
from gptlab.train import PLOTS_ONLY, TIMING

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def outs(stage: str) -> set[str]:
    spec = DVC["stages"][stage]
    return {next(iter(o)) if isinstance(o, dict) else o for o in spec.get("do", spec)["outs"]}


def test_stage_order_and_launch():
    assert list(DVC["stages"]) == ["check", "tokenize", "pretrain", "sft", "ref_logps", "dpo", "evaluate"]
    assert tuple(DVC["stages"]) == STAGES  # what `gptlab run` accepts
    for name, stage in DVC["stages"].items():
        stage = stage.get("do", stage)
        assert stage["cmd"] == f"gptlab run {name}" + ("@${key}" if name == PER_MODEL else "")
        assert f"stages/{name}.py" in stage["deps"]


def test_one_evaluate_stage_per_model_from_params():
    """foreach over evaluate.models: each model is its own stage, depending on its folder only, and on every
    evaluate key but `models` (adding a model must not rescore the others)."""
    spec = DVC["stages"]["evaluate"]
    assert spec["foreach"] == "${evaluate.models}"
    do = spec["do"]
    assert "${item}" in do["deps"] and not any("checkpoints" in d for d in do["deps"])
    keys = {p.split(".", 1)[1] for p in do["params"] if p.startswith("evaluate.")}
    assert keys == {f.name for f in dataclasses.fields(EvaluateConfig)} - {"models"}
    assert "evaluate" not in do["params"] and "dpo" not in do["params"]  # a beta sweep does not rescore pretrain
    assert [next(iter(m)) for m in do["metrics"]] == ["metrics/evaluate/${key}/metrics.json"]
    assert EvaluateConfig().models == PIPELINE_MODELS  # what the comparison plot lists
    plotted = DVC["plots"][0]["evaluation"]["y"]
    assert list(plotted) == [f"metrics/evaluate/{name}/scores.json" for name in PIPELINE_MODELS]


def test_check_runs_first_on_any_params_change_and_everything_waits_for_it():
    check = DVC["stages"]["check"]
    assert check["params"] == [{"params.yaml": None}]  # the whole file: unknown top-level keys too
    assert outs("check") == {str(paths.PARAMS_CHECKED), *(str(paths.inputs_file(s)) for s in paths.INPUT_STAGES)}
    for name in STAGES[1:]:
        assert str(paths.PARAMS_CHECKED) in DVC["stages"][name].get("do", DVC["stages"][name])["deps"], name


def test_tokenize_outs_are_the_paths_the_code_writes():
    written = {paths.TOKENIZER, paths.SHARDS, paths.SFT_TRAIN, paths.SFT_HELDOUT,
               paths.PREFS_TRAIN, paths.PREFS_HELDOUT, paths.MC_EVAL, paths.DATA_INFO}
    assert outs("tokenize") == {str(p) for p in written}


def test_training_stages_cache_checkpoints_and_keep_metrics_in_git():
    for stage, parent in (("pretrain", None), ("sft", "pretrain"), ("dpo", "sft")):
        spec = DVC["stages"][stage]
        assert str(paths.checkpoint_dir(stage)) in outs(stage)
        assert {"metrics/" + stage: {"persist": True, "cache": False}} in spec["outs"]
        if stage == "sft":  # its start point, whichever params name: the pretrain checkpoint by default
            assert "${sft.init}" in spec["deps"] and SFTConfig().init == str(paths.checkpoint_dir(parent))
        elif parent:
            assert str(paths.checkpoint_dir(parent)) in spec["deps"]
        assert stage in spec["params"] and "seed" in spec["params"]


def test_params_sections_so_exp_run_reruns_only_downstream():
    params = {name: set(stage.get("do", stage)["params"]) for name, stage in DVC["stages"].items() if name != "check"}
    deps = {name: stage.get("do", stage)["deps"] for name, stage in DVC["stages"].items()}
    assert params["tokenize"] == {"seed", "preset", "data", "tokenizer"}
    assert params["pretrain"] == {"seed", "preset", "model", "pretrain"}
    # a preset's file is a params file too: every stage that reads params depends on it
    assert all("preset" in p for p in params.values())
    assert all("configs/presets" in deps[name] for name in params)
    assert "sft" not in params["pretrain"] | params["tokenize"]


def test_top_level_metrics_and_plots():
    assert set(DVC["metrics"]) == {f"metrics/{s}/metrics.json" for s in ("pretrain", "sft", "dpo")}
    plots = {next(iter(p)): next(iter(p.values())) for p in DVC["plots"]}
    assert list(plots) == ["evaluation", "pretrain_loss", "pretrain_multiple_choice", "learning_rate", "throughput",
                           "sft_loss", "dpo_loss", "dpo_rewards"]
    # every plot is titled and labelled; the training curves run over steps
    assert all(p["title"] and p["x_label"] and p["y_label"] for p in plots.values())
    assert all(p["x"] == "step" for name, p in plots.items() if name != "evaluation")
    # each series is a file dvclive writes, under the column dvclive names after the metric's last part
    series = {f: col for name, p in plots.items() if name != "evaluation" for f, col in p["y"].items()}
    timing = {f: col for f, col in series.items() if f.startswith(f"{paths.TIMING}/")}
    for f, col in series.items():
        if f not in timing:
            assert re.fullmatch(r"metrics/(pretrain|sft|dpo)/plots/metrics/(.+/)?" + re.escape(col) + r"\.tsv", f), f
    # timings live outside every stage's outputs (a rerun must not dirty git or dvc.lock) and are git-ignored
    assert timing == {str(paths.timing_file(s)): "tokens_per_sec" for s in ("pretrain", "sft", "dpo")}
    assert set(TIMING) >= set(timing.values())
    assert f"/{paths.TIMING}/" in (ROOT / ".gitignore").read_text().split()
    outs_all = {o for name in DVC["stages"] for o in outs(name)}
    assert not any(str(paths.TIMING).startswith(o) or o.startswith(str(paths.TIMING)) for o in outs_all)
    for stage in ("pretrain", "sft", "dpo"):  # the learning-rate schedule and loss of every training stage
        assert series[f"metrics/{stage}/plots/metrics/lr.tsv"] == "lr"
        assert series[f"metrics/{stage}/plots/metrics/loss.tsv"] == "loss"
    assert series["metrics/pretrain/plots/metrics/entropy_floor.tsv"] == "entropy_floor"  # the reference line
    # the metrics the train loop keeps out of metrics.json are still plotted
    assert set(PLOTS_ONLY) <= set(series.values())


def test_reference_log_probs_are_their_own_stage_so_a_beta_or_loss_sweep_reuses_them():
    ref, dpo = DVC["stages"]["ref_logps"], DVC["stages"]["dpo"]
    assert outs("ref_logps") == {str(paths.REF_LOGPS)}
    assert str(paths.REF_LOGPS) in dpo["deps"] and "checkpoints/sft" in ref["deps"]
    assert {"dpo.data", "dpo.max_prompt_tokens", "dpo.micro_batch_size"} <= set(ref["params"])
    assert "dpo" not in ref["params"]  # not the whole section: beta, loss_type, lr ... do not rerun it


def test_every_output_stays_in_place_until_its_stage_succeeds():
    """persist: true everywhere: DVC deletes no output before running its stage (tests/test_failures.py runs
    stages that fail on input only they can find, and the workspace is unchanged)."""
    for name, stage in DVC["stages"].items():
        stage = stage.get("do", stage)
        for out in stage["outs"] + stage.get("metrics", []):
            assert isinstance(out, dict) and next(iter(out.values())).get("persist") is True, (name, out)


def test_fine_tuning_stages_depend_on_checks_list_of_the_finetune_files_they_read():
    """check (which depends on the whole finetune/ folder) lists each stage's files with their SHA-256; the
    stages depend on their list, so a file only dpo reads does not rerun sft (tests/test_pipeline.py)."""
    from gptlab.config import FINETUNE_DIR, MODELS_DIR

    assert {FINETUNE_DIR, MODELS_DIR} <= set(DVC["stages"]["check"]["deps"])  # the files and model folders checked
    for stage, listed in (("sft", "sft"), ("ref_logps", "dpo"), ("dpo", "dpo"), ("evaluate", "evaluate")):
        deps = DVC["stages"][stage].get("do", DVC["stages"][stage])["deps"]
        assert str(paths.inputs_file(listed)) in deps and FINETUNE_DIR not in deps, stage
    for folder in (FINETUNE_DIR, MODELS_DIR):  # dvc needs a dependency to exist
        assert (ROOT / folder).is_dir() and any((ROOT / folder).iterdir())


def test_tokenize_depends_on_the_corpus_folder_and_it_is_committed():
    assert "corpus" in DVC["stages"]["tokenize"]["deps"]
    assert (ROOT / "corpus").is_dir() and any((ROOT / "corpus").iterdir())  # dvc needs the dep to exist


# --- dependencies are the stages' import closure ------------------------------------------------------------

def _module_file(name: str) -> Path | None:
    """The project file that defines module `name` (stages.* or gptlab.*), or None for other packages."""
    parts = name.split(".")
    if parts[0] == "gptlab":
        base = ROOT / "src" / Path(*parts)
    elif parts[0] == "stages":
        base = ROOT / Path(*parts)
    else:
        return None
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(file: Path) -> str:
    rel = file.relative_to(ROOT / "src" if file.is_relative_to(ROOT / "src") else ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imported(file: Path) -> set[Path]:
    """Project files that `file` imports anywhere (top level or inside a function), with the packages on the way
    (importing gptlab.data.world runs gptlab/data/__init__.py too)."""
    import ast

    package = _module_name(file).split(".")
    if file.name != "__init__.py":
        package = package[:-1]
    names: list[str] = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
            base = base.strip(".")
            names += [base] + [f"{base}.{a.name}" for a in node.names]  # `from gptlab import paths` is a module
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            f = _module_file(".".join(parts[:i]))
            if f is not None:
                found.add(f)
    return found


def import_closure(module: str) -> set[Path]:
    todo, seen = [_module_file(module)], set()
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += _imported(f) - seen
    return seen


def _covered(file: Path, deps: list[str]) -> bool:
    rel = file.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_import_closure_finds_what_a_stage_runs():
    """The closure this test relies on sees top-level, relative and in-function imports and the packages."""
    pretrain = {f.relative_to(ROOT).as_posix() for f in import_closure("stages.pretrain")}
    assert {"stages/pretrain.py", "src/gptlab/model.py", "src/gptlab/train.py", "src/gptlab/evaluation.py",
            "src/gptlab/tokenizer.py", "src/gptlab/config.py", "src/gptlab/data/__init__.py"} <= pretrain
    assert not any(p.startswith("tests/") for p in pretrain)
    assert not _covered(ROOT / "src/gptlab/model.py", ["src/gptlab/data", "stages/pretrain.py"])


def test_every_stage_depends_on_every_project_file_it_imports():
    """A file a stage imports can change its outputs: if dvc.yaml missed it, `dvc repro` would call the stage
    up to date over numbers the code no longer produces. Only the launcher is allowed out: `gptlab run` reaches
    the stage through these, and they set no number (the stage module is run with `accelerate launch -m`)."""
    launcher = {ROOT / "src/gptlab/cli.py", ROOT / "src/gptlab/launch.py"}
    missing = []
    for name, spec in DVC["stages"].items():
        spec = spec.get("do", spec)
        for f in sorted(import_closure(f"stages.{name}") - launcher):
            if not _covered(f, [str(d) for d in spec["deps"]]):
                missing.append(f"{name}: {f.relative_to(ROOT)}")
    assert not missing, "dvc.yaml misses these stage dependencies (stage: file):\n" + "\n".join(missing)
