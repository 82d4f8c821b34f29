"""verify's per-bucket judgement without a build: the token-set retry (a chance flip passes on another
set, a fault fails every set) and the verdict from the best set of each prompt shape."""
from __future__ import annotations

import pytest

from dsv4_compile.verify import FLIP_BOUND, SHORT_ATTEMPTS, TOLERANCES, judge, token_sets

TOL, BOUND = TOLERANCES["aoti", "float32"], FLIP_BOUND["float32"]


def _sets(kind: str, errors: list[float]):
    """A compare() that returns the given errors in turn (and fails if called more often)."""
    pending = list(errors)

    def compare() -> dict:
        assert pending, f"{kind}: token_sets asked for more sets than {errors}"
        return {"kind": kind, "batch": 1, "seq": 4, "rel_rms": pending.pop(0), "max_abs": 0.0}

    return compare


def test_token_sets_stop_at_the_first_set_within_the_limit():
    cases = token_sets(_sets("full", [8.0e-2, 3.0e-4, 1e-7]), BOUND)
    assert [c["rel_rms"] for c in cases] == [8.0e-2, 3.0e-4]


def test_token_sets_try_every_attempt_of_a_fault():
    cases = token_sets(_sets("short", [0.3] * SHORT_ATTEMPTS), TOL)
    assert len(cases) == SHORT_ATTEMPTS


def _bucket(short: list[float], full: list[float], random: list[float]) -> list[dict]:
    return [*token_sets(_sets("short", short), TOL), *token_sets(_sets("full", full), BOUND),
            *token_sets(_sets("random", random), BOUND)]


def test_a_flip_cascade_on_one_long_set_passes():
    verdict = judge(_bucket([4e-7], [8.0e-2, 2e-5], [3e-7]), TOL, BOUND)
    assert verdict["ok"] and verdict["error"] is None
    assert verdict["rel_rms"] == 4e-7 and verdict["max_rel_rms"] == 2e-5


@pytest.mark.parametrize("short, full, random, message", [
    ([0.3] * 3, [0.3] * 3, [0.3] * 3, "short prompt rel RMS 3.00e-01 > 1e-05"),      # a wrong op: every set
    ([2e-3, 1e-3, 5e-3], [1e-3], [1e-3], "short prompt rel RMS 1.00e-03 > 1e-05"),  # best short set counts
    ([4e-7], [0.2, 0.3, 0.1], [3e-7], "rel RMS 1.00e-01 > 5e-02 (beyond quantization flips)"),
])
def test_a_fault_in_every_set_fails(short, full, random, message):
    verdict = judge(_bucket(short, full, random), TOL, BOUND)
    assert not verdict["ok"] and verdict["error"] == message


def test_nan_positions_that_differ_fail_whatever_the_error():
    cases = _bucket([4e-7], [2e-5], [3e-7])
    cases[1]["nan_mismatch"] = True
    verdict = judge(cases, TOL, BOUND)
    assert not verdict["ok"] and verdict["error"] == "NaN positions differ"
