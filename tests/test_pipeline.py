"""End to end: the real DAG with real DVC, git and accelerate, on tiny params in a temporary repo."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import project_env, sh

pytestmark = pytest.mark.slow
MODELS = ("pretrain", "sft", "dpo")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_repro_writes_every_output_and_metric(tiny_project):
    p = tiny_project
    for name in ("tokenizer/tokenizer.json", "shards/train_000000.bin", "shards/val_000000.bin", "sft_train.jsonl", "sft_heldout.jsonl",
                 "prefs_train.jsonl", "prefs_heldout.jsonl", "mc_eval.jsonl", "info.json"):
        assert (p / "data" / name).exists(), name
    for stage in MODELS:
        ckpt = p / "checkpoints" / stage
        meta = json.loads((ckpt / "meta.json").read_text())
        assert (ckpt / "model.safetensors").stat().st_size > 0 and (ckpt / "tokenizer" / "tokenizer.json").exists()
        assert meta["stage"] == stage and meta["step"] == 4 and meta["model"]["n_embd"] == 32
        live = json.loads((p / "metrics" / stage / "metrics.json").read_text())
        assert live["step"] == 4 and "val_loss" in live and "loss" in live
        # results only: timings and the lr are in the plots, not in what `dvc metrics diff` compares
        assert not {"lr", "tokens_per_sec", "ms_per_step"} & set(live)
        # timings go to their own git-ignored file, outside the stage's outputs (a rerun must not dirty git)
        assert not (p / "metrics" / stage / "plots" / "metrics" / "tokens_per_sec.tsv").exists()
        timing = (p / "metrics" / "timing" / f"{stage}.tsv").read_text().splitlines()
        assert timing[0] == "step\ttokens_per_sec\tms_per_step" and [r.split("\t")[0] for r in timing[1:]] == ["1", "2", "3", "4"]
        assert (p / "metrics" / stage / "plots" / "metrics" / "loss.tsv").exists()
    dpo_live = json.loads((p / "metrics" / "dpo" / "metrics.json").read_text())
    assert {"chosen", "rejected", "accuracies", "margins"} <= set(dpo_live["rewards"])
    assert {"chosen", "rejected"} <= set(dpo_live["logps"])

    ev = {stage: json.loads((p / "metrics" / "evaluate" / stage / "metrics.json").read_text()) for stage in MODELS}
    for stage in MODELS:
        m = ev[stage]
        for key in ("val_loss", "perplexity", "bits_per_byte", "top1_acc", "top5_acc", "exact_match",
                    "exact_match_stderr", "preferred_style", "pref_acc", "pref_acc_stderr"):
            assert key in m, (stage, key)
        for convention in ("mc_lmeval", "mc_llmc"):
            assert set(m[convention]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
            assert 0 <= m[convention]["acc"] <= 1
        assert 0 <= m["exact_match"] <= 1 and m["perplexity"] > 1 and m["top1_acc"] <= m["top5_acc"]
        # the weights scored are the checkpoint's
        assert m["weights_sha256"] == json.loads((p / "checkpoints" / stage / "meta.json").read_text())["weights"]["sha256"]
        # the comparison plot's rows are the same figures
        rows = json.loads((p / "metrics" / "evaluate" / stage / "scores.json").read_text())
        assert {r["metric"]: r["value"] for r in rows}["pref_acc"] == m["pref_acc"]
        samples = (p / "metrics" / "evaluate" / stage / "samples.md").read_text()
        assert samples.startswith(f"# {stage} (checkpoints/{stage})")
    assert "reward_acc" in ev["dpo"] and "reward_margin" in ev["dpo"] and "reward_acc" not in ev["sft"]
    pretrain_live = json.loads((p / "metrics" / "pretrain" / "metrics.json").read_text())
    assert 0 < pretrain_live["entropy_floor"] < pretrain_live["val_loss"]
    assert set(pretrain_live["mc_llmc"]) == {"acc", "acc_norm"}

    # provenance: the dpo checkpoint names its ancestors by hash; no git state (it would make identical runs at
    # two commits differ: the commit that made a checkpoint is the one whose dvc.lock records it)
    dpo_meta = json.loads((p / "checkpoints" / "dpo" / "meta.json").read_text())
    assert [(a["stage"], a["weights_sha256"]) for a in dpo_meta["lineage"]] == [
        (s, json.loads((p / "checkpoints" / s / "meta.json").read_text())["weights"]["sha256"]) for s in ("pretrain", "sft")]
    assert "git" not in dpo_meta and not any("git" in a for a in dpo_meta["lineage"])
    info = sh("gptlab info checkpoints/dpo", p).stdout
    assert info.count("(same weights here)") == 2

    lock = (p / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in ("tokenize", *MODELS, *(f"evaluate@{m}" for m in MODELS)))
    assert "up to date" in sh("dvc status", p).stdout


def test_metrics_show_and_plots_show_read_the_declared_files(tiny_project):
    shown = json.loads(sh("dvc metrics show --json", tiny_project).stdout)
    text = json.dumps(shown)
    assert "metrics/evaluate/dpo/metrics.json" in text and "exact_match" in text and "val_loss" in text
    plots = json.loads(sh("dvc plots show --json", tiny_project).stdout)["data"]
    declared = [next(iter(p)) for p in yaml.safe_load((tiny_project / "dvc.yaml").read_text())["plots"]]
    assert set(plots) == set(declared)  # nothing undeclared, nothing missing
    for name in declared:  # every series each plot declares has rows (dvc names a series file::column)
        spec = next(p[name] for p in yaml.safe_load((tiny_project / "dvc.yaml").read_text())["plots"] if name in p)
        rows = plots[name][0]["content"]["data"]["values"]
        if name == "evaluation":  # one panel per model file, a bar per accuracy
            assert {r["filename"] for r in rows} == {f"{m}/scores.json" for m in MODELS}
            assert {"exact_match", "pref_acc", "reward_acc", "mc_llmc acc_norm"} <= {r["metric"] for r in rows}
            continue
        # dvc labels a series file::column, or by its file alone when every file has the same column
        series = {r.get("filename::field", r.get("filename")) for r in rows}
        assert len(series) == len(spec["y"]), (name, series)


def test_push_then_pull_into_a_fresh_clone_restores_identical_checkpoints(tiny_project):
    p = tiny_project
    sh("git add -A && git commit -qm 'run'", p)
    assert "pushed" in sh("dvc push", p).stdout.lower()
    clone = p.parent / "clone"
    sh(f"git clone -q {p} {clone}", p.parent, env=project_env(p))
    assert not (clone / "checkpoints" / "pretrain").exists()
    sh("dvc pull", clone)
    for stage in MODELS:
        assert digest(clone / "checkpoints" / stage) == digest(p / "checkpoints" / stage)
    assert "up to date" in sh("dvc status", clone).stdout


def test_a_fresh_clone_reproduces_the_same_bytes_and_stays_clean(tiny_project):
    """`dvc repro` in a fresh clone of a committed run (no cache, no remote) reruns every stage; where every
    result is byte-identical, git sees no change at all: no dvc.lock edit, no timing series, no meta.json commit."""
    p = tiny_project
    sh("git add -A && (git diff --cached --quiet || git commit -qm run)", p)
    clone = p.parent / "fresh-clone"
    sh(f"git clone -q {p} {clone}", p.parent, env=project_env(p))
    try:
        log = sh("dvc repro", clone)
        assert "Running stage 'pretrain'" in log.stdout + log.stderr
        assert sh("git status --porcelain", clone).stdout == ""
        for stage in MODELS:
            assert digest(clone / "checkpoints" / stage) == digest(p / "checkpoints" / stage)
        assert (clone / "metrics" / "timing" / "pretrain.tsv").is_file()  # written, and ignored by git
    finally:
        shutil.rmtree(clone)


def test_exp_run_on_an_sft_param_reruns_only_downstream_stages(tiny_project):
    p = tiny_project
    before = {s: digest(p / "checkpoints" / s) for s in MODELS}
    out = sh("dvc exp run -S sft.lr=5.0e-4", p)
    log = out.stdout + out.stderr
    for stage in ("tokenize", "pretrain"):
        assert f"Running stage '{stage}'" not in log
    for stage in ("sft", "dpo", "evaluate@sft", "evaluate@dpo"):
        assert f"Running stage '{stage}'" in log
    assert digest(p / "checkpoints" / "pretrain") == before["pretrain"]
    assert digest(p / "checkpoints" / "sft") != before["sft"]
    sh("git checkout -q -- . && dvc checkout -q", p)  # back to the committed run for other tests


def test_a_dpo_only_experiment_rescores_only_the_dpo_model(tiny_project):
    p = tiny_project
    log = sh("dvc exp run -S dpo.beta=0.2", p)
    log = log.stdout + log.stderr
    assert "Running stage 'dpo'" in log and "Running stage 'evaluate@dpo'" in log
    for stage in ("pretrain", "sft", "ref_logps", "evaluate@pretrain", "evaluate@sft"):
        assert f"Running stage '{stage}'" not in log, stage
    # the docs' compact comparison: the kept results and params, a row for the baseline and the experiment
    guide = (Path(__file__).resolve().parents[1] / "docs" / "04-experiments-and-sharing.md").read_text()
    recipe = next(line for line in guide.splitlines() if line.startswith("dvc exp show --hide-workspace"))
    table = sh(f"COLUMNS=400 {recipe}", p).stdout
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    assert header == ["Experiment", "metrics/evaluate/dpo/metrics.json:exact_match",
                      "metrics/evaluate/dpo/metrics.json:exact_match_stderr", "metrics/evaluate/dpo/metrics.json:pref_acc",
                      "reward_acc", "reward_acc_stderr", "sft.lr", "dpo.lr", "dpo.beta", "dpo.loss_type"]
    rows = [line.split() for line in table.splitlines() if line.rstrip().endswith("sigmoid")]
    # dpo.beta of the baseline first, then the experiments' (earlier tests' experiments too)
    assert rows[0][-2] == "0.1" and "0.2" in [r[-2] for r in rows[1:]]
    sh("git checkout -q -- . && dvc checkout -q", p)


def changed_stages(project: Path) -> set[str]:
    """The stages `dvc status` says would rerun, once check has listed each stage's files (data/inputs)."""
    sh("dvc repro check", project)
    status = sh("dvc status --json", project).stdout
    return set(json.loads(status)) - {"check"}


