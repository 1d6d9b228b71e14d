"""check: validate all of params.yaml before any stage that could lose its outputs runs.

DVC deletes a stage's outputs just before running it, so a mistake caught inside pretrain would already
have cost the old checkpoint and metrics (and, their metrics being kept in git, DVC's run-cache could not
bring them back: the stage would retrain). This stage runs first, on every change to params.yaml (it tracks
the whole file, so a misspelt top-level section such as `pretrian:` is reported too), and checks what can
be checked before any work: every key and type, the batch geometry against this launch's process count, and
model.block_size against the current data when data/ was made with the current data params. Its output
never changes, so passing it reruns nothing downstream.
"""
from __future__ import annotations

from pathlib import Path

from gptlab import paths
from gptlab.checkpoint import META_FILE
from gptlab.config import PIPELINE_MODELS, ConfigError, preset_choices, preset_path
from gptlab.data.finetune import check_files
from gptlab.data.records import INFO_FIELDS
from gptlab.data.sources import check_sources
from gptlab.data.world import check_world
from gptlab.fileio import atomic_write_text, read_json
from gptlab.stage import check_context, data_params, run, say, start

PASSED = "params.yaml passed the checks of stages/check.py\n"  # constant: downstream stages never rerun for it


def check_eval_models(models: dict[str, str]) -> None:
    """evaluate.models folders under models/ exist and hold a checkpoint or a GPT-2 (the pipeline's own
    checkpoints are made later)."""
    from gptlab.hf_gpt2 import check_folder_tokenizer, is_hf_folder, read_hf_config

    for name, folder in models.items():
        path, key = Path(folder), f"evaluate.models.{name}"
        if folder in PIPELINE_MODELS.values() or (path / META_FILE).is_file():
            continue
        if not is_hf_folder(path):
            what = "not found" if not path.exists() else f"holds neither {META_FILE} (a gptlab checkpoint) nor config.json"
            raise ConfigError(f"{key}: {folder} {what}; put the model there (e.g. `gptlab export-hf CHECKPOINT "
                              f"{folder}`) or remove the entry")
        read_hf_config(path / "config.json")
        check_folder_tokenizer(path)


def main() -> None:
    params, accelerator = start("check")
    check_world(params.data.world)  # what the world's templates and names allow
    # local files: globs that match nothing, unreadable files, missing text fields (hub sources need the
    # network: tokenize checks those, still before any work)
    check_sources(params.data.sources, Path("."), None, kinds=("files",))
    # fine-tuning data files (their first record against the schema) and an sft.init folder's config.json
    for key, data in (("sft.data", params.sft.data), ("dpo.data", params.dpo.data)):
        say(accelerator, f"[check] {key}: {check_files(data, key)}")
    check_eval_models(params.evaluate.models)
    T, n = params.model.block_size, accelerator.num_processes
    tuned_T = T  # the context sft and dpo inherit: pretrain's, or the GPT-2 folder's
    if params.sft.init != PIPELINE_MODELS["pretrain"]:
        from gptlab.hf_gpt2 import check_folder_tokenizer, read_hf_config

        tuned_T = read_hf_config(Path(params.sft.init) / "config.json").block_size
        check_folder_tokenizer(Path(params.sft.init))
    params.pretrain.grad_accum_steps(T, n, "pretrain")
    params.sft.grad_accum_steps(tuned_T, n, "sft")
    params.dpo.grad_accum_steps(2 * tuned_T, n, "dpo")  # chosen and rejected: two sequences per pair
    checked = "params"
    if paths.DATA_INFO.exists():
        info = read_json(paths.DATA_INFO, INFO_FIELDS)
        if info.get("made_with") == data_params(params):  # else tokenize reruns and pretrain checks then
            check_context(T, info)
            checked += f", model.block_size against {paths.DATA_INFO}"
    if params.preset:
        taken, kept = preset_choices()
        say(accelerator, f"[check] preset {params.preset}: {len(taken)} value(s) from {preset_path(params.preset)}"
            + (f"; params.yaml's own values win for {', '.join(f'{k}={v}' for k, v in kept.items())}" if kept else ""))
    if accelerator.is_main_process:
        atomic_write_text(paths.PARAMS_CHECKED, PASSED)
    say(accelerator, f"[check] ok: {checked}, batch geometry for {n} process(es)")


if __name__ == "__main__":
    run(main)
