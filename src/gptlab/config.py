"""Typed, frozen configuration: one dataclass per section of params.yaml, validated at load.

The dataclass defaults ARE the documented defaults: params.yaml spells every one of them out, and
tests/test_config.py proves the two are equal, so a key or section left out of params.yaml trains exactly
what the shipped params.yaml would. Unknown keys, at any level, are errors.

Every mistake is reported before any expensive work, as `ConfigError("<file>: <section.key>: <what> — <fix>")`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRESETS = Path("configs") / "presets"  # named partial params files, relative to the project root

TOKENIZER_KINDS = ("bpe", "gpt2", "char")
SOURCE_KINDS = ("world", "hf", "files")
# keys of a data.sources entry that only some kinds use (kind, weight, max_tokens: every kind)
SOURCE_KEYS = {"val_share": ("hf", "files"), "path": ("hf",), "name": ("hf",), "split": ("hf",), "val_split": ("hf",),
               "revision": ("hf",), "text_field": ("hf", "files"), "paths": ("files",), "separator": ("files",)}
# fine-tuning data (sft.data, dpo.data): the schemas each stage reads; see gptlab/data/finetune.py
SFT_FORMATS = ("world", "alpaca", "messages", "prompt_completion")
PREFERENCE_FORMATS = ("world", "hh_rlhf", "preference")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # TRL's names; formulas in gptlab/losses.py
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")  # the ones dpo.label_smoothing applies to
# Local files a stage reads live in folders dvc.yaml lists as dependencies, so changing one reruns the stage.
FINETUNE_DIR = "finetune"  # sft/dpo data files (sft.data.paths, dpo.data.paths)
MODELS_DIR = "models"  # models that are not pipeline checkpoints (sft.init, evaluate.models)
PIPELINE_MODELS = {"pretrain": "checkpoints/pretrain", "sft": "checkpoints/sft", "dpo": "checkpoints/dpo"}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # evaluate.models names: the `evaluate@<name>` stage's suffix


class GptlabError(ValueError):
    """Bad input (params, data, checkpoint); the message names what is wrong and how to fix it."""


class ConfigError(GptlabError):
    """A params.yaml mistake; the message names the key and says how to fix it."""


@dataclass(frozen=True)
class WorldConfig:
    """The embedded default world: a seeded generator of facts, documents and eval sets."""

    n_people: int = 250  # people in the world; each has one value for every attribute
    bios_per_person: int = 48  # pretraining biographies per person, each in fresh wording and order
    val_bios_per_person: int = 1  # validation biographies per person (same facts, new wording)
    shuffle_sentences: bool = True  # biography sentences in random order (false: always the same order)
    wordings: int = 4  # sentence templates per attribute used in biographies (1 = every fact in one wording)
    n_arithmetic: int = 300  # arithmetic documents ("3 + 4 = 7") in the pretraining corpus
    max_operand: int = 20  # arithmetic operands are drawn from 0..max_operand
    heldout_frac: float = 0.2  # share of people whose facts never appear in SFT (held-out questions)
    preferred_frac: float = 0.8  # share of SFT answers in the preferred (terse) style; the rest are padded
    n_choices: int = 4  # endings per multiple-choice item

    def check(self, where: str) -> None:
        _require(self.n_people >= 20, f"{where}.n_people", "must be at least 20 (the world needs held-out people)")
        _require(self.bios_per_person >= 1, f"{where}.bios_per_person", "must be at least 1")
        _require(self.val_bios_per_person >= 1, f"{where}.val_bios_per_person", "must be at least 1")
        _require(self.wordings >= 1, f"{where}.wordings", "must be at least 1")
        _require(self.n_arithmetic >= 0, f"{where}.n_arithmetic", "must be 0 or more")
        _require(self.max_operand >= 1, f"{where}.max_operand", "must be at least 1")
        _require(0.0 < self.heldout_frac < 1.0, f"{where}.heldout_frac", "must lie strictly between 0 and 1")
        _require(0.0 <= self.preferred_frac <= 1.0, f"{where}.preferred_frac", "must lie in [0, 1]")
        _require(2 <= self.n_choices <= 8, f"{where}.n_choices", "must lie in 2..8")


@dataclass(frozen=True)
class SourceConfig:
    """One entry of data.sources: where documents come from and how much of the mix they make up.

    kind world: the embedded default; hf: a Hugging Face dataset, streamed; files: local .txt/.jsonl/.parquet.
    Keys that belong to another kind are errors, so a misplaced key never goes silently unused."""

    kind: str  # world | hf | files (required)
    weight: float = 1.0  # relative share of documents drawn from this source
    max_tokens: int = 0  # cap on the training tokens taken from this source (0 = no cap)
    val_share: float = 0.0  # hf/files: share of documents held out for validation (picked by a seeded hash)
    path: str = ""  # hf: the dataset, e.g. HuggingFaceFW/fineweb-edu
    name: str = ""  # hf: the config, e.g. sample-10BT ("" = the dataset's default)
    split: str = "train"  # hf: the split documents are streamed from
    val_split: str = ""  # hf: a split to take validation documents from (instead of val_share)
    revision: str = ""  # hf: the commit or tag to pin ("" = latest, and the log says it is unpinned)
    text_field: str = "text"  # hf and .jsonl/.parquet files: the field that holds the document's text
    paths: tuple[str, ...] = ()  # files: paths or globs, relative to the repository (e.g. corpus/*.txt)
    separator: str = ""  # files, .txt: split each file into documents on this string ("" = one per file)

    def check(self, where: str) -> None:
        _require(self.kind in SOURCE_KINDS, f"{where}.kind", f"must be one of {SOURCE_KINDS}")
        _require(self.weight > 0, f"{where}.weight", "must be positive (a source with no share would be empty)")
        _require(self.max_tokens >= 0, f"{where}.max_tokens", "must be 0 (no cap) or positive")
        _require(0.0 <= self.val_share < 1.0, f"{where}.val_share", "must lie in [0, 1)")
        defaults = SourceConfig(kind=self.kind)
        for key in SOURCE_KEYS:
            if getattr(self, key) != getattr(defaults, key) and self.kind not in SOURCE_KEYS[key]:
                raise ConfigError(f"{where}.{key}: only for kind {' or '.join(SOURCE_KEYS[key])}, not {self.kind}")
        if self.kind == "hf":
            _require(bool(self.path), f"{where}.path", "name the dataset, e.g. HuggingFaceFW/fineweb-edu")
            _require(bool(self.split), f"{where}.split", "name the split to stream, e.g. train")
            _require(bool(self.text_field), f"{where}.text_field", "name the field that holds the text")
            _require(not (self.val_split and self.val_share), f"{where}.val_split",
                     "give val_split or val_share, not both")
        if self.kind == "files":
            _require(bool(self.paths), f"{where}.paths", "list the files or globs, e.g. [corpus/*.txt]")
            _require(bool(self.text_field), f"{where}.text_field", "name the field that holds the text")


@dataclass(frozen=True)
class DataConfig:
    # where pretraining documents come from, mixed by weight; the world also makes the fine-tuning sets
    sources: tuple[SourceConfig, ...] = (SourceConfig(kind="world", weight=1.0),)
    max_tokens: int = 0  # cap on training tokens over all sources (0 = no cap)
    val_tokens: int = 10_000_000  # cap on validation tokens over all sources (0 = no cap)
    shard_tokens: int = 100_000_000  # tokens per shard file (the last of a split may hold fewer)
    workers: int = 0  # tokenizer processes (0 = one per core); the shards are the same for any count
    world: WorldConfig = field(default_factory=WorldConfig)

    def check(self, where: str) -> None:
        _require(len(self.sources) >= 1, f"{where}.sources", "list at least one source, e.g. [{kind: world, weight: 1.0}]")
        for i, source in enumerate(self.sources):
            source.check(f"{where}.sources[{i}]")
        for key in ("max_tokens", "val_tokens", "workers"):
            _require(getattr(self, key) >= 0, f"{where}.{key}", "must be 0 or more")
        _require(self.shard_tokens >= 1024, f"{where}.shard_tokens", "must be at least 1024")


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "bpe"  # bpe (trained on the corpus) | gpt2 (exact GPT-2 ids) | char
    vocab_size: int = 2048  # bpe only: target vocabulary incl. 256 byte tokens and <|endoftext|>
    train_chars: int = 100_000_000  # bpe only: characters of the mixed training text it learns from, at most

    def check(self, where: str) -> None:
        _require(self.kind in TOKENIZER_KINDS, f"{where}.kind", f"must be one of {TOKENIZER_KINDS}")
        _require(self.vocab_size >= 258, f"{where}.vocab_size", "must be at least 258 (256 bytes + 1 merge + EOT)")
        _require(self.train_chars >= 1, f"{where}.train_chars", "must be at least 1")


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual width (channels C)
    block_size: int = 64  # context length in tokens (T); also the sequence cap for sft and dpo
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    dropout: float = 0.0  # dropout probability in attention, MLP and embeddings

    def check(self, where: str) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            _require(getattr(self, key) >= 1, f"{where}.{key}", "must be at least 1")
        _require(
            self.n_embd % self.n_head == 0,
            f"{where}.n_embd",
            f"{self.n_embd} is not divisible by {where}.n_head={self.n_head}; pick n_embd as a multiple of n_head",
        )
        _require(0.0 <= self.dropout < 1.0, f"{where}.dropout", "must lie in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """What pretrain, sft and dpo share: the optimizer, schedule, batch geometry and logging cadence.

    The defaults here are pretrain's; SFTConfig and DPOConfig override the ones that differ."""

    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 64  # sequences per forward pass, per process
    tokens_per_step: int = 4096  # sequence slots x block_size per optimizer step, all processes together
    lr: float = 3.0e-3  # peak learning rate
    min_lr: float = 3.0e-4  # floor the cosine decays to
    warmup_steps: int = 50  # linear warmup from 0 to lr
    weight_decay: float = 0.0  # AdamW decay, applied to matrices only (not biases, LayerNorm)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_interval: int = 250  # evaluate every N steps (and at the last step)
    eval_batches: int = 4  # micro-batches per evaluation
    log_interval: int = 25  # one log line and one dvclive step every N steps
    save_interval: int = 250  # steps between resume states (also saved on SIGTERM/SIGINT); 0 = only then
    keep_saves: int = 2  # resume states kept (the newest ones)
    compile: bool = False  # torch.compile the model: slower start, faster steps on a GPU

    def check(self, where: str) -> None:
        for key in ("max_steps", "micro_batch_size", "tokens_per_step", "eval_interval", "eval_batches", "log_interval",
                    "keep_saves"):
            _require(getattr(self, key) >= 1, f"{where}.{key}", "must be at least 1")
        _require(self.lr > 0, f"{where}.lr", "must be positive")
        _require(
            0 <= self.min_lr <= self.lr,
            f"{where}.min_lr",
            f"must lie in [0, {where}.lr={self.lr}]",
        )
        _require(
            0 <= self.warmup_steps <= self.max_steps,
            f"{where}.warmup_steps",
            f"must lie in [0, {where}.max_steps={self.max_steps}]",
        )
        _require(self.weight_decay >= 0, f"{where}.weight_decay", "must be 0 or more")
        for key in ("beta1", "beta2"):
            _require(0 <= getattr(self, key) < 1, f"{where}.{key}", "must lie in [0, 1)")
        _require(self.grad_clip >= 0, f"{where}.grad_clip", "must be 0 (off) or positive")
        _require(self.save_interval >= 0, f"{where}.save_interval", "must be 0 (save on SIGTERM/SIGINT only) or more")

    def grad_accum_steps(self, block_size: int, world_size: int, where: str) -> int:
        """tokens_per_step / (micro_batch_size * block_size * world_size), which must divide exactly."""
        per_micro = self.micro_batch_size * block_size * world_size
        _require(
            self.tokens_per_step % per_micro == 0,
            f"{where}.tokens_per_step",
            f"{self.tokens_per_step} is not a multiple of micro_batch_size*block_size*processes = "
            f"{self.micro_batch_size}*{block_size}*{world_size} = {per_micro}; set it to a multiple of {per_micro}",
        )
        return self.tokens_per_step // per_micro


