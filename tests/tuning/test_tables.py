"""Tuned tables: atomic write and merge, nearest-bucket lookup, safe defaults, hash, ConfigSource."""
import os
import warnings

import pytest
import yaml

from dsv4_compile.tuning import tables
from dsv4_compile.tuning.spaces import get_space


def entry(context, config, phase="prefill", batch=1, ms=1.0):
    return {"phase": phase, "context": context, "batch": batch, "config": config, "latency_ms": ms}


@pytest.fixture
def tdir(tmp_path):
    d = tmp_path / "tables"
    tables.write_entries("H100", [
        ("fp8_quantize", "8k", entry(8192, {"block_elems": 1024, "num_warps": 2})),
        ("fp8_quantize", "128k", entry(131072, {"block_elems": 8192, "num_warps": 8})),
        ("newton_schulz", "any", entry(0, {"block_m": 64, "block_n": 256}, phase="any")),
        ("sparse_attention_cached", "decode-32k-b64", entry(32768, {"num_splits": 4, "block_h": 32}, "decode", 64)),
        ("sparse_attention_cached", "decode-32k-b1", entry(32768, {"num_splits": 16, "block_h": 16}, "decode", 1)),
    ], d)
    return d


def test_write_read_and_merge(tdir):
    path = tables.table_path("NVIDIA H100 80GB HBM3", tdir)
    assert path.name == "H100.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["format"] == 1 and data["gpu"] == "H100"
    assert list(data["kernels"]["fp8_quantize"]) == ["8k", "128k"]
    # A second write replaces one bucket and keeps the others.
    tables.write_entries("H100", [("fp8_quantize", "8k", entry(8192, {"block_elems": 512, "num_warps": 1}))], tdir)
    data = tables.load_table("H100", tdir)
    assert data["kernels"]["fp8_quantize"]["8k"]["config"]["block_elems"] == 512
    assert data["kernels"]["fp8_quantize"]["128k"]["config"]["block_elems"] == 8192
    assert "newton_schulz" in data["kernels"]
    assert sorted(os.listdir(tdir)) == ["H100.yaml", "H100.yaml.lock"]         # no temporary files left


def test_atomic_write_keeps_the_old_table_when_the_write_fails(tdir, monkeypatch):
    path = tables.table_path("H100", tdir)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tables.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        tables.write_entries("H100", [("fp8_quantize", "8k", entry(8192, {"block_elems": 64}))], tdir)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tdir)) == ["H100.yaml", "H100.yaml.lock"]


# Nearest in log2(context); 32k is 2 octaves from both 8k and 128k: a tie goes to the larger bucket.
@pytest.mark.parametrize("context, bucket", [(8192, "8k"), (4096, "8k"), (16384, "8k"), (32768, "128k"),
                                             (65536, "128k"), (131072, "128k"), (1 << 20, "128k")])
def test_nearest_bucket(tdir, context, bucket):
    assert tables.lookup("fp8_quantize", "H100", context, tables_dir=tdir)["bucket"] == bucket


def test_decode_lookup_uses_batch_and_phase(tdir):
    hit = tables.lookup("sparse_attention_cached", "H100", 65536, batch=48, tables_dir=tdir)
    assert hit["bucket"] == "decode-32k-b64"
    hit = tables.lookup("sparse_attention_cached", "H100", 32768, batch=2, tables_dir=tdir)
    assert hit["bucket"] == "decode-32k-b1"
    assert tables.lookup("sparse_attention_cached", "H100", 32768, phase="prefill", tables_dir=tdir) is None
    cfg = tables.tuned_config("sparse_attention_cached", "H100", 32768, batch=64, tables_dir=tdir)
    default = get_space("sparse_attention_cached").default_config("H100", "decode")
    assert (cfg.num_splits, cfg.block_h, cfg.block_k) == (4, 32, default.block_k)


def test_tuned_config_merges_into_the_gpu_default(tdir):
    cfg = tables.tuned_config("fp8_quantize", "NVIDIA H100 80GB HBM3", 8000, tables_dir=tdir)
    assert (cfg.block_elems, cfg.num_warps, cfg.num_stages) == (1024, 2, 1)
    ns = tables.tuned_config("newton_schulz", "H100", 123, tables_dir=tdir)   # context-free: any context
    default = get_space("newton_schulz").default_config("H100")
    assert (ns.block_m, ns.block_n, ns.block_k) == (64, 256, default.block_k)


def test_safe_defaults(tdir):
    space = get_space("fp8_quantize")
    # Unknown GPU, unknown kernel entry, no table at all: the kernel's own default for that GPU.
    assert tables.tuned_config("fp8_quantize", "NVIDIA B200", 8192, tables_dir=tdir) == space.default_config("NVIDIA B200")
    assert tables.tuned_config("hc_pre", "H100", 8192, tables_dir=tdir) == get_space("hc_pre").default_config("H100")
    assert tables.lookup("fp8_quantize", "H200", 8192, tables_dir=tdir) is None
    with pytest.raises(KeyError, match="accepted"):
        tables.tuned_config("nope", "H100", 8192, tables_dir=tdir)


