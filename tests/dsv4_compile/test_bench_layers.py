"""bench_layers and bench_decode_step run end to end at tiny shapes (kernels in the Triton interpreter,
no torch.compile, no CUDA graph) and write their CSV, markdown and plot: the code paths the GPU run
takes, minus the timing loops and the compiled baselines."""
import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real benchmark")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_layers_rows_and_outputs(tmp_path):
    import bench_layers

    # S = 32: 8 compressed CSA entries (top-4 of them), no complete HCA block (the -1 padded path).
    rows = bench_layers.run_layers((32,), bench_layers.TINY, compile=False, log=lambda *_: None)
    got = {(r["layer"], r["part"], r["impl"]) for r in rows if r["ms"] == r["ms"]}
    assert {("csa", "layer", "triton"), ("csa", "indexer (scores+top-k)", "triton"),
            ("csa", "indexer (scores+top-k)", "triton fp8"), ("csa", "indexer (scores+top-k)", "triton fp8 block_n=64"),
            ("csa", "indexer (scores+top-k)", "triton radix"), ("csa", "indexer (scores+top-k)", "triton fp8 radix"),
            ("csa", "compressor (main)", "triton"), ("csa", "compressor (index)", "triton"), ("hca", "layer", "triton"),
            ("hca", "sparse_attention", "triton"), ("dense", "sdpa causal 4x32", "flash_attention_2")} <= got
    paths = bench_layers.write_outputs(rows, str(tmp_path), bench_layers.TINY)
    assert [Path(p).name for p in paths][:2] == ["layers.csv", "layers.md"]
    assert len(_rows(tmp_path / "layers.csv")) == len(rows)
    md = (tmp_path / "layers.md").read_text()
    assert "Layer vs dense causal attention" in md and "Triton vs torch.compile of the plain op" in md


def test_layers_matches_the_plain_ops():
    """The benchmarked CSA layer computes what the plain dsv4 ops compute from the same inputs."""
    import bench_layers
    from dsv4_compile.metrics import rel_rms
    from dsv4_compile.model import ops

    sh = bench_layers.TINY
    t = bench_layers.make_inputs(32, sh, "csa")
    out = bench_layers.layer_fn(t, "csa", sh)()
    c, ic = t["comp"], t["icomp"]
    entries = ops.compress_kv._init_fn(c["kv"], c["score"], c["ape"], c["norm_weight"], c["cos"], c["sin"], 4, True,
                                       sh.eps, "fp8")
    keys = ops.compress_kv._init_fn(ic["kv"], ic["score"], ic["ape"], ic["norm_weight"], ic["cos"], ic["sin"], 4, True,
                                    sh.eps, "hadamard_fp4")
    picked = ops.indexer_topk._init_fn(t["iq"], t["iw"], keys, t["positions"], 4, sh.topk)
    idx = bench_layers.attention_indices(t, "csa", sh, picked)
    ref = ops.sparse_attention._init_fn(t["q"], torch.cat([t["kv"], entries.to(t["kv"].dtype)], 1), t["sink"], idx,
                                        sh.D ** -0.5)
    assert rel_rms(ref, out) < 1e-5


def test_decode_step_rows_and_outputs(tmp_path):
    import bench_decode_step

    profile, partial = [], []
    rows = bench_decode_step.run_decode_step("tiny", (128, 1024), (2,), compiled=False, log=lambda *_: None,
                                             profile=profile, partial=lambda rows: partial.append(len(rows)))
    assert partial == [len([r for r in rows if r["context"] == 128]), len(rows)]  # as each context ends
    eager = [r for r in rows if r["impl"] == "eager"]
    assert len(eager) == 1 and eager[0]["ms_per_step"] > 0 and eager[0]["rel_rms_vs_eager"] == 0
    assert eager[0]["bytes_per_step"] > 0 and 0 < eager[0]["roofline_pct"] == eager[0]["roofline_pct"]
    assert any("max_seq_len is 512" in r["note"] for r in rows if r["context"] == 1024)
    # the profile of the fastest variant (the only one on the CPU): every op, largest first, shares of one
    # total; its summary: the largest, then the others together and the whole step (their sums)
    assert {(p["context"], p["batch"], p["impl"]) for p in profile} == {(128, 2, "eager")}
    assert len(profile) > bench_decode_step.PROFILE_TOP and sum(p["share"] for p in profile) == pytest.approx(1.0)
    assert all(p["us_per_step"] > 0 and p["calls_per_step"] > 0 for p in profile)
    assert [p["us_per_step"] for p in profile] == sorted((p["us_per_step"] for p in profile), reverse=True)
    *top, others, whole = bench_decode_step.profile_summary(profile)
    assert len(top) == bench_decode_step.PROFILE_TOP
    assert [p["kernel"] for p in top] == [p["kernel"] for p in profile[:len(top)]]
    assert others["kernel"] == f"(the other {len(profile) - len(top)} kernels)"
    assert whole["kernel"] == "(the whole step)"
    for key in ("share", "us_per_step", "calls_per_step"):
        assert sum(p[key] for p in top) + others[key] == pytest.approx(whole[key])
        assert whole[key] == pytest.approx(sum(p[key] for p in profile))
    bench_decode_step.write_outputs(rows, str(tmp_path), profile)
    assert len(_rows(tmp_path / "decode_step.csv")) == len(rows)
    assert "Whole decode step, tiny preset" in (tmp_path / "decode_step.md").read_text()
    md = (tmp_path / "decode_step_profile.md").read_text()
    assert "## context 128, batch 2: eager" in md and "| (the whole step) |" in md
    assert len(_rows(tmp_path / "decode_step_profile.csv")) == len(profile)