def _inside(folder: str, path: str) -> bool:
    """Whether a relative path stays inside `folder` (globs included): what DVC tracks as that dependency."""
    parts = Path(path).parts
    return not Path(path).is_absolute() and len(parts) >= 2 and parts[0] == folder and ".." not in parts


@dataclass(frozen=True)
class FinetuneData:
    """sft.data / dpo.data: where a fine-tuning stage's examples come from and in which schema.

    format world: the embedded world's sets (written by tokenize); every other format reads a Hugging Face
    dataset (path, name, revision, split) or local .jsonl/.parquet files under finetune/ (paths), both through
    datasets.load_dataset. Held-out examples (val_loss) come from val_split (hub) or a seeded val_share."""

    FORMATS = ()  # the subclass's allowed formats (a class constant, not a key)

    format: str = "world"
    path: str = ""  # hub dataset, e.g. tatsu-lab/alpaca (or give paths)
    name: str = ""  # hub config ("" = the dataset's default)
    revision: str = ""  # hub commit or tag to pin ("" = latest; the log says it is unpinned)
    split: str = "train"  # hub split the training examples come from
    val_split: str = ""  # hub split for held-out examples (instead of val_share)
    val_share: float = 0.0  # share of records held out, picked by a seeded hash (hub or files)
    paths: tuple[str, ...] = ()  # local .jsonl/.parquet files or globs under finetune/
    max_examples: int = 0  # training examples used at most, in the data's order (0 = all)

    def check(self, where: str) -> None:
        _require(self.format in self.FORMATS, f"{where}.format", f"must be one of {self.FORMATS}")
        _require(self.max_examples >= 0, f"{where}.max_examples", "must be 0 (all) or more")
        _require(0.0 <= self.val_share < 1.0, f"{where}.val_share", "must lie in [0, 1)")
        if self.format == "world":
            for key in ("path", "name", "revision", "val_split", "val_share", "paths", "split"):
                if getattr(self, key) != getattr(type(self)(), key):
                    raise ConfigError(f"{where}.{key}: not for format world (its sets come from tokenize); "
                                      f"set {where}.format to one of {self.FORMATS[1:]} to read other data")
            return
        _require(bool(self.path) != bool(self.paths), f"{where}.path",
                 "give a hub dataset (path) or local files (paths), exactly one of the two")
        for key in ("name", "revision", "val_split"):
            _require(not (self.paths and getattr(self, key)), f"{where}.{key}", "only for a hub dataset (path)")
        for p in self.paths:
            _require(_inside(FINETUNE_DIR, p), f"{where}.paths",
                     f"{p!r} is not under {FINETUNE_DIR}/; put local fine-tuning files there (dvc.yaml lists the "
                     f"folder as a dependency, so changing a file reruns the stage)")
        _require(bool(self.split), f"{where}.split", "name the split, e.g. train")
        _require(not (self.val_split and self.val_share), f"{where}.val_split", "give val_split or val_share, not both")
        _require(bool(self.val_split) or self.val_share > 0, f"{where}.val_share",
                 "held-out examples are needed for val_loss: set val_share (e.g. 0.02) or val_split")


