"""params.yaml is validated at load: every mistake names the key and the fix, before any work starts."""
from pathlib import Path

import pytest
import yaml

from gptlab.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_load_and_cover_every_field():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    raw = raw_params()
    # every section and key is spelled out in params.yaml, so users see every knob
    for section in ("data", "tokenizer", "model", "pretrain", "sft", "dpo", "evaluate"):
        assert set(raw[section]) == set(vars(getattr(params, section))), section


def test_code_defaults_are_the_documented_params():
    """One fact, one place: a key left out of params.yaml takes exactly the value params.yaml documents."""
    assert load_params(ROOT / "params.yaml") == Params()


@pytest.mark.parametrize("section", ["model", "pretrain", "sft", "dpo", "evaluate", "tokenizer", "data"])
def test_a_missing_key_or_emptied_section_takes_the_documented_default(section):
    documented = parse_params(raw_params())
    raw = raw_params()
    raw[section] = None  # `model:` with nothing under it
    assert parse_params(raw) == documented
    raw = raw_params()
    key = next(iter(raw[section]))
    del raw[section][key]
    assert parse_params(raw) == documented


def test_unknown_top_level_key_is_reported():
    raw = raw_params()
    raw["pretrian"] = raw.pop("pretrain")
    with pytest.raises(ConfigError, match=r"pretrian: unknown key.*did you mean 'pretrain'"):
        parse_params(raw)


def with_value(section: str, key: str, value) -> dict:
    raw = raw_params()
    raw[section][key] = value
    return raw


@pytest.mark.parametrize(
    "section,key,value,needles",
    [
        ("pretrain", "lr", "2e-4", ["pretrain.lr", "string", "2.0e-4"]),
        ("sft", "max_steps", 1.5, ["sft.max_steps", "integer"]),
        ("model", "bias", "yes", ["model.bias", "true or false"]),
        ("model", "n_embd", 130, ["model.n_embd", "model.n_head", "multiple"]),
        ("pretrain", "min_lr", 1.0, ["pretrain.min_lr", "pretrain.lr"]),
        ("dpo", "beta", 0.0, ["dpo.beta", "positive"]),
        ("tokenizer", "kind", "wordpiece", ["tokenizer.kind", "bpe"]),
        ("pretrain", "warmup_steps", 10**6, ["pretrain.warmup_steps", "max_steps"]),
        ("evaluate", "top_p", 0.0, ["evaluate.top_p"]),
        ("evaluate", "models", {}, ["evaluate.models", "at least one"]),
        ("evaluate", "models", ["checkpoints/sft"], ["evaluate.models", "mapping"]),
        ("evaluate", "models", {"a b": "checkpoints/sft"}, ["evaluate.models.a b", "letters, digits"]),
        ("evaluate", "models", {"x": "checkpoints/other"}, ["evaluate.models.x", "models/", "checkpoints/other"]),
        ("evaluate", "models", {"x": "../outside"}, ["evaluate.models.x", "../outside"]),
        ("evaluate", "models", {"x": 3}, ["evaluate.models.x", "string"]),
        ("sft", "init", "pretrain", ["sft.init", "checkpoints/pretrain", "models/"]),
    ],
)
def test_bad_values_name_key_and_fix(section, key, value, needles):
    with pytest.raises(ConfigError) as e:
        parse_params(with_value(section, key, value))
    for needle in needles:
        assert needle in str(e.value)


def test_unknown_key_suggests_the_close_one():
    raw = raw_params()
    raw["sft"]["learning_rate"] = 1.0e-3
    raw["sft"]["lrr"] = raw["sft"].pop("lr")
    with pytest.raises(ConfigError, match=r"sft\.learning_rate: unknown key"):
        parse_params(raw)
    del raw["sft"]["learning_rate"]
    with pytest.raises(ConfigError, match=r"did you mean 'lr'"):
        parse_params(raw)


def test_nested_world_keys_are_checked():
    raw = raw_params()
    raw["data"]["world"]["heldout_frac"] = 1.5
    with pytest.raises(ConfigError, match=r"data\.world\.heldout_frac"):
        parse_params(raw)


def test_tokens_per_step_must_divide_into_micro_batches():
    params = parse_params(raw_params())
    cfg = params.pretrain
    T = params.model.block_size
    assert cfg.grad_accum_steps(T, 1, "pretrain") * cfg.micro_batch_size * T == cfg.tokens_per_step
    with pytest.raises(ConfigError, match=r"pretrain\.tokens_per_step.*multiple of"):
        cfg.grad_accum_steps(T, 3, "pretrain")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
