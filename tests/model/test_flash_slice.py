"""The flash-slice preset: V4-Flash's real shapes and all 256 experts in 4 layers + MTP, built on the
meta device (no memory): every layer kind and both routings, the flash preset's per-layer tensors,
and parameters plus a 128K cache within one H200."""
import torch

from dsv4_compile.kv_report import context_report
from dsv4_compile.model import ModelConfig, Transformer

H200_BYTES = 141 * 10**9  # 141 GB of HBM3e


def _meta_model(config):
    with torch.device("meta"):
        return Transformer(config, seed=None)


def test_flash_slice_has_flash_shapes_every_layer_kind_and_both_routings():
    flash, sliced = ModelConfig.from_preset("flash"), ModelConfig.from_preset("flash-slice")
    assert sliced.replace(n_layers=flash.n_layers, compress_ratios=flash.compress_ratios, n_hash_layers=3,
                          max_seq_len=flash.max_seq_len, name=flash.name) == flash
    model = _meta_model(sliced)
    assert [block.ffn.gate.hashed for block in model.layers] == [True, True, False, False]
    assert sliced.compress_ratios == (0, 4, 128, 4)                          # window, CSA, HCA, CSA
    assert [block.attn.compressor is not None for block in model.layers] == [False, True, True, True]
    assert len(model.mtp) == 1 and not model.mtp[0].block.ffn.gate.hashed
    # Flash's first 5 layers: 0 hash-routed window-only, 2 hash-routed CSA, 3 scored HCA, 4 scored CSA.
    head = _meta_model(flash.replace(n_layers=5, compress_ratios=flash.compress_ratios[:5], n_mtp_layers=0))
    for ours, theirs in zip(model.layers, (head.layers[0], head.layers[2], head.layers[3], head.layers[4])):
        assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in theirs.named_parameters()}
    assert model.layers[2].ffn.experts.w1.shape == (256, 2048, 4096)
    assert model.layers[1].attn.indexer is not None and model.layers[2].attn.indexer is None


def test_flash_slice_fits_one_h200_with_a_128k_cache():
    config = ModelConfig.from_preset("flash-slice")
    model = _meta_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts == 5 * 3 * 256 * 2048 * 4096                              # 4 layers + MTP
    assert 33e9 < n_params < 35e9
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache_bytes = context_report(config, 131072).total_bytes
    assert weight_bytes + cache_bytes < 0.6 * H200_BYTES, (weight_bytes, cache_bytes)