@dataclass(frozen=True)
class SFTData(FinetuneData):
    FORMATS = SFT_FORMATS


@dataclass(frozen=True)
class PreferenceData(FinetuneData):
    FORMATS = PREFERENCE_FORMATS


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """sft's defaults: fewer steps from a pretrained start, smaller batches."""

    max_steps: int = 250
    micro_batch_size: int = 32
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_steps: int = 10
    eval_interval: int = 125
    log_interval: int = 10
    save_interval: int = 125
    init: str = PIPELINE_MODELS["pretrain"]  # start weights: the pretrain checkpoint, or a model folder under models/
    data: SFTData = field(default_factory=SFTData)
    max_prompt_tokens: int = 0  # prompt tokens kept at most, cut from the left (0 = as many as the context holds)
    packing: bool = False  # several examples per sequence (no attention or loss across them): fewer pad tokens

    def check(self, where: str) -> None:
        super().check(where)
        _require(self.init == PIPELINE_MODELS["pretrain"] or (_inside(MODELS_DIR, self.init) and "*" not in self.init),
                 f"{where}.init", f"must be {PIPELINE_MODELS['pretrain']} or a model folder under {MODELS_DIR}/ (a "
                 f"Hugging Face GPT-2 or a gptlab checkpoint, e.g. {MODELS_DIR}/gpt2; dvc.yaml makes it the sft "
                 f"stage's dependency), got {self.init!r}")
        _require(self.max_prompt_tokens >= 0, f"{where}.max_prompt_tokens", "must be 0 (no cap) or more")


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """dpo's defaults: a small lr, so the policy stays near its reference."""

    max_steps: int = 100
    micro_batch_size: int = 16
    lr: float = 2.0e-4
    min_lr: float = 2.0e-5
    warmup_steps: int = 10
    eval_interval: int = 25
    log_interval: int = 5
    save_interval: int = 25
    beta: float = 0.1  # DPO temperature: how far the policy may move from the reference
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge | robust, as TRL names them
    label_smoothing: float = 0.0  # sigmoid/robust: assumed share of flipped preference labels
    data: PreferenceData = field(default_factory=PreferenceData)
    max_prompt_tokens: int = 0  # prompt tokens kept at most, cut from the left (0 = as many as the context holds)

    def check(self, where: str) -> None:
        super().check(where)
        _require(self.beta > 0, f"{where}.beta", "must be positive")
        _require(self.loss_type in DPO_LOSS_TYPES, f"{where}.loss_type", f"must be one of {DPO_LOSS_TYPES}")
        _require(0.0 <= self.label_smoothing < 0.5, f"{where}.label_smoothing", "must lie in [0, 0.5)")
        _require(self.label_smoothing == 0 or self.loss_type in SMOOTHED_LOSS_TYPES, f"{where}.label_smoothing",
                 f"only {' and '.join(SMOOTHED_LOSS_TYPES)} use it; set it to 0.0 for loss_type {self.loss_type}")
        _require(self.max_prompt_tokens >= 0, f"{where}.max_prompt_tokens", "must be 0 (no cap) or more")


