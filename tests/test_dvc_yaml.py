"""dvc.yaml and the code agree: each stage declares the paths it writes and the params sections it reads."""
from pathlib import Path

import yaml

from gptlab import paths
from gptlab.launch import STAGES

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def outs(stage: str) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for o in DVC["stages"][stage]["outs"]}


def test_stage_order_and_launch():
    assert list(DVC["stages"]) == ["check", "tokenize", "pretrain", "sft", "ref_logps", "dpo", "evaluate"]
    assert tuple(DVC["stages"]) == STAGES  # what `gptlab run` accepts
    for name, stage in DVC["stages"].items():
        assert stage["cmd"] == f"gptlab run {name}"
        assert f"stages/{name}.py" in stage["deps"]


def test_check_runs_first_on_any_params_change_and_everything_waits_for_it():
    check = DVC["stages"]["check"]
    assert check["params"] == [{"params.yaml": None}]  # the whole file: unknown top-level keys too
    assert check["outs"] == [{str(paths.PARAMS_CHECKED): {"persist": True}}]  # never deleted before a run
    for name in STAGES[1:]:
        assert str(paths.PARAMS_CHECKED) in DVC["stages"][name]["deps"], name


def test_tokenize_outs_are_the_paths_the_code_writes():
    written = {paths.TOKENIZER, paths.SHARDS, paths.SFT_TRAIN, paths.SFT_HELDOUT,
               paths.PREFS_TRAIN, paths.PREFS_HELDOUT, paths.MC_EVAL, paths.DATA_INFO}
    assert outs("tokenize") == {str(p) for p in written}


def test_training_stages_cache_checkpoints_and_keep_metrics_in_git():
    for stage, parent in (("pretrain", None), ("sft", "pretrain"), ("dpo", "sft")):
        spec = DVC["stages"][stage]
        assert str(paths.checkpoint_dir(stage)) in outs(stage)
        assert {"metrics/" + stage: {"cache": False}} in spec["outs"]
        if parent:
            assert str(paths.checkpoint_dir(parent)) in spec["deps"]
        assert stage in spec["params"] and "seed" in spec["params"]


def test_params_sections_so_exp_run_reruns_only_downstream():
    params = {name: set(stage["params"]) for name, stage in DVC["stages"].items() if name != "check"}
    assert params["tokenize"] == {"seed", "preset", "data", "tokenizer"}
    assert params["pretrain"] == {"seed", "preset", "model", "pretrain"}
    # a preset's file is a params file too: every stage that reads params depends on it
    assert all("preset" in p for p in params.values())
    assert all("configs/presets" in DVC["stages"][name]["deps"] for name in params)
    assert "sft" not in params["pretrain"] | params["tokenize"]
    assert {"evaluate", "dpo.beta"} <= params["evaluate"]


def test_top_level_metrics_and_plots():
    assert set(DVC["metrics"]) == {f"metrics/{s}/metrics.json" for s in ("pretrain", "sft", "dpo", "evaluate")}
    plots = {next(iter(p)): next(iter(p.values())) for p in DVC["plots"]}
    assert list(plots) == ["metrics/pretrain/plots/metrics", "sft_loss", "dpo_loss", "dpo_rewards"]
    # per-step loss of sft and dpo, and TRL's reward statistics, from the files dvclive writes for those names
    series = {f: col for name in ("sft_loss", "dpo_loss", "dpo_rewards") for f, col in plots[name]["y"].items()}
    for stage in ("sft", "dpo"):
        assert series[f"metrics/{stage}/plots/metrics/loss.tsv"] == "loss"
    for name in ("rewards/margins", "rewards/accuracies"):
        assert series[f"metrics/dpo/plots/metrics/{name}.tsv"] == name.split("/")[1]  # dvclive's column
    assert all(plots[n]["title"] and plots[n]["x"] == "step" for n in ("sft_loss", "dpo_loss", "dpo_rewards"))


def test_reference_log_probs_are_their_own_stage_so_a_beta_or_loss_sweep_reuses_them():
    ref, dpo = DVC["stages"]["ref_logps"], DVC["stages"]["dpo"]
    assert outs("ref_logps") == {str(paths.REF_LOGPS)}
    assert str(paths.REF_LOGPS) in dpo["deps"] and "checkpoints/sft" in ref["deps"]
    assert {"dpo.data", "dpo.max_prompt_tokens", "dpo.micro_batch_size"} <= set(ref["params"])
    assert "dpo" not in ref["params"]  # not the whole section: beta, loss_type, lr ... do not rerun it


def test_fine_tuning_stages_depend_on_the_folders_their_local_inputs_live_in():
    from gptlab.config import FINETUNE_DIR, MODELS_DIR

    for stage in ("sft", "ref_logps", "dpo"):
        assert FINETUNE_DIR in DVC["stages"][stage]["deps"], stage
    assert MODELS_DIR in DVC["stages"]["sft"]["deps"]
    for folder in (FINETUNE_DIR, MODELS_DIR):  # dvc needs a dependency to exist
        assert (ROOT / folder).is_dir() and any((ROOT / folder).iterdir())


def test_tokenize_depends_on_the_corpus_folder_and_it_is_committed():
    assert "corpus" in DVC["stages"]["tokenize"]["deps"]
    assert (ROOT / "corpus").is_dir() and any((ROOT / "corpus").iterdir())  # dvc needs the dep to exist
