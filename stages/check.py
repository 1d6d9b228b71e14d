"""check: validate all of params.yaml before any other stage runs, and list each stage's local input files.

It runs first, on every change to params.yaml (it tracks the whole file, so a misspelt top-level section
such as `pretrian:` is reported too), and checks what can be checked before any work: every key and type,
the batch geometry against this launch's process count, model.block_size against the current data when
data/ was made with the current data params, local data files' first records, model folders' JSON. A
rejected change costs nothing: no stage ran. (Every output is also `persist: true` in dvc.yaml, so what only
a stage can find, a bad record past the first, no network, damaged weights, leaves the outputs as they were.)

Its outputs: data/params_checked, constant, so passing reruns nothing downstream; and data/inputs/<stage>.json,
the finetune/ files sft, dpo and evaluate read with their SHA-256, which those stages depend on instead of
the whole folder: a file added for dpo reruns dpo, not sft.
"""
from __future__ import annotations

import json
from pathlib import Path

from gptlab import paths
from gptlab.checkpoint import check_model_folder
from gptlab.config import FINETUNE_DIR, PIPELINE_MODELS, ConfigError, GptlabError, preset_choices, preset_path
from gptlab.data.finetune import check_files, input_files
from gptlab.data.records import INFO_FIELDS
from gptlab.data.sources import check_sources
from gptlab.data.world import check_world
from gptlab.fileio import atomic_write_text, file_sha256, read_json
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


def local_files(key: str, found: list[Path]) -> list[Path]:
    """`found`, each under finetune/: DVC tracks that folder, so a file elsewhere could change unseen."""
    root = Path(FINETUNE_DIR).resolve()
    for path in found:
        if not path.resolve().is_relative_to(root):
            raise ConfigError(f"{key}: {path} is outside {FINETUNE_DIR}/, where DVC tracks local data (a change "
                              f"to it would not rerun the stages that read it); move it under {FINETUNE_DIR}/")
    return found


def stage_inputs(params) -> dict[str, list[Path]]:
    """The local files each stage reads that no stage writes: sft.data's; dpo.data's (ref_logps and dpo read
    them); for evaluate, both held-out sources and a local evaluate.mc_path folder (a hub name is no folder)."""
    def data_files(cfg, key):  # config.py keeps their paths under finetune/
        return [] if cfg.format == "world" else input_files(cfg, key)

    sft, dpo = data_files(params.sft.data, "sft.data"), data_files(params.dpo.data, "dpo.data")
    mc = Path(params.evaluate.mc_path) if params.evaluate.mc_path else None
    mc_files = [] if mc is None or not mc.is_dir() else \
        local_files("evaluate.mc_path", sorted(f for f in mc.rglob("*") if f.is_file()))
    return {"sft": sft, "dpo": dpo, "evaluate": sorted(set(sft + dpo + mc_files))}


def write_inputs(files: dict[str, list[Path]]) -> None:
    """data/inputs/<stage>.json: what each stage depends on in dvc.yaml instead of the whole finetune/ folder,
    so a file only dpo reads reruns dpo, not sft (and its content, by hash, still reruns what reads it)."""
    for stage in paths.INPUT_STAGES:
        listed = {str(f): file_sha256(f) for f in files[stage]}
        atomic_write_text(paths.inputs_file(stage), json.dumps({"files": listed}, indent=1) + "\n")


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
    inputs = stage_inputs(params)
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
        write_inputs(inputs)
    say(accelerator, f"[check] ok: {checked}, batch geometry for {n} process(es)")


if __name__ == "__main__":
    run(main)