@dataclass(frozen=True)
class EvaluateConfig:
    # name -> folder, one `evaluate@<name>` stage each (dvc.yaml's foreach): a pipeline checkpoint, or a folder
    # under models/ holding a gptlab checkpoint (a pulled or copied one) or a Hugging Face GPT-2 (an export)
    models: dict[str, str] = field(default_factory=lambda: dict(PIPELINE_MODELS))
    max_new_tokens: int = 40  # greedy answer length cap for exact match (a longer reference cannot match)
    max_questions: int = 320  # held-out instructions scored per model (0 = all)
    max_mc_items: int = 400  # multiple-choice items scored per model (0 = all)
    max_pairs: int = 400  # held-out preference pairs scored per model (0 = all)
    val_batches: int = 8  # micro-batches of the val shard for val_loss
    micro_batch_size: int = 32  # sequences per forward pass
    n_samples: int = 4  # fixed prompts sampled per model into samples.md
    temperature: float = 0.8  # sampling temperature for samples.md
    top_k: int = 50
    top_p: float = 0.9
    # multiple-choice items in HellaSwag's schema: "" = the embedded world's; else a hub dataset (Rowan/hellaswag)
    # or a local folder laid out like one, read through datasets.load_dataset
    mc_path: str = ""
    mc_name: str = ""  # hub config ("" = default)
    mc_split: str = "validation"
    mc_revision: str = ""  # hub commit to pin

    def check(self, where: str) -> None:
        _require(bool(self.models), f"{where}.models", "name at least one model to evaluate, e.g. dpo: checkpoints/dpo")
        for name, folder in self.models.items():
            _require(bool(MODEL_NAME.fullmatch(name)), f"{where}.models.{name}",
                     "a name of letters, digits, _ and - (it becomes the stage name evaluate@<name>)")
            _require(folder in PIPELINE_MODELS.values() or (_inside(MODELS_DIR, folder) and "*" not in folder),
                     f"{where}.models.{name}", f"must be one of {', '.join(PIPELINE_MODELS.values())} or a folder "
                     f"under {MODELS_DIR}/ (a gptlab checkpoint or a Hugging Face GPT-2), got {folder!r}")
        _require(bool(self.mc_split), f"{where}.mc_split", "name the split, e.g. validation")
        for key in ("max_new_tokens", "val_batches", "micro_batch_size"):
            _require(getattr(self, key) >= 1, f"{where}.{key}", "must be at least 1")
        for key in ("max_questions", "max_mc_items", "max_pairs", "n_samples", "top_k"):
            _require(getattr(self, key) >= 0, f"{where}.{key}", "must be 0 or more")
        _require(self.temperature >= 0, f"{where}.temperature", "must be 0 (greedy) or positive")
        _require(0 < self.top_p <= 1, f"{where}.top_p", "must lie in (0, 1]")