def test_stale_or_broken_tables_fall_back_with_a_warning(tdir):
    tables.write_entries("H100", [("fp8_quantize", "8k", entry(8192, {"block_rows": 4})),        # field gone
                                  ("fp8_quantize", "128k", entry(131072, {"block_elems": 1000}))], tdir)  # not pow2
    default = get_space("fp8_quantize").default_config("H100")
    with pytest.warns(UserWarning, match="no longer has"):
        assert tables.tuned_config("fp8_quantize", "H100", 8192, tables_dir=tdir) == default
    with pytest.warns(UserWarning, match="power of two"):
        assert tables.tuned_config("fp8_quantize", "H100", 131072, tables_dir=tdir) == default
    tables.table_path("H200", tdir).write_text("format: 7\nkernels: {}\n")
    with pytest.warns(UserWarning, match="format 1"):
        assert tables.tuned_config("fp8_quantize", "H200", 8192, tables_dir=tdir) == get_space("fp8_quantize").default_config("H200")


def test_hash_and_config_source(tdir):
    h1 = tables.table_hash("H100", tdir)
    assert tables.table_hash("H200", tdir) == tables.UNTUNED
    source = tables.tables_source(tdir)
    table = source("fp8_quantize.triton", "H100")
    full = get_space("fp8_quantize").default_config("H100")
    # The form the kernel substitutions read (dsv4_compile/passes/kernel_substitutions/_common.py).
    assert table["default"] == full.replace(block_elems=8192, num_warps=8).to_str()           # longest context
    assert table["by_context"] == {"8192": full.replace(block_elems=1024, num_warps=2).to_str(),
                                   "131072": full.replace(block_elems=8192, num_warps=8).to_str()}
    assert tables.pick(table, 100000) == {"block_elems": 8192, "num_warps": 8}
    assert source("decompose.fp8_quantize", "H100") is None      # a decomposition is not the kernel
    assert source("fp8_quantize.triton", "H200") is None
    decode = source("sparse_attention_cached.triton", "H100")
    assert "by_context" not in decode and "num_splits=4" in decode["default"]                   # batch 64 wins
    ns = source("newton_schulz.triton", "H100")
    assert "block_m=64" in ns["default"] and "by_context" not in ns
    tables.write_entries("H100", [("fp8_quantize", "8k", entry(8192, {"block_elems": 256}))], tdir)
    assert tables.table_hash("H100", tdir) != h1
    assert "block_elems=256" in source("fp8_quantize.triton", "H100")["by_context"]["8192"]


def test_the_kernels_substitutions_read_what_config_source_gives(tdir):
    from types import SimpleNamespace

    from dsv4_compile.kernels.fp8_quantize.config import default_config
    from dsv4_compile.kernels.sparse_attention.config import default_config as attn_default
    from dsv4_compile.passes.kernel_substitutions._common import config_string, table_config

    target = SimpleNamespace(gpu="H100", table=tables.config_source("fp8_quantize.triton", "H100", tdir))
    assert table_config(target, default_config, "cuda") == {"config": target.table["default"]}
    tables.write_entries("H100", [("sparse_attention", "8k", entry(8192, {"block_k": 64, "num_stages": 3})),
                                  ("sparse_attention", "32k", entry(32768, {"block_k": 16}))], tdir)
    table = tables.config_source("sparse_attention.triton", "H100", tdir)
    assert "block_k=64" in config_string(table, 5000, attn_default("H100"))
    assert "block_k=16" in config_string(table, 20000, attn_default("H100"))


def test_pass_manager_uuid_follows_the_table(tdir):
    """The ConfigSource hook of dsv4_compile.passes: a table change changes the pass manager's uuid."""
    import torch

    import dsv4_compile  # noqa: F401  (registers torch.ops.dsv4)
    from dsv4_compile.passes import PassManager, Substitution

    sub = Substitution(name="fp8_quantize.tuning_test", op=torch.ops.dsv4.fp8_quantize.default,
                       replacement=lambda x, block_size, pow2_scale, **cfg: torch.ops.dsv4.fp8_quantize(x, block_size, pow2_scale))
    source = tables.tables_source(tdir)
    first = PassManager([sub], gpu="H100", config_source=source)
    assert first.tables["fp8_quantize.tuning_test"]["entries"]["8k"]["config"]["block_elems"] == 1024
    assert PassManager([sub], gpu="H100", config_source=source).uuid() == first.uuid()
    tables.write_entries("H100", [("fp8_quantize", "8k", entry(8192, {"block_elems": 256}))], tdir)
    assert PassManager([sub], gpu="H100", config_source=source).uuid() != first.uuid()
    untuned = PassManager([sub], gpu="H200", config_source=source)
    assert untuned.tables["fp8_quantize.tuning_test"] is None


def test_context_as_the_cli_writes_it(tdir):
    """tuned_config takes '8k' like --context does (model/context.py), and refuses in one line what
    --context refuses."""
    from dsv4_compile.model.context import ContextError

    assert tables.tuned_config("fp8_quantize", "H100", "128k", tables_dir=tdir) == \
        tables.tuned_config("fp8_quantize", "H100", 131072, tables_dir=tdir)
    assert tables.tuned_config("sparse_attention", "cpu", "8k") == get_space("sparse_attention").default_config("cpu")
    for bad, why in (("8q", "bad context length '8q'"), ("100", "unsupported context 100"),
                     ("5m", "unsupported context 5m"), (1.5, "bad context 1.5"), (None, "bad context None")):
        with pytest.raises(ContextError, match=why) as err:
            tables.tuned_config("sparse_attention", "cpu", bad)
        assert "\n" not in str(err.value)
