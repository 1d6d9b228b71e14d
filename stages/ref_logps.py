"""ref_logps: the sft model's summed response log-probs of every preference pair, once (see gptlab.ref_logps).

One process scores every pair (a forward pass each, no gradients); others exit at once.
"""
from __future__ import annotations

import torch

from gptlab import paths, provenance, ref_logps
from gptlab.checkpoint import load_model
from gptlab.evaluation import pair_logps
from gptlab.stage import announce, run, start


def main() -> None:
    params, accelerator = start("ref_logps")
    if not accelerator.is_main_process:
        return
    cfg = params.dpo
    ref, tok, sft_meta = load_model(paths.checkpoint_dir("sft"), accelerator.device)
    ref.requires_grad_(False).eval()
    sets, encoded = ref_logps.encoded_sets(cfg, params.seed, tok, ref.config.block_size)
    logps = {}
    with torch.no_grad(), accelerator.autocast():
        for name, enc in encoded.items():
            logps[name] = pair_logps(ref, enc.items, cfg.micro_batch_size, tok.eot_id)
    fingerprints = {name: ref_logps.pairs_fingerprint(enc.items) for name, enc in encoded.items()}
    ref_logps.write(logps, provenance.init_sha256(sft_meta), fingerprints)
    announce(accelerator, "ref_logps", {"data": sets.source, **{name: enc.describe() for name, enc in encoded.items()},
                                        "mean chosen logp": f"{logps['train'][0].mean():.3f}"})


if __name__ == "__main__":
    run(main)
