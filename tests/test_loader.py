"""Batches as a pure function of (seed, step, process): disjoint across processes, independent of history,
the same however the global batch is split, windows never crossing a shard's end."""
import numpy as np
import torch

from gptlab.data.loader import Slicer, StepCache, Windows, step_windows
from gptlab.data.shards import read_shard, write_shard


def make_shards(tmp_path, sizes):
    """Shards whose ids say where they are: shard k holds 1000*k + position (vocab big enough for uint32)."""
    shards = []
    for k, n in enumerate(sizes):
        path = tmp_path / f"train_{k:06d}.bin"
        write_shard(path, [list(range(1000 * k, 1000 * k + n - 1))], eot_id=999_999, n_vocab=1_000_000, fingerprint="f")
        shards.append(read_shard(path))
    return shards


def test_windows_never_cross_a_shard_and_cover_every_start(tmp_path):
    windows = Windows(make_shards(tmp_path, [20, 9, 30]), block_size=8)
    assert windows.n == (20 - 8) + (9 - 8) + (30 - 8)
    rows = windows.rows(np.arange(windows.n))
    assert rows.shape == (windows.n, 9)
    shard_of = rows[:, 0] // 1000
    assert all((row // 1000 == s).all() or row[-1] == 999_999 for row, s in zip(rows, shard_of))  # one shard each
    assert len({tuple(r) for r in rows}) == windows.n


def test_the_batch_at_step_k_does_not_depend_on_earlier_steps():
    fresh = step_windows(10_000, seed=7, step=42, count=64)
    for step in range(42):
        step_windows(10_000, seed=7, step=step, count=64)
    assert np.array_equal(step_windows(10_000, seed=7, step=42, count=64), fresh)
    assert not np.array_equal(step_windows(10_000, seed=8, step=42, count=64), fresh)
    assert len(set(fresh)) == 64  # distinct windows within a step


def slices(n_windows, processes, grad_accum, micro_batch_size, step):
    out = {}
    for p in range(processes):
        slicer = Slicer(micro_batch_size, grad_accum, p, processes)
        cache = StepCache(lambda k: step_windows(n_windows, 3, k, slicer.global_rows))
        out[p] = [slicer.take(cache(step), m) for m in range(grad_accum)]
    return out


def test_two_processes_take_disjoint_windows_and_together_what_one_process_takes():
    two = slices(5000, processes=2, grad_accum=2, micro_batch_size=4, step=5)
    one = slices(5000, processes=1, grad_accum=4, micro_batch_size=4, step=5)
    a, b = set(np.concatenate(two[0])), set(np.concatenate(two[1]))
    assert len(a) == len(b) == 8 and not a & b
    assert a | b == set(np.concatenate(one[0]))
    big = slices(5000, processes=1, grad_accum=1, micro_batch_size=16, step=5)  # micro 16 x 1 == micro 4 x 4
    assert np.array_equal(np.concatenate(one[0]), big[0][0])


def test_validation_windows_are_fixed_and_evenly_spread(tmp_path):
    windows = Windows(make_shards(tmp_path, [50, 50]), block_size=8)
    first, again = windows.fixed(6), windows.fixed(6)
    assert np.array_equal(first, again) and first[0] == 0 and first[-1] == windows.n - 1
    idx, targets = windows.batch(first, "cpu")
    assert idx.shape == targets.shape == (6, 8) and torch.equal(idx[:, 1:], targets[:, :-1])