def test_decode_step_as_shipped_reads_fewer_bytes_and_writes_its_own_files(tmp_path):
    """--weights as-shipped: the model quantized as a release ships it (tiny: MXFP4 experts; its linears
    are narrower than an FP8 tile), the roofline counting those bytes, the outputs beside bf16's."""
    import bench_decode_step

    runs = {w: bench_decode_step.run_decode_step("tiny", (128,), (2,), compiled=False, log=lambda *_: None, weights=w)
            for w in bench_decode_step.WEIGHTS}
    (bf16,), (shipped,) = ([r for r in rows if r["impl"] == "eager"] for rows in runs.values())
    assert (bf16["weights"], shipped["weights"]) == ("bf16", "as-shipped")
    assert 0 < shipped["bytes_per_step"] < bf16["bytes_per_step"] and shipped["ms_per_step"] > 0
    bench_decode_step.write_outputs(runs["as-shipped"], str(tmp_path))
    assert "tiny preset (as-shipped weights)" in (tmp_path / "decode_step_as_shipped.md").read_text()
    assert not (tmp_path / "decode_step.md").exists()
    with pytest.raises(ValueError, match="weights 'fp8'; accepted: bf16, as-shipped"):
        bench_decode_step.run_decode_step("tiny", (128,), (2,), weights="fp8")


def test_a_variant_off_eager_beyond_the_bound_is_no_result():
    """A step whose logits are further from eager's than verify's bound (0.8 as shipped: an AOTI engine
    at 1.12 on the H100, session 23) is marked wrong: no roofline share, no speed-up, a note saying why."""
    import bench_decode_step

    def row(impl, ms, check):
        return bench_decode_step.step_row("flash-slice", "as-shipped", 8192, 64, impl, ms, check, 0.8, 1e10, 4.0)

    rows = [row("eager", 1000.0, 0.0), row("compiled", 10.0, 0.13), row("AOTI", 8.0, 1.12)]
    assert [r["wrong"] for r in rows] == [False, False, True]
    assert rows[1]["roofline_pct"] == 40.0 and rows[2]["roofline_pct"] != rows[2]["roofline_pct"]
    assert rows[2]["note"] == "WRONG: rel RMS 1.12 > 0.8 (verify's bound for as-shipped weights)"
    (speedups,) = bench_decode_step.speedup_rows(rows)
    assert speedups["compiled x"] == 100.0 and speedups["AOTI x"] != speedups["AOTI x"]
    assert speedups["AOTI ms"] == 8.0  # the time itself stays on record


def test_decode_step_bytes_counts_what_a_step_must_read():
    """The roofline's bytes on tiny at context 128, batch 2, counted here by parameter names and by hand
    from the cache layout (window 8, ratios 0/4/128, top-4, 136-byte entries, 17-byte FP4 indexer keys)."""
    import bench_decode_step
    from dsv4_compile import KVCache, ModelConfig, Transformer

    config = ModelConfig.load("tiny").replace(max_seq_len=128)
    model = Transformer(config, seed=0)
    cache = KVCache(config, 2, 128)
    got = bench_decode_step.decode_step_bytes(model, cache, 128, 2)
    sizes = {name: t.numel() * t.element_size() for name, t in (*model.named_parameters(), *model.named_buffers())}
    experts = sum(n for name, n in sizes.items() if ".ffn.experts." in name and not name.startswith("mtp."))
    rest = sum(n for name, n in sizes.items() if not name.startswith(("mtp.", "embed.")) and ".ffn.experts." not in name)
    hit = 1 - (1 - 2 / 8) ** 2                                  # top-2 of 8 experts, 2 tokens
    assert got["weights"] == pytest.approx(rest + 2 * config.dim * 4 + hit * experts)
    window, csa, hca = 8 * 136, 8 * 136 + 4 * 136 + 32 * 17, 8 * 136 + 1 * 136
    assert got["cache"] == 2 * (window + csa + hca)
    assert got["experts_hit"] == pytest.approx(8 * hit)


def test_run_and_write_prints_the_summary_and_reports_a_failed_run(tmp_path, capsys):
    import bench_layers

    def write(rows, out):
        (Path(out) / "x.md").write_text(f"# summary {len(rows)}\n## All rows\n| detail |\n")
        return [str(Path(out) / "x.md")]

    assert bench_layers.run_and_write(lambda: [{}, {}], write, str(tmp_path), "x.md") == 0
    printed = capsys.readouterr().out
    assert "# summary 2" in printed and "| detail |" not in printed
    assert bench_layers.run_and_write(lambda: 1 / 0, write, str(tmp_path), "x.md") == 1
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_decode_step_engine_variants_parse_into_inductor_options():
    """--engine-inductor-configs: ';'-separated engines, '' the build's own options; a bad item is a
    one-line error naming it."""
    import bench_decode_step

    assert bench_decode_step.parse_inductor_configs(";combo_kernels=True, max_autotune=False") == [
        {}, dict(combo_kernels=True, max_autotune=False)]
    assert bench_decode_step.parse_inductor_configs("") == [{}]
    assert bench_decode_step.engine_variant_name({}) == "AOTI decode engine, CUDA graph"
    assert bench_decode_step.engine_variant_name(dict(combo_kernels=True)) == \
        "AOTI decode engine, CUDA graph [combo_kernels=True]"
    for bad in ("combo_kernels", "=True", "combo_kernels=yes please"):
        with pytest.raises(ValueError, match=f"^inductor option {bad!r}: accepted is key=value"):
            bench_decode_step.parse_inductor_configs(bad)
