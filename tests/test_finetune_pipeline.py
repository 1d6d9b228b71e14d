"""sft and dpo through the real stages (`gptlab run`, accelerate, 1 and 2 gloo ranks) on local files in the field's
formats, with responses of very different lengths: how a step is split into micro-batches and processes does not
change the loss (the classic accumulation bug averages per micro-batch and would), DPO starts at ln 2, a GPT-2
folder is a start point through `dvc exp run -S sft.init=...`, and `gptlab show-example` marks the loss tokens."""
import hashlib
import json
import math
import shutil

import pytest
import yaml
from conftest import project_env, sh, tokenized_copy

pytestmark = pytest.mark.slow
T = 128  # conftest's TINY block_size
STEPS = 4


def set_params(project, **sections):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def logged(project, stage, name="loss"):
    rows = (project / f"metrics/{stage}/plots/metrics/{name}.tsv").read_text().splitlines()[1:]
    return [float(r.split("\t")[1]) for r in rows]


def run(project, stage, processes=1):
    env = {**project_env(project), "ACCELERATE_USE_CPU": "1"}
    extra = f" --multi_gpu --num_processes {processes}" if processes > 1 else ""
    return sh(f"gptlab run {stage}{extra}", project, env=env)


@pytest.fixture(scope="module")
def project(tokenized, tmp_path_factory):
    """A tiny project whose sft data is prompt/completion jsonl and dpo data prompt/chosen/rejected jsonl, with
    responses from 1 to ~60 tokens, tokenized and pretrained."""
    p = tokenized_copy(tokenized, tmp_path_factory.mktemp("ft") / "proj")  # tokenize reads none of what follows
    sft_rows = [{"prompt": f"Say it {i % 7 + 1} times:", "completion": " again" * (1 + (i * 37) % 60)} for i in range(80)]
    pref_rows = [{"prompt": f"Yes or no ({i})?", "chosen": " yes" * (1 + i % 3), "rejected": " no" * (1 + (i * 13) % 50)}
                 for i in range(80)]
    for name, rows in (("sft.jsonl", sft_rows), ("prefs.jsonl", pref_rows)):
        (p / "finetune" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_params(p,
               sft={"data": {"format": "prompt_completion", "paths": ["finetune/sft.jsonl"], "val_share": 0.1},
                    "max_steps": STEPS, "log_interval": 1, "eval_interval": STEPS, "warmup_steps": 1},
               dpo={"data": {"format": "preference", "paths": ["finetune/prefs.jsonl"], "val_share": 0.1},
                    "max_steps": STEPS, "log_interval": 1, "eval_interval": STEPS, "warmup_steps": 1})
    assert "didn't change" in sh("dvc repro tokenize", p).stdout  # the copy's tokenize is up to date
    run(p, "pretrain")
    return p


def three_ways(project, stage, rows_per_step, seq_per_row):
    """Per-step losses of: micro-batch 8 x accumulation 1, micro-batch 1 x accumulation 8, 2 ranks x 4."""
    out = {}
    for label, micro, processes in (("8x1", 8, 1), ("1x8", 1, 1), ("2 ranks", 4, 2)):
        set_params(project, **{stage: {"micro_batch_size": micro, "tokens_per_step": rows_per_step * seq_per_row * T}})
        log = run(project, stage, processes).stdout
        accum = rows_per_step // (micro * processes)
        assert f"grad_accum {accum}" in log and f"{processes} process(es)" in log
        out[label] = logged(project, stage)
    return out


def test_sft_loss_per_step_is_the_same_for_any_split_of_the_batch(project):
    losses = three_ways(project, "sft", rows_per_step=8, seq_per_row=1)
    base = losses["8x1"]
    assert len(base) == STEPS
    for label in ("1x8", "2 ranks"):
        assert max(abs(a - b) for a, b in zip(base, losses[label])) < 1e-4, (label, base, losses[label])
    assert base[-1] < base[0]  # and it learns


def test_dpo_loss_per_step_is_the_same_for_any_split_and_starts_at_ln2(project):
    set_params(project, sft={"micro_batch_size": 4, "tokens_per_step": 8 * T})
    run(project, "sft")
    ref = run(project, "ref_logps").stdout
    assert "train " in ref and (project / "data/ref_logps/logps.safetensors").is_file()
    losses = three_ways(project, "dpo", rows_per_step=8, seq_per_row=2)
    base = losses["8x1"]
    for label in ("1x8", "2 ranks"):
        assert max(abs(a - b) for a, b in zip(base, losses[label])) < 1e-4, (label, base, losses[label])
    # step 1 is measured before any update: the policy is its reference
    assert abs(base[0] - math.log(2)) < 1e-4
    assert abs(logged(project, "dpo", "rewards/margins")[0]) < 1e-4
    assert base[-1] < base[0]


def test_dpo_refuses_reference_log_probs_of_other_pairs(project):
    set_params(project, dpo={"max_prompt_tokens": 3, "micro_batch_size": 8, "tokens_per_step": 16 * T})
    proc = sh("gptlab run dpo", project, check=False)
    assert proc.returncode == 2
    assert "data/ref_logps: its train log-probs were made for other pairs" in proc.stderr
    assert "dvc repro ref_logps" in proc.stderr
    set_params(project, dpo={"max_prompt_tokens": 0})


def test_show_example_marks_the_loss_tokens(project):
    out = sh("gptlab show-example sft --index 0", project).stdout
    assert "template plain" in out and "tokens that carry loss are between [[ and ]]" in out
    assert "times:[[ again" in out and out.rstrip().endswith("again<|endoftext|>]]")  # prompt bare, response marked
    long = sh("gptlab show-example sft --index 2", project).stdout  # 119 repeats do not fit 129 tokens
    assert "this example was cut to fit the context" in long and "--- example: 129 tokens" in long
    pair = sh("gptlab show-example dpo --index 0 --tokens", project).stdout
    assert "--- chosen:" in pair and "--- rejected:" in pair
    chosen = pair.split("--- chosen: ")[1].split("--- rejected")[0].strip().splitlines()
    n_tokens, n_loss = (int(x.split()[0]) for x in chosen[0].split(", "))
    table = chosen[2:]  # after the header line: "pos id loss text"
    flags = [line.split()[2] == "yes" for line in table]
    assert len(table) == n_tokens and sum(flags) == n_loss > 0
    assert flags == [False] * (n_tokens - n_loss) + [True] * n_loss  # the response (and EOT) closes the pair
    bad = sh("gptlab show-example sft --index 999", project, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --index: 999 is out of range")


@pytest.fixture(scope="module")
def gpt2_folder():
    """A tiny random GPT-2 saved by transformers (safetensors), the shape of a real `models/gpt2`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=T, vocab_size=50257))


def test_sft_on_own_chat_jsonl_from_a_gpt2_folder_with_dvc_exp_run(tiny_project, tmp_path, gpt2_folder):
    """The commands of docs/03-fine-tuning.md: a GPT-2 folder under models/, chat jsonl under finetune/, one `dvc exp run`."""
    p = shutil.copytree(tiny_project, tmp_path / "proj", symlinks=True)  # a reproduced project of its own
    gpt2_folder.save_pretrained(p / "models" / "tiny-gpt2")
    chats = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
             for i in range(30)]
    (p / "finetune" / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = sh("dvc exp run -S sft.init=models/tiny-gpt2 -S sft.data.format=messages "
             "-S 'sft.data.paths=[finetune/chat.jsonl]' -S sft.data.val_share=0.2 "
             "-S '+evaluate.models.tiny=models/tiny-gpt2'", p)
    assert "Running stage 'sft'" in out.stdout and "Running stage 'pretrain'" not in out.stdout
    meta = json.loads((p / "checkpoints/sft/meta.json").read_text())
    assert meta["init_from"] == "models/tiny-gpt2" and meta["tokenizer"]["kind"] == "gpt2"
    assert meta["template"] == "chat" and meta["params"]["sft"]["data"]["paths"] == ["finetune/chat.jsonl"]
    assert json.loads((p / "checkpoints/dpo/meta.json").read_text())["tokenizer"]["kind"] == "gpt2"
    scores = {m: json.loads((p / f"metrics/evaluate/{m}/metrics.json").read_text()) for m in ("pretrain", "sft")}
    assert "val_loss" in scores["pretrain"] and "val_loss" not in scores["sft"]  # another tokenizer's shards
    # the Hugging Face folder added to evaluate.models is scored as itself: its own stage, its weights' hash
    assert "Running stage 'evaluate@tiny'" in out.stdout
    tiny = json.loads((p / "metrics/evaluate/tiny/metrics.json").read_text())
    assert tiny["weights_sha256"] == hashlib.sha256((p / "models/tiny-gpt2/model.safetensors").read_bytes()).hexdigest()
    assert tiny["weights_sha256"] != scores["sft"]["weights_sha256"] and "val_loss" not in tiny
    # exact match on the held-out chats' last answers, asked in the sft data's template
    shown = (p / "metrics/evaluate/sft/samples.md").read_text()
    assert "- Capital of France? [Paris.] →" in shown and 0 <= scores["sft"]["exact_match"] <= 1
    assert "preferred_style" not in scores["sft"]  # the world's style share means nothing for other data
    chat = sh("gptlab generate checkpoints/sft --chat --prompt 'Capital of France?' --max_tokens 3", p).stdout
    assert chat.startswith("\n\nHuman: Capital of France?\n\nAssistant:")
