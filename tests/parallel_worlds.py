"""Spawned torch.distributed worlds on CPU (gloo) and the criteria for a parallel model's logits
against the single-process model's (tests/model/test_parallel.py, tests/dsv4_compile/test_checkpoint_parallel.py).

Summation order is all that differs: each rank sums its heads' (its experts') share of the output
projection (of the MoE) and the all-reduce adds the partials, where the plain model sums all at once.
- Without the FP8/FP4 activation simulation (`exact`) the prefill and the MTP block are continuous but
  for their top-k selections (router, indexer), so reassociated fp32 sums (unit roundoff 6e-8, a few ulp
  per sum) stay within metrics.py's fp32 tolerance of 1e-5 relative RMS through 4 layers unless a
  near-tie flips. The decode steps are not: they read the KV cache, whose entries are FP8 in every mode
  (the production layout), so an ulp moves an entry across an FP8 rounding boundary now and then. The
  single-process tiny model's decode logits move by up to 3.7e-5 relative RMS (prefill 9e-7) when its
  weights are scaled by 1 + 1.2e-7 N(0, 1) (3 of 4 seeds above 1e-5): the decode steps take the
  criteria below, in both modes.
- With it (`quantized`) a perturbation of an ulp moves a value across an FP8 rounding boundary now and
  then; a flipped window row of the cache stays for `window` positions, a flipped compressed entry or
  top-k choice for the rest of its sequence, so how many positions a flip moves past 1e-3 depends on
  where the first one falls, which is chaotic in the rounding (on an AVX512 CPU tp=2 put 72.4% of the
  positions within 1e-3 where an AVX2 one put 97.1%: the same model, other vector widths in the fp32
  sums). The `flips` criteria bound what a sharding fault moves and flips do not: the median position
  within 1e-3 (flip cascades: up to 5.7e-5 in these tests on both CPUs, 1.2e-4 over test_model's 12
  decode-vs-prefill seeds; a fault moves every position: a dropped all-reduce, median 0.67) and the
  predicted token equal at 97% (flips: 99.67% or more; a dropped all-reduce: 25%).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4_compile.model import KVCache, ModelConfig, Transformer
from helpers import assert_close

PROMPT, DECODE, MTP = 136, 2, 16  # past the window (8), 34 CSA blocks, one HCA block (ratio 128) complete


def _rank_main(rank: int, world: int, store: str, out: str, worker: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(worker(rank, world, *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_world(worker: Callable, world: int, tmp_path, *args) -> list:
    """worker(rank, world, *args) in each of `world` spawned processes of one gloo process group ->
    what each rank returned (saved with torch.save), by rank. `worker` must be a module-level function."""
    mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), str(tmp_path), worker, args), nprocs=world)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def prompt_tokens(config: ModelConfig) -> torch.Tensor:
    """[2, PROMPT + DECODE] tokens, the same in every process."""
    return torch.randint(0, config.vocab_size, (2, PROMPT + DECODE), generator=torch.Generator().manual_seed(1))


def run_logits(model: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prefill logits [B, PROMPT, V], then DECODE steps' logits [B, DECODE, V], and the MTP logits."""
    cache = KVCache(model.config, batch_size=tokens.shape[0])
    with torch.no_grad():
        prefill = model.prefill(tokens[:, :PROMPT], cache, all_logits=True)
        decode = torch.stack([model.decode(tokens[:, p:p + 1], torch.full((tokens.shape[0],), p), cache)
                              for p in range(PROMPT, PROMPT + DECODE)], dim=1)
        mtp = model.mtp_logits(model.hidden_states(tokens[:, :MTP]), tokens[:, 1:MTP + 1])
    return {"prefill": prefill, "decode": decode, "mtp": mtp}


def assert_parallel_logits(name: str, ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor], flips: bool) -> None:
    """A rank's `run_logits` against the single process's, by the criteria of the module docstring:
    flips=False: `exact`'s (the decode steps excepted); True: the one allowing flipped roundings or top-k
    choices."""
    if not flips:
        for key in ref.keys() - {"decode"}:
            assert_close(f"{name} exact {key}", ref[key], out[key])
        ref, out = ({"decode": logits["decode"]} for logits in (ref, out))
    out, ref = (torch.cat([logits[key] for key in ref], dim=1) for logits in (out, ref))  # [B, positions, V]
    errors = (out - ref).norm(dim=-1) / ref.norm(dim=-1)                                # [B, positions]
    median, within, agree = float(errors.median()), float((errors < 1e-3).float().mean()), \
        float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    assert median <= 1e-3 and agree >= 0.97, \
        f"{name} with flips: median {median:.2e}, {within:.1%} within 1e-3, {agree:.1%} tokens agree"
