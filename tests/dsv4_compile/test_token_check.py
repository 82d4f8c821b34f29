"""Verification by tokens (dsv4_compile/token_check.py): passes for the eager model against itself and
fails for engines with the faults a user would notice (other weights, an off-by-one position, a
dropped FP8 rounding, a cache that forgets the prompt)."""
from __future__ import annotations

import pytest
import torch

from dsv4_compile import ModelConfig, Transformer
from dsv4_compile.runtime import EagerSteps
from dsv4_compile.token_check import check_engine_pair
from dsv4_compile.verify import FLIP_BOUND, TOLERANCES

BUCKET = 128
TOL, BOUND = 1e-5, 5e-2  # verify.TOLERANCES["aoti", "float32"], verify.FLIP_BOUND["float32"]


def _model(**changes):
    return Transformer(ModelConfig.load("tiny").replace(max_seq_len=BUCKET, **changes), seed=0).eval()


@pytest.fixture(scope="module")
def eager():
    return EagerSteps(_model(), max_batch=3)


def test_the_model_against_itself_passes_with_every_token(eager):
    result = check_engine_pair(EagerSteps(_model(), 3), eager, BUCKET, TOL, BOUND, seed=0, tokens=12)
    assert result["ok"], result
    assert result["tokens_matched"] == result["tokens_compared"] == 3 * 12
    assert result["rel_rms"] == 0.0 and result["decode_vs_prefill_rel_rms"] < 1e-3


class _OffByOne(EagerSteps):
    def _decode(self, tokens, positions, cache):
        return super()._decode(tokens, positions + 1, cache)


class _ForgetfulPrefill(EagerSteps):
    """Prefill fills only the window ring: the compressed entries of the prompt are lost."""

    def _prefill(self, tokens, lengths, cache):
        logits = super()._prefill(tokens, lengths, cache)
        for layer in self._layout.with_tensors(cache.tensors).layers:
            layer.main[:, layer.main.shape[1] - (BUCKET // layer.ratio if layer.ratio else 0):].zero_()
        return logits


@pytest.mark.parametrize("make, what", [
    (lambda: EagerSteps(Transformer(ModelConfig.load("tiny").replace(max_seq_len=BUCKET), seed=1).eval(), 3), "other weights"),
    (lambda: _OffByOne(_model(), 3), "decode one position late"),
    (lambda: _ForgetfulPrefill(_model(), 3), "prefill loses the compressed entries"),
    (lambda: EagerSteps(_model(route_scale=1.6), 3), "a 7% change of one routing constant"),
])
def test_faulty_engines_fail(eager, make, what):
    """One attempt (a fault fails every attempt; the retries are for rounding flips) of 6 tokens."""
    result = check_engine_pair(make(), eager, BUCKET, TOL, BOUND, seed=0, attempts=1, tokens=6)
    assert not result["ok"], f"{what}: passed ({result})"


class _RoundsItsOwnWay(EagerSteps):
    """Each call's logits carry their own relative error of about `noise` (as a bf16 engine's prefill and
    decode GEMMs round differently from eager's and from each other): within (a)'s tolerance per path."""

    def __init__(self, model, max_batch, noise):
        super().__init__(model, max_batch)
        self._noise, self._gen = noise, torch.Generator().manual_seed(0)

    def _perturbed(self, logits):
        return logits * (1 + self._noise * torch.randn(logits.shape, generator=self._gen))

    def _prefill(self, tokens, lengths, cache):
        return self._perturbed(super()._prefill(tokens, lengths, cache))

    def _decode(self, tokens, positions, cache):
        return self._perturbed(super()._decode(tokens, positions, cache))


def test_paths_that_each_round_within_the_tolerance_pass_c(eager):
    """(c) bounds the gap between the engine's two paths by eager's gap plus twice the tolerance: an engine
    whose prefill and decode are each within the bf16 tolerance of eager passes with a gap far above
    PATH_TOLERANCE, and the same engine fails at the fp32 tolerance."""
    bf16_tol, bf16_bound = TOLERANCES["aoti", "bfloat16"], FLIP_BOUND["bfloat16"]
    result = check_engine_pair(_RoundsItsOwnWay(_model(), 3, 5e-3), eager, BUCKET, bf16_tol, bf16_bound, seed=0,
                               attempts=1, tokens=6)
    assert result["ok"], result
    assert 1e-3 < result["decode_vs_prefill_rel_rms"] <= result["decode_vs_prefill_bound"] <= 1e-3 + 2 * bf16_tol
    strict = check_engine_pair(_RoundsItsOwnWay(_model(), 3, 5e-3), eager, BUCKET, TOL, BOUND, seed=0, attempts=1,
                               tokens=6)
    assert not strict["ok"], strict


class _WrongPastThreeRows(EagerSteps):
    """Decode right for the first three rows only (a launch sized for fewer rows than the batch)."""

    def _decode(self, tokens, positions, cache):
        logits = super()._decode(tokens, positions, cache)
        logits[3:] = logits[3:].flip(-1)
        return logits


@pytest.mark.parametrize("make, ok", [(lambda: EagerSteps(_model(), 5), True), (lambda: _WrongPastThreeRows(_model(), 5), False)],
                         ids=["right", "wrong past three rows"])
def test_the_largest_batch_is_checked_in_every_row(make, ok):
    """(a)-(c) use at most three sequences; (d) runs the engine's largest batch (5 here), every row held to
    the flip bound: an engine wrong only past three rows passes (a)-(c) and fails there."""
    result = check_engine_pair(make(), EagerSteps(_model(), 5), BUCKET, TOL, BOUND, seed=0, attempts=1, tokens=6)
    assert result["full_batch"] == 5 and result["ok"] is ok, result
    assert (result["full_batch_max_rel_rms"] == 0.0) if ok else "at the largest batch (5)" in result["error"]