@dataclass(frozen=True)
class Params:
    seed: int = 1337  # one seed for the world, initialisation and data order
    preset: str = ""  # a file of configs/presets/ merged under this file ("" = none); see load_params
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def check(self, where: str) -> None:
        _require(self.seed >= 0, "seed", "must be 0 or more")


def _require(ok: bool, key: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {fix}")


def _coerce(tp, value, key: str):
    """Check `value` against the annotated type `tp`; ints widen to float, nothing else converts."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            raise ConfigError(f"{key}: expected a number, got the string {value!r}{_number_text_hint(value)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(key_tp, k, f"{key} (a name)"): _coerce(value_tp, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a programming error, not a user one


def _number_text_hint(text: str) -> str:
    """Why a number came as text, and the fix: quotes around it, or an exponent YAML 1.1 does not read as a
    number (2e-4: it wants a decimal point and a signed exponent, 2.0e-4)."""
    try:
        number = float(text)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return " (a finite number is needed here)"
    if isinstance(yaml.safe_load(text), (int, float)):  # without the quotes it would have been a number
        return f" (the quotes make it text: write {text.strip()} without quotes)"
    mantissa, _, exponent = text.strip().lower().partition("e")
    if exponent:
        mantissa = mantissa if "." in mantissa else mantissa + ".0"
        fixed = f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return (f" (YAML 1.1 reads an exponent as a number only with a decimal point and a signed exponent: "
                f"write {fixed}, without quotes)")
    return " (write it as a plain decimal number, e.g. 0.0002, without quotes)"


def _build(cls, raw, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw:
            raise ConfigError(f"{where}.{f.name}: missing; this key has no default" if where else f"{f.name}: missing")
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            did_you_mean = f"; did you mean '{close[0]}'?" if close else ""
            full = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{full}: unknown key (valid keys: {', '.join(names)}){did_you_mean}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in raw.items()}
    obj = cls(**kwargs)
    obj.check(where)
    return obj


def parse_params(raw: dict) -> Params:
    """Validate a parsed params mapping; raises ConfigError naming the first bad key."""
    return _build(Params, raw, "")


def load_params(path: str | Path = "params.yaml", preset: str | None = None) -> Params:
    """params.yaml, with the preset it names (or `preset`, which replaces that name) merged under it.

    A preset (configs/presets/<name>.yaml, a partial params file) changes defaults: each key it sets takes
    the preset's value unless params.yaml gives that key a value other than the documented default (an edit,
    or `dvc exp run -S`), which wins. See `preset_choices` for which value came from where."""
    path = Path(path)
    raw = _read_mapping(path, "run from the project root or pass the path to params.yaml")
    mine = _parse_file(raw, str(path))
    name = mine.preset if preset is None else preset
    if not name:
        return mine
    merged, _ = _merge_preset(raw, mine, name)
    return _parse_file(merged, f"{path} with {preset_path(name)}")


def preset_path(name: str) -> Path:
    return PRESETS / f"{name}.yaml"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_choices(path: str | Path = "params.yaml", preset: str | None = None) -> tuple[dict, dict]:
    """({key: value} the preset set, {key: value} params.yaml kept over the preset), keys dotted."""
    raw = _read_mapping(Path(path), "run from the project root")
    mine = _parse_file(raw, str(path))
    name = mine.preset if preset is None else preset
    if not name:
        return {}, {}
    return _merge_preset(raw, mine, name)[1]


def _merge_preset(raw: dict, mine: Params, name: str) -> tuple[dict, tuple[dict, dict]]:
    source = preset_path(name)
    if not source.is_file():
        known = ", ".join(preset_names()) or "none"
        raise ConfigError(f"preset: no preset named {name!r} ({source} not found); presets here: {known}")
    overlay = _read_mapping(source, f"fix {source}")
    if "preset" in overlay:
        raise ConfigError(f"{source}: preset: a preset cannot name another preset; remove the key")
    taken: dict = {}
    kept: dict = {}
    merged = _overlay(overlay, raw, mine, Params(), "", taken, kept, source)
    merged["preset"] = name
    return merged, (taken, kept)


def _overlay(overlay: dict, raw, mine, default, where: str, taken: dict, kept: dict, source: Path) -> dict:
    """raw with each of overlay's keys whose params.yaml value is still the default replaced by the preset's."""
    result = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(type(default))}
    for key, value in overlay.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: {full}: unknown key{hint}")
        section = getattr(default, key)
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            inner = result.get(key) if isinstance(result.get(key), dict) else {}
            result[key] = _overlay(value, inner, getattr(mine, key), section, full, taken, kept, source)
        elif getattr(mine, key) == section:
            result[key] = value
            taken[full] = value
        else:
            kept[full] = getattr(mine, key)
    return result


def _read_mapping(path: Path, fix: str) -> dict:
    if not path.exists():
        raise ConfigError(f"{path}: not found; {fix}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)}); fix the syntax there") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _parse_file(raw: dict, where: str) -> Params:
    try:
        return parse_params(raw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what it found and where."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(e, "problem", None) or str(e).splitlines()[0])


def to_dict(obj) -> dict:
    """A plain dict of a config dataclass, for meta.json."""
    return dataclasses.asdict(obj)


__all__ = [
    "GptlabError", "ConfigError", "WorldConfig", "SourceConfig", "DataConfig", "TokenizerConfig", "ModelConfig", "TrainConfig",
    "SFTConfig", "DPOConfig",
    "EvaluateConfig", "Params", "parse_params", "load_params", "to_dict",
]
