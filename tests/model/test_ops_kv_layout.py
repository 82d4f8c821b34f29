"""model/kv_layout.py: entry sizes, the bytes of a packed main entry (built by hand in naive_ops), and
exact pack/unpack round trips for the values the model produces.

Everything here is compared exactly: model-produced main entries are FP8-simulated with power-of-two
scales (their re-quantization is lossless: the new pow2 scale can only be the same or smaller, and
code * 2^m stays on the e4m3 grid) and BF16-exact rope dims; FP4-simulated indexer keys with pow2
scales re-quantize to the same codes. Only the "fp8" indexer format is lossy (one float32 scale per
key), judged by SQNR like the FP8 quantizer (>= 28 dB).
"""
from __future__ import annotations

import pytest
import torch

import dsv4_compile.model.ops  # noqa: F401  (registers torch.ops.dsv4.*)
import naive_ops as naive
from dsv4_compile.model.kv_layout import (indexer_entry_bytes, main_entry_bytes, pack_indexer_keys,
                                          pack_main_entries, unpack_indexer_keys, unpack_main_entries)
from helpers import sqnr_db


def test_entry_sizes():
    assert main_entry_bytes(512, 64) == 584  # 448 fp8 + 128 bf16 + 7 scales + 1 pad
    assert indexer_entry_bytes(128, "fp4") == 68  # 64 packed + 4 scales
    assert indexer_entry_bytes(128, "fp8") == 132  # 128 fp8 + one float32 scale
    assert main_entry_bytes(192, 64) == 128 + 128 + 2 + 6  # padded to a multiple of 8
    with pytest.raises(ValueError, match="fp16"):
        indexer_entry_bytes(128, "fp16")


def model_main_entries(shape, D, R, seed=0) -> torch.Tensor:
    """What the model writes: non-rope dims FP8-simulated (block 64, pow2 scales, by the naive twin),
    rope dims rounded to BF16. Blocks span several orders of magnitude; one block is all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g) * 10.0 ** torch.empty(*shape, 1).uniform_(-3, 2, generator=g)
    x.view(-1, D)[0, :64] = 0.0
    nope = naive.fp8_simulate(x[..., :D - R], 64).float()
    return torch.cat([nope, x[..., D - R:].bfloat16().float()], dim=-1)


MAIN_SHAPES = [
    pytest.param((2, 5), 512, 64, id="B2xN5-D512-R64"),
    pytest.param((3,), 192, 64, id="N3-D192-R64"),
    pytest.param((1, 1, 2), 128, 0, id="1x1x2-D128-R0"),
]


@pytest.mark.parametrize("shape,D,R", MAIN_SHAPES)
def test_main_entry_bytes_match_hand_built(shape, D, R):
    kv = model_main_entries(shape, D, R)
    packed = pack_main_entries(kv, R)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape, main_entry_bytes(D, R))
    rows = kv.reshape(-1, D).tolist()
    ref = torch.tensor([naive.pack_main_entry(r, R) for r in rows], dtype=torch.uint8).reshape(packed.shape)
    assert torch.equal(packed, ref)


@pytest.mark.parametrize("shape,D,R", MAIN_SHAPES)
def test_main_entry_round_trip_is_exact(shape, D, R):
    kv = model_main_entries(shape, D, R, seed=1)
    out = unpack_main_entries(pack_main_entries(kv, R), D, R)
    assert out.dtype == torch.float32
    assert torch.equal(out, kv)
    # and a second trip is byte-identical
    assert torch.equal(pack_main_entries(out, R), pack_main_entries(kv, R))


def test_main_entry_round_trip_from_bf16_model_values():
    """The model may hold kv in bf16: FP8-simulated values of a bf16 tensor are bf16-exact, so the
    round trip is still exact."""
    kv = model_main_entries((4,), 512, 64, seed=2).bfloat16()
    assert torch.equal(unpack_main_entries(pack_main_entries(kv, 64), 512, 64), kv.float())


@pytest.mark.parametrize("shape", [pytest.param((3, 7), id="3x7"), pytest.param((1,), id="1")])
def test_indexer_fp4_round_trip_is_exact(shape):
    g = torch.Generator().manual_seed(3)
    keys = naive.fp4_simulate(torch.randn(*shape, 128, generator=g) * 3, 32).float()
    packed = pack_indexer_keys(keys, "fp4")
    assert packed.shape == (*shape, 68) and packed.dtype == torch.uint8
    assert torch.equal(unpack_indexer_keys(packed, 128, "fp4"), keys)


def test_indexer_fp8_round_trip_is_close():
    g = torch.Generator().manual_seed(4)
    keys = naive.fp4_simulate(torch.randn(64, 128, generator=g), 32).float()
    packed = pack_indexer_keys(keys, "fp8")
    assert packed.shape == (64, 132)
    out = unpack_indexer_keys(packed, 128, "fp8")
    db = sqnr_db(keys, out)
    assert db >= 28.0, f"fp8 indexer keys SQNR {db:.1f} dB"
