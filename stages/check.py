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
from gptlab.checkpoint import check_model_folder
from gptlab.config import PIPELINE_MODELS, ConfigError, GptlabError, preset_choices, preset_path
from gptlab.data.finetune import check_files
from gptlab.data.records import INFO_FIELDS
from gptlab.data.sources import check_sources
from gptlab.data.world import check_world
from gptlab.fileio import atomic_write_text, read_json
from gptlab.stage import check_context, data_params, run, say, start

PASSED = "params.yaml passed the checks of stages/check.py\n"  # constant: downstream stages never rerun for it


def check_model(key: str, folder: str) -> int | None:
    """A model folder a param names, checked as gptlab.checkpoint.load_model will open it (its JSON files only):
    its context length; None for the pipeline's own checkpoints, which are made later."""
    if folder in PIPELINE_MODELS.values():
        return None
    try:
        return check_model_folder(folder).config.block_size
    except GptlabError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_eval_models(models: dict[str, str]) -> None:
    """evaluate.models folders under models/ exist and hold a checkpoint or a GPT-2."""
    for name, folder in models.items():
        check_model(f"evaluate.models.{name}", folder)


def main() -> None:
    params, accelerator = start("check")
    check_world(params.data.world)  # what the world's templates and names allow
    # local files: globs that match nothing, unreadable files, missing text fields (hub sources need the
    # network: tokenize checks those, still before any work)
    check_sources(params.data.sources, Path("."), None, kinds=("files",))
    # fine-tuning data files (their first record against the schema); below, the model folders params name
    for key, data in (("sft.data", params.sft.data), ("dpo.data", params.dpo.data)):
        say(accelerator, f"[check] {key}: {check_files(data, key)}")
    check_eval_models(params.evaluate.models)
    T, n = params.model.block_size, accelerator.num_processes
    tuned_T = check_model("sft.init", params.sft.init)  # the context sft and dpo inherit: the start point's,
    tuned_T = T if tuned_T is None else tuned_T  # or (from checkpoints/pretrain) model.block_size
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
