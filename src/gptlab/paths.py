"""Where each stage reads and writes, relative to the project root. dvc.yaml declares the same paths
(tests/test_dvc_yaml.py checks they agree), so a stage never writes anything DVC does not track."""
from pathlib import Path

DATA = Path("data")
TOKENIZER = DATA / "tokenizer"
SHARDS = DATA / "shards"  # train_000000.bin ..., val_000000.bin ...: fixed-size token shards (data/shards.py)
SFT_TRAIN = DATA / "sft_train.jsonl"
SFT_HELDOUT = DATA / "sft_heldout.jsonl"
PREFS_TRAIN = DATA / "prefs_train.jsonl"
PREFS_HELDOUT = DATA / "prefs_heldout.jsonl"
MC_EVAL = DATA / "mc_eval.jsonl"
REF_LOGPS = DATA / "ref_logps"  # the sft model's log-probs of every preference pair (stages/ref_logps.py)
DATA_INFO = DATA / "info.json"  # corpus statistics, incl. the entropy floor in nats per token
PARAMS_CHECKED = DATA / "params_checked"  # the check stage's constant output: every stage depends on it
INPUTS = DATA / "inputs"  # check's list of the local files each stage reads, with their SHA-256 (stages/check.py)
INPUT_STAGES = ("sft", "dpo", "evaluate")  # ref_logps reads dpo's files


def inputs_file(stage: str) -> Path:
    return INPUTS / f"{stage}.json"


CHECKPOINTS = Path("checkpoints")
RESUME = CHECKPOINTS / "resume"  # resume states of stopped runs (gptlab/resume.py); untracked, never pushed
METRICS = Path("metrics")
TRAIN_STAGES = ("pretrain", "sft", "dpo")


def checkpoint_dir(stage: str) -> Path:
    return CHECKPOINTS / stage


def resume_dir(stage: str) -> Path:
    return RESUME / stage


def metrics_dir(stage: str) -> Path:
    return METRICS / stage


TIMING = METRICS / "timing"  # per-run timing series: no stage output, git-ignored (gptlab/train.py)


def timing_file(stage: str) -> Path:
    return TIMING / f"{stage}.tsv"

LOCKS = Path(".dvc") / "tmp" / "gptlab-locks"  # DVC's untracked scratch folder: never committed or pushed


def lock_file(stage: str) -> Path:
    return LOCKS / f"{stage}.lock"
