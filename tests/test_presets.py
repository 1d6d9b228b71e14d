"""Presets: a named partial params file merged under params.yaml. A key the preset sets takes its value
unless params.yaml gives that key a value other than the documented default (an edit or `dvc exp run -S`)."""
import json

import pytest
import yaml
from conftest import ROOT, copy_project, sh

from gptlab.config import ConfigError, Params, load_params, preset_choices, preset_names


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The shipped params.yaml and presets in a scratch folder, plus a small test preset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    presets = tmp_path / "configs" / "presets"
    presets.mkdir(parents=True)
    for p in (ROOT / "configs" / "presets").glob("*.yaml"):
        (presets / p.name).write_text(p.read_text())
    (presets / "wide.yaml").write_text("model:\n  n_embd: 256\npretrain:\n  lr: 1.0e-3\n  warmup_steps: 20\n")
    return tmp_path


def set_params(path, **changes):
    raw = yaml.safe_load((path / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            raw[section][key] = value
        else:
            raw[section] = value
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_the_gpt2_preset_resolves_to_the_recipe(project):
    p = load_params(preset="gpt2-124m")
    assert (p.model.n_layer, p.model.n_head, p.model.n_embd, p.model.block_size) == (12, 12, 768, 1024)
    assert p.tokenizer.kind == "gpt2" and p.pretrain.tokens_per_step == 2**19
    assert (p.pretrain.lr, p.pretrain.min_lr, p.pretrain.warmup_steps) == (6.0e-4, 6.0e-5, 715)
    assert p.pretrain.max_steps * p.pretrain.tokens_per_step == pytest.approx(10e9, rel=1e-3)  # ~10B tokens
    assert p.data.sources[0].path == "HuggingFaceFW/fineweb-edu"
    assert p.pretrain.grad_accum_steps(1024, 8, "pretrain") == 1 and p.pretrain.grad_accum_steps(1024, 1, "pretrain") == 8
    assert p.sft == Params().sft.__class__(**{**Params().sft.__dict__, **yaml.safe_load(
        (ROOT / "configs/presets/gpt2-124m.yaml").read_text())["sft"]})  # only the keys it names change
    assert p.seed == Params().seed and p.preset == "gpt2-124m"
    assert "gpt2-124m" in preset_names()


def test_params_yaml_naming_the_preset_is_the_same_as_passing_it(project):
    set_params(project, preset="wide")
    assert load_params() == load_params(preset="wide")
    assert load_params().model.n_embd == 256


def test_a_value_set_in_params_yaml_wins_over_the_preset(project):
    # what `dvc exp run -S preset=wide -S pretrain.lr=5.0e-4` writes into params.yaml
    set_params(project, preset="wide", pretrain__lr=5.0e-4)
    p = load_params()
    assert p.pretrain.lr == 5.0e-4  # -S wins
    assert p.pretrain.warmup_steps == 20 and p.model.n_embd == 256  # the preset's other keys still apply
    taken, kept = preset_choices()
    assert kept == {"pretrain.lr": 5.0e-4}
    assert taken == {"model.n_embd": 256, "pretrain.warmup_steps": 20}


def test_a_value_equal_to_the_default_cannot_override_the_preset(project):
    """The documented limit of the rule: params.yaml at the default value counts as not set."""
    set_params(project, preset="wide", pretrain__lr=Params().pretrain.lr)
    assert load_params().pretrain.lr == 1.0e-3


def test_preset_mistakes_are_named(project):
    with pytest.raises(ConfigError, match=r"preset: no preset named 'nosuch' .* presets here: gpt2-124m, wide"):
        load_params(preset="nosuch")
    (project / "configs/presets/bad.yaml").write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"configs/presets/bad.yaml: model.n_layers: unknown key; did you mean 'n_layer'"):
        load_params(preset="bad")
    (project / "configs/presets/bad.yaml").write_text("pretrain:\n  lr: 6e-4\n")
    with pytest.raises(ConfigError, match=r"params.yaml with configs/presets/bad.yaml: pretrain.lr: expected a number"):
        load_params(preset="bad")
    (project / "configs/presets/bad.yaml").write_text("preset: wide\n")
    with pytest.raises(ConfigError, match="a preset cannot name another preset"):
        load_params(preset="bad")


@pytest.mark.slow
def test_dvc_exp_run_with_a_preset_and_a_set_param(tmp_path):
    project = copy_project(tmp_path / "proj")
    # the tests' tiny params.yaml sets model.n_embd: 32 itself, so the preset's 64 does not apply
    preset = "model:\n  n_embd: 64\n  bias: false\npretrain:\n  lr: 2.0e-3\n  min_lr: 2.0e-4\n"
    (project / "configs/presets/wide.yaml").write_text(preset)
    sh("git add -A && git commit -qm preset", project)
    out = sh("dvc exp run -S preset=wide -S pretrain.min_lr=1.0e-4", project)
    assert "[check] preset wide: 2 value(s) from configs/presets/wide.yaml; params.yaml's own values win for " \
           "model.n_embd=32, pretrain.min_lr=0.0001" in out.stdout, out.stdout
    meta = json.loads((project / "checkpoints/pretrain/meta.json").read_text())
    assert meta["model"]["bias"] is False and meta["params"]["pretrain"]["lr"] == 2.0e-3  # from the preset
    assert meta["params"]["pretrain"]["min_lr"] == 1.0e-4 and meta["model"]["n_embd"] == 32  # params.yaml's win
    assert json.loads((project / "checkpoints/dpo/meta.json").read_text())["model"]["bias"] is False