def test_a_finetune_file_reruns_only_the_stages_that_read_it(tiny_project):
    """Stages depend on check's list of the finetune/ files they read, not on the whole folder."""
    p = tiny_project
    text = (p / "params.yaml").read_text()
    rows = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(8)]
    try:
        (p / "finetune" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert changed_stages(p) == set()  # a file no stage reads yet
        params = yaml.safe_load(text)
        params["dpo"]["data"] = {**params["dpo"]["data"], "format": "preference", "paths": ["finetune/prefs.jsonl"],
                                  "val_share": 0.25}
        (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        reading = {"ref_logps", "dpo", "evaluate@pretrain", "evaluate@sft", "evaluate@dpo"}
        assert changed_stages(p) == reading  # dpo.data is now that file: sft does not read it
        with open(p / "finetune" / "prefs.jsonl", "a") as f:
            f.write(json.dumps(rows[0]) + "\n")
        assert changed_stages(p) == reading
        outside = p / "prefs_elsewhere.jsonl"
        shutil.copy(p / "finetune" / "prefs.jsonl", outside)
        params["dpo"]["data"]["paths"] = [outside.name]
        (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = sh("dvc repro check", p, check=False)
        assert out.returncode != 0 and "dpo.data.paths: 'prefs_elsewhere.jsonl' is not under finetune/" in out.stderr
    finally:
        (p / "params.yaml").write_text(text)
        (p / "finetune" / "prefs.jsonl").unlink(missing_ok=True)
        (p / "prefs_elsewhere.jsonl").unlink(missing_ok=True)
    assert changed_stages(p) == set()


def test_a_model_added_to_evaluate_models_is_scored_alone_and_as_itself(tiny_project):
    """A checkpoint copied under models/ and listed in evaluate.models gets its own stage: nothing else reruns,
    and it scores exactly what the original scores (same weights, same hash, same numbers)."""
    p = tiny_project
    shutil.copytree(p / "checkpoints" / "sft", p / "models" / "sft-copy")
    try:
        out = sh("dvc exp run -S '+evaluate.models.sft_copy=models/sft-copy'", p)
        log = out.stdout + out.stderr
        assert "Running stage 'evaluate@sft_copy'" in log
        for stage in ("pretrain", "sft", "dpo", "evaluate@pretrain", "evaluate@sft", "evaluate@dpo"):
            assert f"Running stage '{stage}'" not in log, stage
        copy, original = (json.loads((p / "metrics" / "evaluate" / m / "metrics.json").read_text()) for m in ("sft_copy", "sft"))
        assert copy == original
    finally:
        shutil.rmtree(p / "models" / "sft-copy")
        sh("git checkout -q -- . && git clean -qfd metrics && dvc checkout -q", p)


def test_two_process_cpu_training_through_accelerate(tiny_project, tmp_path):
    p = tiny_project
    env = project_env(p)
    env["ACCELERATE_USE_CPU"] = "1"
    metrics = shutil.copytree(p / "metrics" / "pretrain", tmp_path / "metrics")  # not in DVC's cache
    try:
        out = sh("accelerate launch --multi_gpu --num_processes 2 -m stages.pretrain", p, env=env)
        log = out.stdout + out.stderr
        assert "2 process(es), DistributedType.MULTI_CPU" in log
        assert "grad_accum 1" in log  # tokens_per_step split over two ranks instead of two micro-steps
        assert json.loads((p / "checkpoints" / "pretrain" / "meta.json").read_text())["step"] == 4
        assert sum(line.startswith("step 4 | val_loss") for line in log.splitlines()) == 1  # main process logs
    finally:  # it trained outside DVC: put the pipeline's outputs back for the tests that share the project
        shutil.rmtree(p / "metrics" / "pretrain")
        shutil.copytree(metrics, p / "metrics" / "pretrain")
        sh("dvc checkout -q --force", p)
        assert "up to date" in sh("dvc status", p).stdout


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("pretrain", "lr", "2e-4", "error: params.yaml: pretrain.lr: expected a number, got the string '2e-4'"),
        # sft and dpo inherit block_size, so pretrain refuses one the fine-tuning data does not fit
        ("model", "block_size", 16, "error: model.block_size=16 fits 17 tokens but the longest sft/preference"),
    ],
)
def test_bad_input_fails_before_training_with_the_key_named(tiny_project, section, key, value, message):
    p = tiny_project
    text = (p / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params[section][key] = value
    try:
        (p / "params.yaml").write_text(yaml.safe_dump(params))
        out = sh("accelerate launch --config_file accelerate.yaml -m stages.pretrain", p, check=False)
        assert out.returncode != 0
        assert message in out.stderr
        assert "train:" not in out.stderr  # failed before any training started
    finally:
        (p / "params.yaml").write_text(text)
