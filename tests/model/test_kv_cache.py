"""KVCache buffers: shapes, the meta device, and byte counts against a hand-written formula.

The formula is written out from the release's cache layout (584 B main entries, 68 B FP4 / 132 B FP8
indexer keys, a 128-token window per layer) and the compressor state documented in kv_cache.py,
so it checks the buffers independently of kv_layout's helpers.
"""
from __future__ import annotations

import pytest
import torch

from dsv4_compile.model.config import ModelConfig
from dsv4_compile.model.kv_cache import KVCache

N_1M = 1024 * 1024


def pro_formula(n: int, index_entry: int, batch: int = 1) -> dict[str, int]:
    """V4-Pro: 30 CSA, 31 HCA, 1 window-only (the MTP block); bytes by `kind.part`."""
    entry, window = 584, 128
    csa_state = 8 * 1024 * 4 * 2 + 8 * 256 * 4 * 2  # main compressor (2 x 512 channels, 8 rows) + indexer's (2 x 128)
    hca_state = 128 * 512 * 4 * 2                    # 128 rows x 512 channels, kv and score, fp32
    per_layer = {
        "csa.window": window * entry, "csa.compressed": n // 4 * entry, "csa.indexer": n // 4 * index_entry,
        "csa.compressor_state": csa_state,
        "hca.window": window * entry, "hca.compressed": n // 128 * entry, "hca.compressor_state": hca_state,
        "window.window": window * entry, "window.compressed": 0,
    }
    layers = {"csa": 30, "hca": 31, "window": 1}
    return {key: batch * layers[key.split(".")[0]] * value for key, value in per_layer.items()}


@pytest.fixture(scope="module")
def pro() -> ModelConfig:
    return ModelConfig.from_preset("pro")


@pytest.mark.parametrize("fmt,index_entry", [("fp4", 68), ("fp8", 132)], ids=["fp4", "fp8"])
@pytest.mark.parametrize("n", [8192, N_1M], ids=["8k", "1m"])
def test_pro_bytes_match_formula(pro, n, fmt, index_entry):
    cache = KVCache(pro, 1, n, device="meta", indexer_format=fmt)
    assert cache.nbytes_by_kind() == pro_formula(n, index_entry)


def test_pro_1m_total_by_hand(pro):
    # CSA layer: (128 + 262144) x 584 + 262144 x 68 + 81920 state; HCA layer: (128 + 8192) x 584 + 524288.
    csa = (128 + 262144) * 584 + 262144 * 68 + 81920
    hca = (128 + 8192) * 584 + 524288
    total = 30 * csa + 31 * hca + 128 * 584
    assert total == 5_299_189_760
    assert sum(KVCache(pro, 1, N_1M, device="meta").nbytes_by_kind().values()) == total


def test_batch_scales_every_buffer(pro):
    cache = KVCache(pro, 3, 8192, device="meta")
    assert cache.nbytes_by_kind() == pro_formula(8192, 68, batch=3)


def test_meta_device_allocates_nothing(pro):
    cache = KVCache(pro, 1, N_1M, device="meta")
    tensors = [t for layer in cache.layers for t in (layer.main, layer.index) if t is not None]
    tensors += [s for layer in cache.layers for st in (layer.compressor, layer.index_compressor) if st
                for s in (st.kv, st.score)]
    assert tensors and all(t.is_meta for t in tensors)
    assert len(cache.layers) == 62


def test_tiny_shapes_on_cpu():
    config = ModelConfig.from_preset("tiny")  # ratios 0, 4, 128 + MTP; window 8; head_dim 96 (32 rope)
    cache = KVCache(config, 2, 256)
    assert [layer.ratio for layer in cache.layers] == [0, 4, 128, 0]
    entry = 136  # 64 FP8 + 32 x 2 BF16 + 1 scale + 7 pad
    assert [tuple(layer.main.shape) for layer in cache.layers] == [
        (2, 8, entry), (2, 8 + 64, entry), (2, 8 + 2, entry), (2, 8, entry)]
    csa, hca = cache.layers[1], cache.layers[2]
    assert csa.index.shape == (2, 64, 16 + 1) and csa.index.dtype == torch.uint8  # 32 dims FP4: 16 B + 1 scale
    assert csa.compressor.kv.shape == (2, 8, 192) and csa.index_compressor.kv.shape == (2, 8, 64)
    assert hca.index is None and hca.compressor.kv.shape == (2, 128, 96)
    assert torch.isneginf(csa.compressor.score).all() and not csa.compressor.kv.any()
    assert cache.layers[0].compressor is None and cache.layers[0].index is None


def test_fp8_indexer_entry_is_132_bytes(pro):
    cache = KVCache(pro, 1, 8192, device="meta", indexer_format="fp8")
    assert {layer.index.shape[-1] for layer in cache.layers if layer.index is not None} == {132}


@pytest.mark.parametrize("n", [1000, 8192 + 4], ids=["1000", "8k+4"])
def test_length_not_multiple_of_ratios_is_refused(pro, n):
    with pytest.raises(ValueError, match="multiple of compress ratio"):
        KVCache(pro, 1, n, device="meta")
