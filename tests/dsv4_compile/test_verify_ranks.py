"""A parallel build's verification takes every decision that changes its engine calls with all ranks
(verify.token_sets, token_check.check_engine_pair's retry, distributed.collectively): in a spawned gloo
world of 2, rank 1's first token set is over the limit and rank 0's is not, as a rounding flip on one
rank's shard makes it; an "engine call" is an all-reduce on a group of its own (as a build's engines
call theirs), with a short timeout. Deciding per rank, rank 0 stops after one set and rank 1 runs a
second engine call that rank 0 never joins: the hang a tp=2 build's verify once had."""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from dsv4_compile.distributed import RankFailed
from dsv4_compile.model import ModelConfig, Transformer
from dsv4_compile.runtime import EagerSteps
from dsv4_compile.token_check import check_engine_pair
from dsv4_compile.verify import FLIP_BOUND, TOLERANCES, token_sets
from parallel_worlds import spawn_world

TOL, BOUND = TOLERANCES["aoti", "float32"], FLIP_BOUND["float32"]
BUCKET = 128
# What an engine call waits for a rank that never joins it: the test fails in seconds, not hangs.
ENGINE_TIMEOUT = timedelta(seconds=20)


def _engine_group():
    return dist.new_group([0, 1], timeout=ENGINE_TIMEOUT)


def _engine_call(group) -> None:
    """What a build's engine does on every call: a collective on its own process group."""
    dist.all_reduce(torch.ones(1), group=group)


def _token_sets_worker(rank: int, world: int) -> dict:
    group = _engine_group()
    calls = 0

    def flips_first_on_rank1() -> dict:
        nonlocal calls
        calls += 1
        _engine_call(group)
        return {"kind": "short", "batch": 1, "seq": 4, "max_abs": 0.0,
                "rel_rms": 3e-4 if rank == 1 and calls == 1 else 4e-7}

    def raises_on_rank1() -> dict:
        _engine_call(group)
        if rank == 1:
            raise ValueError("output shape [1, 7], eager [1, 8]")
        return {"kind": "short", "batch": 1, "seq": 4, "max_abs": 0.0, "rel_rms": 1.0}

    cases = token_sets(flips_first_on_rank1, TOL)
    try:
        token_sets(raises_on_rank1, TOL)
        raised = None
    except RankFailed as err:
        raised = str(err)
    _engine_call(group)  # both ranks are still in step
    return {"calls": calls, "cases": [c["rel_rms"] for c in cases], "raised": raised}


def test_token_sets_retry_and_fail_on_every_rank_together(tmp_path):
    ranks = spawn_world(_token_sets_worker, 2, tmp_path)
    assert [r["calls"] for r in ranks] == [2, 2], ranks
    assert ranks[0]["cases"] == [4e-7, 4e-7] and ranks[1]["cases"] == [3e-4, 4e-7]
    assert [r["raised"] for r in ranks] == ["rank 1: ValueError: output shape [1, 7], eager [1, 8]"] * 2


class _EngineSteps(EagerSteps):
    """The tiny model as an "engine": every prefill is an engine call; rank 1's first one is off by a
    flip's worth (1e-3 relative), as a rounding flip on one rank's shard would make it."""

    def __init__(self, model, max_batch: int, rank: int):
        super().__init__(model, max_batch)
        self.rank, self.prefills, self.group = rank, 0, _engine_group()

    def _prefill(self, tokens, lengths, cache):
        self.prefills += 1
        _engine_call(self.group)
        logits = super()._prefill(tokens, lengths, cache)
        return logits * (1 + 1e-3) if self.rank == 1 and self.prefills == 1 else logits


def _pair_worker(rank: int, world: int) -> dict:
    model = Transformer(ModelConfig.load("tiny").replace(max_seq_len=BUCKET), seed=0).eval()
    engine = _EngineSteps(model, 3, rank)
    result = check_engine_pair(engine, EagerSteps(model, 3), BUCKET, TOL, BOUND, seed=0, tokens=4)
    _engine_call(engine.group)  # both ranks are still in step
    return {"attempts": result["attempts"], "prefills": engine.prefills, "ok": result["ok"]}


def test_engine_pair_retries_on_every_rank_together(tmp_path):
    ranks = spawn_world(_pair_worker, 2, tmp_path)
    assert [r["attempts"] for r in ranks] == [2, 2] and ranks[0]["prefills"] == ranks[1]["prefills"], ranks
    assert all(r["ok"] for r in ranks), ranks
