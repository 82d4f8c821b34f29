"""Search spaces: params are real config fields, defaults are candidates, rules prune per GPU and problem."""
import dataclasses

import pytest

from dsv4_compile.model.config import ModelConfig
from dsv4_compile.tuning.spaces import SPACES, canonical_gpu, get_space, gpu_spec

FLASH = ModelConfig.load("flash")
CONTEXTS = (8192, 32768, 131072)


def problems(space, contexts=CONTEXTS):
    for phase in space.phases:
        for ctx in contexts:
            yield space.make_problem(FLASH, ctx, 64 if phase == "decode" else 1, phase)


@pytest.mark.parametrize("name", list(SPACES))
def test_params_are_config_fields_and_defaults_are_candidates(name):
    space = SPACES[name]
    assert space.unavailable() is None, space.unavailable()
    fields = {f.name for f in dataclasses.fields(space.config_cls())}
    assert {p.name for p in space.params if not p.optional} <= fields
    assert {p.name for p in space.active_params()} <= fields
    for gpu in ("H100", "H200", "generic"):
        spec = gpu_spec(gpu)
        for problem in problems(space):
            default = space.default_params(problem, spec)
            choices = space.choices(problem, spec)
            assert all(default[k] in choices[k] for k in default), (gpu, problem.bucket)
            cfg = space.make_config(default, gpu, "decode" if problem.phase == "decode" else "prefill")
            # The GPU's own default must never be rejected as impossible (it is the baseline).
            assert space.check(cfg, problem, spec, baseline=True) is None, (gpu, problem.bucket)


def test_buckets_and_shapes_follow_context_batch_and_phase():
    fp8 = get_space("fp8_quantize")
    p8, p32 = fp8.make_problem(FLASH, 8192), fp8.make_problem(FLASH, 32768)
    assert (p8.bucket, p32.bucket) == ("8k", "32k")
    assert p8.dim("rows") == 2048 and p32.dim("rows") == 8192 and p8.dim("cols") == 448
    assert fp8.make_problem(FLASH, 8192, batch=4).bucket == "8k-b4"
    dec = get_space("sparse_attention_cached").make_problem(FLASH, 32768, 64, "decode")
    assert dec.bucket == "decode-32k-b64" and dec.dim("B") == 64 and dec.dim("N") == 128 + 8192
    ns = get_space("newton_schulz")
    assert ns.make_problem(FLASH, 8192).bucket == ns.make_problem(FLASH, 131072).bucket == "any"
    with pytest.raises(ValueError, match="phase"):
        fp8.make_problem(FLASH, 8192, phase="decode")


def test_hard_rules_prune_before_running():
    ns = get_space("newton_schulz")
    problem = ns.make_problem(FLASH, 8192)
    h100 = gpu_spec("H100")
    base = ns.default_params(problem, h100)
    # Accumulator 256x256 over 4 warps: 512 fp32 a thread.
    kind, reason = ns.check(ns.make_config({**base, "block_m": 256, "block_n": 256, "num_warps": 4}, "H100"), problem, h100)
    assert kind == "hard" and "accumulator" in reason
    # Shared memory: 5 stages of (256x128 + 128x128) bf16 = 480 KB > 227 KB.
    cfg = ns.make_config({**base, "block_m": 256, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 5}, "H100")
    kind, reason = ns.check(cfg, problem, h100)
    assert kind == "hard" and "shared memory" in reason


def test_rules_are_keyed_by_gpu():
    attn = get_space("sparse_attention")
    problem = attn.make_problem(FLASH, 8192)
    cfg = attn.make_config({"block_h": 64, "block_k": 64, "num_warps": 8, "num_stages": 2}, "H100")
    # 2 stages of [64, 512] bf16 + [64, 64] probabilities = 136 KB: fits an H100 (227 KB), not 99 KB.
    assert attn.check(cfg, problem, gpu_spec("H100")) is None
    kind, reason = attn.check(cfg, problem, gpu_spec("RTX 4090"))
    assert kind == "hard" and "shared memory" in reason
    h100, generic = (attn.count_valid(problem, gpu_spec(g)) for g in ("H100", "some other GPU"))
    assert h100[0] == generic[0] and h100[1] > generic[1]


def test_attention_split_d_halves_the_accumulator():
    """split_d = 2 at V4's 64 x 512 heads: acc [64, 256] over 4 warps is 128 fp32 a thread (allowed),
    split_d = 1 over 4 warps is 256 (pruned); the shared memory rule counts the value columns' tiles."""
    h100 = gpu_spec("H100")
    for name, phase, batch in (("sparse_attention", "prefill", 1), ("sparse_attention_cached", "decode", 64)):
        space = get_space(name)
        problem = space.make_problem(FLASH, 8192, batch, phase)
        base = {"block_h": 64, "block_k": 16, "num_warps": 4, "num_stages": 2, "num_splits": 1}
        kind, reason = space.check(space.make_config({**base, "split_d": 1}, "H100", phase), problem, h100)
        assert kind == "hard" and "[64, 512] over 4 warps" in reason
        assert space.check(space.make_config({**base, "split_d": 2}, "H100", phase), problem, h100) is None
        # 3 stages of [64, 512] bf16 + [64, 64] = 200 KB fit the H100's 227 KB; the value columns'
        # 3 x [64, 256] more (296 KB) do not
        deep = {**base, "block_k": 64, "num_stages": 3, "num_warps": 8}
        assert space.check(space.make_config({**deep, "split_d": 1}, "H100", phase), problem, h100) is None
        kind, reason = space.check(space.make_config({**deep, "split_d": 2}, "H100", phase), problem, h100)
        assert kind == "hard" and "shared memory ~296 KB" in reason


def test_attention_dequant_chunks_is_a_decode_choice_with_small_tiles():
    """The decode space tunes dequant ("tile" / "chunks", the prefill space does not: its kernel has
    no FP8 cache); a "chunks" config stages 64-column chunks only, so 3 stages of block_k 64 with
    split_d 2 pass the shared memory rule that prunes the same "tile" config."""
    decode, prefill = get_space("sparse_attention_cached"), get_space("sparse_attention")
    h100 = gpu_spec("H100")
    problem = decode.make_problem(FLASH, 8192, 64, "decode")
    assert set(decode.choices(problem, h100)["dequant"]) == {"tile", "chunks"}
    assert "dequant" not in prefill.choices(prefill.make_problem(FLASH, 8192, 1, "prefill"), h100)
    deep = {"block_h": 64, "block_k": 64, "num_warps": 8, "num_stages": 3, "num_splits": 4, "split_d": 2}
    assert decode.check(decode.make_config({**deep, "dequant": "chunks"}, "H100", "decode"), problem, h100) is None
    kind, reason = decode.check(decode.make_config({**deep, "dequant": "tile"}, "H100", "decode"), problem, h100)
    assert kind == "hard" and "shared memory" in reason


def test_redundant_rules_depend_on_the_problem_but_spare_the_baseline():
    fp8 = get_space("fp8_quantize")
    h100 = gpu_spec("H100")
    tiny = fp8.make_problem(FLASH, 16)                        # 4 rows x 7 blocks of 64 = 28 blocks
    wide = fp8.make_config({"block_elems": 4096, "num_warps": 4}, "H100")
    kind, reason = fp8.check(wide, tiny, h100)
    assert kind == "redundant" and "the tensor has 28" in reason
    assert fp8.check(wide, tiny, h100, baseline=True) is None
    assert fp8.check(wide, fp8.make_problem(FLASH, 8192), h100) is None
    decode = get_space("sparse_attention_cached")
    p = decode.make_problem(FLASH, 8192, 64, "decode")        # K = 640: 10 steps of 64
    cfg = decode.make_config({"block_k": 64, "num_splits": 16, "num_warps": 8, "block_h": 16}, "H100", "decode")
    assert decode.check(cfg, p, h100)[0] == "redundant"


def test_a_space_out_of_date_with_its_kernel_is_reported_not_run():
    import dataclasses as dc

    from dsv4_compile.tuning.spaces import Param

    fp8 = get_space("fp8_quantize")
    stale = dc.replace(fp8, params=fp8.params + (Param("block_rows", (1, 2)),))
    assert "out of date" in stale.unavailable() and "block_rows" in stale.unavailable()
    tolerant = dc.replace(fp8, params=fp8.params + (Param("block_rows", (1, 2), optional=True),))
    assert tolerant.unavailable() is None and "block_rows" not in {p.name for p in tolerant.active_params()}


def test_invalid_values_are_refused_by_the_dataclass():
    hc = get_space("hc_pre")
    with pytest.raises(ValueError):
        hc.make_config({"block_k": 8}, "H100")                # tl.dot needs >= 16
    with pytest.raises(ValueError, match="no field"):
        hc.make_config({"not_a_field": 1}, "H100")


def test_hc_pre_few_token_blocks_rules():
    """block_t below 16 (the mixes as fp32 FMAs at decode): valid at a decode step's tokens; its products tile
    bounded like the others; dot_precision then unused (redundant but for ieee)."""
    hc, h100 = get_space("hc_pre"), gpu_spec("H100")
    b1 = hc.make_problem(FLASH, 8192, 1, "decode")
    base = hc.default_params(b1, h100)
    assert hc.check(hc.make_config({**base, "block_t": 1, "dot_precision": "ieee"}, "H100", "decode"), b1, h100) is None
    kind, reason = hc.check(hc.make_config({**base, "block_t": 8, "block_k": 256, "dot_precision": "ieee"}, "H100",
                                           "decode"), b1, h100)
    assert kind == "hard" and "products 8x256x32" in reason
    kind, reason = hc.check(hc.make_config({**base, "block_t": 1, "dot_precision": "tf32x3"}, "H100", "decode"), b1, h100)
    assert kind == "redundant" and "fp32 FMAs" in reason


def test_code_version_is_stable_and_tracks_problem_and_choices():
    sink = get_space("hc_sinkhorn")
    h100 = gpu_spec("H100")
    p8, p32 = sink.make_problem(FLASH, 8192), sink.make_problem(FLASH, 32768)
    assert sink.code_version(p8, h100) == sink.code_version(p8, h100)
    assert sink.code_version(p8, h100) != sink.code_version(p32, h100)
    pro = ModelConfig.load("pro")
    assert sink.code_version(sink.make_problem(pro, 8192), h100) == sink.code_version(p8, h100)  # same shapes
    hc = get_space("hc_pre")
    assert hc.code_version(hc.make_problem(pro, 8192), h100) != hc.code_version(hc.make_problem(FLASH, 8192), h100)
    assert any(f.name == "hc_sinkhorn.py" for f in sink.source_files())


def test_gpu_names():
    assert canonical_gpu("NVIDIA H100 80GB HBM3") == "H100" and canonical_gpu("h200") == "H200"
    assert canonical_gpu("cpu") == "cpu" and canonical_gpu("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100-SXM4-80GB"
    assert gpu_spec("H100").smem_per_block == 232448 and gpu_spec("weird").smem_per_block == gpu_spec("generic").smem_per_block
    assert gpu_spec("weird").name == "weird"


def test_compress_kv_problem_and_rules():
    space = get_space("compress_kv")
    h100 = gpu_spec("H100")
    p = space.make_problem(FLASH, 8192)
    assert p.bucket == "8k" and (p.dim("T"), p.dim("d"), p.dim("index_d"), p.dim("hca_ratio")) == (8192, 512, 128, 128)
    base = space.default_params(p, h100)
    assert (base["block_r"], base["block_c"]) == (32, 32)
    # block_r = 64 rows a step: 16 CSA entries of 4 rows, x 512 channels over 4 warps = 256 values a thread.
    kind, reason = space.check(space.make_config({**base, "block_r": 64, "block_c": 512, "num_warps": 4}, "H100"), p, h100)
    assert kind == "hard" and "csa: tile 16x4x512" in reason
    # The indexer's 128-channel rows clamp block_c; the HCA call takes one entry of 128 rows at most.
    kind, reason = space.check(space.make_config({**base, "block_r": 128, "block_c": 512, "num_warps": 8,
                                                  "num_stages": 1}, "H100"), p, h100)
    assert kind == "hard" and "csa: tile 32x4x512" in reason
    assert space.check(space.make_config({**base, "block_r": 128, "block_c": 128, "num_warps": 8, "num_stages": 1},
                                         "H100"), p, h100) is None
    # 4 stages of [32 rows, 512 channels] fp32 kv + score tiles = 512 KB.
    kind, reason = space.check(space.make_config({**base, "block_r": 32, "block_c": 512, "num_warps": 16,
                                                  "num_stages": 4}, "H100"), p, h100)
    assert kind == "hard" and "shared memory" in reason
    # block_c beyond the widest row (512 channels) is clamped by the launcher.
    kind, reason = space.check(space.make_config({**base, "block_c": 1024, "num_warps": 16, "num_stages": 1}, "H100"), p, h100)
    assert kind == "redundant" and "clamped" in reason
    # A model without HCA layers: CSA blocks of 4 rows, so block_r >= 4 takes whole blocks and stages idle.
    csa_only = space.make_problem(dataclasses.replace(FLASH, compress_ratios=(0, 4, 4)), 8192)
    assert csa_only.dim("hca_ratio") == 0
    kind, reason = space.check(space.make_config({**base, "block_r": 4, "num_stages": 2}, "H100"), csa_only, h100)
    assert kind == "redundant" and "nothing to pipeline" in reason
    assert space.check(space.make_config({**base, "block_r": 2, "num_stages": 2}, "H100"), csa_only, h100) is None
    assert space.check(space.make_config({**base, "block_r": 128, "num_stages": 1}, "H100"), csa_only, h100) is None
    valid = space.count_valid(p, h100)
    assert valid[0] == 960 and 100 < valid[1] < 960


def test_indexer_topk_problem_and_rules():
    space = get_space("indexer_topk")
    h100 = gpu_spec("H100")
    p = space.make_problem(FLASH, 32768)
    assert (p.dim("S"), p.dim("N"), p.dim("H"), p.dim("d"), p.dim("topk")) == (32768, 8192, 64, 128, 512)
    assert (p.dim("q_dtype"), p.dim("k_dtype")) == ("bfloat16", "float32")
    assert space.make_problem(ModelConfig.load("pro"), 32768).dim("topk") == 1024
    base = space.default_params(p, h100)
    assert base["block_s"] == 2                               # bf16 q: 2 queries x 64 heads = M 128
    kind, reason = space.check(space.make_config({**base, "block_n": 256, "num_warps": 2}, "H100"), p, h100)
    assert kind == "hard" and "score accumulator [128, 256]" in reason
    # block_s 4 x 64 heads x block_n 64 over 8 warps, buffer_factor 2: 64 for q + max(64 fp32
    # accumulator, 64 for the [4, 1024] int64 compaction sort) + 2 for the tile's keys.
    cfg = space.make_config({**base, "block_s": 4, "block_n": 64, "num_warps": 8, "buffer_factor": 2}, "H100")
    assert space.check(cfg, p, h100) is None
    # buffer_factor 4 (the H100 default): a [4, 2048] sort, 128 registers a thread: at the limit, still fits.
    assert base["buffer_factor"] == 4
    assert space.check(space.make_config({**base, "block_s": 4, "block_n": 64, "buffer_factor": 4}, "H100"), p, h100) is None
    kind, reason = space.check(space.make_config({**base, "block_s": 4, "block_n": 64, "buffer_factor": 8}, "H100"), p, h100)
    assert kind == "hard" and "compaction sort [4, 4096]" in reason
    # block_s 8: the resident bf16 q tile [512, 128] alone is 128 registers a thread.
    cfg = space.make_config({**base, "block_s": 8, "block_n": 64, "num_warps": 8, "buffer_factor": 2,
                             "score_rows": "heads"}, "H100")
    kind, reason = space.check(cfg, p, h100)
    assert kind == "hard" and "resident q tile" in reason
    # score_rows=keys beyond 256 columns or 8 warps: refused by the kernel (wrong results measured), pruned.
    assert base["score_rows"] == "keys"
    for bad in ({"block_s": 8, "block_n": 64, "num_warps": 16, "num_stages": 1}, {"num_warps": 16}):
        kind, reason = space.check(space.make_config({**base, **bad}, "H100"), p, h100)
        assert kind == "hard" and "score_rows=keys" in reason and "wrong results" in reason
    assert space.check(space.make_config({**base, "num_warps": 16, "score_rows": "heads"}, "H100"), p, h100) is None
    # 4 stages of [256, 128] bf16 key tiles (the launcher rounds the fp32 keys) = 256 KB.
    kind, reason = space.check(space.make_config({**base, "block_n": 256, "num_warps": 16, "num_stages": 4,
                                                  "score_rows": "heads"}, "H100"), p, h100)
    assert kind == "hard" and "shared memory" in reason
    # score_mma=fp8: e4m3 key tiles (the launcher converts q and keys), half the bytes: 128 KB fits.
    assert base["score_mma"] == "bf16"
    assert space.check(space.make_config({**base, "block_n": 256, "num_warps": 16, "num_stages": 4,
                                          "score_rows": "heads", "score_mma": "fp8"}, "H100"), p, h100) is None
    tiny = space.make_problem(FLASH, 64)                      # 16 keys
    kind, reason = space.check(space.make_config({**base, "block_n": 64}, "H100"), tiny, h100)
    assert kind == "redundant" and "16 keys" in reason
    # 1024 keys fit in buffer_factor 2's 1024 slots: no compaction, so 4 only lengthens the final sort.
    kind, reason = space.check(space.make_config({**base, "buffer_factor": 4}, "H100"), space.make_problem(FLASH, 4096), h100)
    assert kind == "redundant" and "without a compaction" in reason
    assert space.check(space.make_config({**base, "buffer_factor": 4}, "H100"), p, h100) is None
    # selection=radix (default threshold): no candidate rows, so no compaction sort ([4, 4096] is refused
    # above only for it) and buffer_factor is ignored (pruned as redundant beyond 2)
    assert base["selection"] == "threshold"
    radix = {**base, "block_s": 4, "block_n": 64, "selection": "radix"}
    assert space.check(space.make_config({**radix, "buffer_factor": 2}, "H100"), p, h100) is None
    kind, reason = space.check(space.make_config({**radix, "buffer_factor": 8}, "H100"), p, h100)
    assert kind == "redundant" and "ignored by selection=radix" in reason
    # fp32 models take the exact path: one query a program, fp32 key tiles.
    p32 = space.make_problem(dataclasses.replace(FLASH, dtype="float32"), 32768)
    kind, reason = space.check(space.make_config({**base, "block_s": 4}, "H100"), p32, h100)
    assert kind == "redundant" and "exact" in reason
    kind, reason = space.check(space.make_config({**base, "block_s": 1, "block_n": 128, "num_stages": 4}, "H100"), p32, h100)
    assert kind == "hard" and "shared memory" in reason       # 4 stages of [128, 128] fp32 = 256 KB


def test_moe_experts_problem_and_rules():
    """Decode: T = the batch; prefill: context x batch tokens; the two launches' accumulators and
    shared memory are checked separately; a column tile wider than the matrix, 32-row blocks when
    each expert gets at most one row and a split count that runs its half's ranges are redundant."""
    space = get_space("moe_experts")
    h200 = gpu_spec("H200")
    dec = space.make_problem(FLASH, 32768, 64, "decode")
    pre = space.make_problem(FLASH, 8192, 1, "prefill")
    assert (dec.dim("T"), pre.dim("T"), pre.dim("E"), pre.dim("k"), pre.dim("I")) == (64, 8192, 256, 6, 2048)
    assert dec.work_bytes < pre.work_bytes
    base = space.default_params(pre, h200)
    kind, reason = space.check(space.make_config({**base, "block_m": 128, "block_n": 256, "num_warps": 4}, "H200"), pre, h200)
    assert kind == "hard" and "gate/up accumulators" in reason
    cfg = space.make_config({**base, "block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 5}, "H200")
    kind, reason = space.check(cfg, pre, h200)
    assert kind == "hard" and "shared memory" in reason
    one_row = space.make_problem(FLASH, 8192, 8, "decode")                  # 48 assignments over 256 experts
    cfg = space.make_config({**space.default_params(one_row, h200), "block_m": 32}, "H200", "decode")
    kind, reason = space.check(cfg, one_row, h200)
    assert kind == "redundant" and "one row per expert" in reason
    # split-K ranges: split_k // T of them; at T = 8, split_k 8 runs one range as 4 does (2: the split path's
    # one range, 1: the unsplit launches); at one token each count its own
    one_token = space.make_problem(FLASH, 8192, 1, "decode")
    for name in ("split_k", "down_split_k"):
        cfg = space.make_config({**space.default_params(one_row, h200), name: 8}, "H200", "decode")
        kind, reason = space.check(cfg, one_row, h200)
        assert kind == "redundant" and f"{name} 8 at T = 8: 1 range(s) (split_k // T), as {name} 4" in reason
        assert space.check(cfg, one_token, h200) is None
        assert space.check(cfg.replace(**{name: 2}), one_row, h200) is None


def test_moe_experts_fp8_spaces_tile_each_op():
    """The FP8 ops' spaces: the bf16 space's problems with FP8 weights (fewer bytes of work) and no act
    among the choices (the op decides, not a config); the W8A8 space's problems say act fp8, its block_n
    takes whole activation blocks (128, 256) where the gate/up epilogue rounds (act_round gate_up, its
    default), any where a pass does, and its default the prefill default's W8A8 tiles (K tiles of 128);
    W8A8's FP8 tiles counted at one byte (128 x 128 x 128 over 3 stages: 96 KB, as the sm_90a compile),
    W8A16's at two."""
    w8a16, w8a8, bf16 = get_space("moe_experts_fp8"), get_space("moe_experts_fp8_w8a8"), get_space("moe_experts")
    h200 = gpu_spec("H200")
    pre, pre8, pre16 = (s.make_problem(FLASH, 8192, 1, "prefill") for s in (w8a16, w8a8, bf16))
    assert pre.dim("weights") == "fp8" and pre.work_bytes < pre16.work_bytes and pre.bucket == pre16.bucket
    assert pre8.dim("act") == "fp8" and "act" not in pre.dims
    assert "act" not in w8a16.choices(pre, h200) and "act_round" not in w8a16.choices(pre, h200)
    assert w8a8.choices(pre8, h200)["act_round"] == ("gate_up", "pass")
    base = w8a8.default_params(pre8, h200)
    assert (base["block_n"], base["block_k"], base["down_block_k"], base["act_round"]) == (128, 128, 128, "gate_up")
    kind, reason = w8a8.check(w8a8.make_config({**base, "block_n": 64}, "H200"), pre8, h200)
    assert kind == "hard" and "128-blocks" in reason
    assert w8a8.check(w8a8.make_config({**base, "block_n": 64, "act_round": "pass"}, "H200"), pre8, h200) is None
    tiles = {**base, "block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3}
    assert w8a8.check(w8a8.make_config(tiles, "H200"), pre8, h200) is None
    assert w8a8.check(w8a8.make_config({**tiles, "num_stages": 5}, "H200"), pre8, h200) is None  # 160 KB fits
    kind, reason = w8a16.check(w8a16.make_config({**tiles, "num_stages": 5}, "H200"), pre, h200)
    assert kind == "hard" and "shared memory" in reason                         # bf16 tiles: 480 KB
    assert all(c["block_n"] >= 128 for c in w8a8.typical if c["act_round"] == "gate_up")
    assert {c["act_round"] for c in w8a8.typical} == {"gate_up", "pass"}


def test_moe_experts_mxfp4_w4a8_space_is_w8a8s_over_mxfp4():
    """The W4A8 op's space: W8A8's params and rules (block_n of whole activation blocks where the gate/up
    epilogue rounds) and which tensor cores multiply (w4a8_mma, bf16 by default), its problems MXFP4
    weights (half a byte a weight and a scale per 32: fewer bytes of work than FP8) with act fp8. Shared
    memory counts the MXFP4 words and, on bf16 tensor cores, bf16 activation tiles: 128 x 128 x 128 tiles
    in 3 stages, 3 x (32 + 2 x 8) KB, fit an H100, in 5 stages not. Its decode default: W4A16's tiles,
    the activation rounded by a pass, one multiply a weight (mxfp4_scaling; "one" with FP8 tensor cores is
    redundant: their route ignores it)."""
    w4a8, w8a8 = get_space("moe_experts_mxfp4_w4a8"), get_space("moe_experts_fp8_w8a8")
    h200 = gpu_spec("H200")
    pre4, pre8 = (s.make_problem(FLASH, 8192, 1, "prefill") for s in (w4a8, w8a8))
    assert (pre4.dim("weights"), pre4.dim("act")) == ("mxfp4", "fp8") and pre4.work_bytes < pre8.work_bytes
    assert w4a8.choices(pre4, h200)["block_n"] == w8a8.choices(pre8, h200)["block_n"] == (32, 64, 128, 256)
    # its prefill defaults: W8A8's but K tiles as the regime's (W4A16's loop on bf16 tensor cores: no promotions)
    assert w4a8.default_params(pre4, h200) == {**w8a8.default_params(pre8, h200), "block_k": 64, "down_block_k": 64,
                                               "w4a8_mma": "bf16", "mxfp4_scaling": "two"}
    assert w4a8.choices(pre4, h200)["w4a8_mma"] == ("bf16", "fp8", "fp8_swap")
    default = w4a8.make_config(w4a8.default_params(pre4, h200), "H100")
    assert w4a8.check(default, pre4, gpu_spec("H100"), baseline=True) is None
    deep = default.replace(block_k=128, down_block_k=128)
    assert w4a8.check(deep, pre4, gpu_spec("H100")) is None
    kind, reason = w4a8.check(deep.replace(num_stages=5), pre4, gpu_spec("H100"))
    assert kind == "hard" and "shared memory" in reason                # 5 x 48 KB
    kind, reason = w4a8.check(w4a8.make_config({**w4a8.default_params(pre4, h200), "block_n": 64}, "H200"), pre4, h200)
    assert kind == "hard" and "128-blocks" in reason
    dec4 = w4a8.make_problem(FLASH, 8192, 1, "decode")
    decode = w4a8.make_config(w4a8.default_params(dec4, h200), "H200", "decode")
    assert (decode.act_round, decode.block_n, decode.mxfp4_scaling) == ("pass", 64, "one")
    assert w4a8.check(decode, dec4, h200, baseline=True) is None
    kind, reason = w4a8.check(decode.replace(w4a8_mma="fp8"), dec4, h200)
    assert kind == "redundant" and "mxfp4_scaling" in reason
    swap = decode.replace(w4a8_mma="fp8_swap", mxfp4_scaling="two", block_n=128)
    assert w4a8.check(swap, dec4, h200) is None                        # the swapped route at decode's 16-row blocks
    kind, reason = w4a8.check(default.replace(w4a8_mma="fp8_swap"), pre4, h200)
    assert kind == "hard" and "16-row blocks" in reason                # not at prefill's 128-row ones


def test_decode_baseline_is_the_launchers_own_default():
    """The baseline trial of the decode space is what the kernel runs with config "": the decode
    default with the launcher's automatic split count (kernels/sparse_attention_cached/config.py),
    here B = 64 tokens x 64 heads on 132 SMs: 64 programs, so 2 splits (one wave; H100-measured best)."""
    from dsv4_compile.kernels.sparse_attention_cached.config import auto_config

    space = get_space("sparse_attention_cached")
    problem = space.make_problem(FLASH, 32768, 64, "decode")
    h100 = gpu_spec("H100")
    params = space.default_params(problem, h100)
    launcher = auto_config(64, 1, FLASH.n_heads, problem.dim("K"), space.default_config("H100", "decode"), h100.n_sms)
    assert params["num_splits"] == launcher.num_splits == 2
    assert params["num_splits"] in space.choices(problem, h100)["num_splits"]


def test_fp8_linear_gemv_choices_and_rules():
    """gemm=gemv (the CUDA-core few-rows kernel) is tried at a decode batch of 1 with its own fields
    (block_n 4..128, block_k), pruned where it cannot run (rows past one weight-scale tile) or would repeat
    a trial (its unused fields off their first choice; more than GEMV_MAX_ROWS rows), and its
    fields stay off the tensor-core tile's trials."""
    space = get_space("fp8_linear")
    h200 = gpu_spec("H200")
    one, many = space.make_problem(FLASH, 8192, 1, "decode"), space.make_problem(FLASH, 8192, 64, "decode")
    gemv = space.make_config({"gemm": "gemv", "block_n": 16, "block_k": 512, "block_m": 16, "split_k": 1,
                              "quant": "fused", "swap_ab": "no", "group_m": 1}, "H200", "decode")
    assert space.check(gemv, one, h200) is None
    assert "gemv" in space.choices(one, h200)["gemm"] and 2048 in space.choices(one, h200)["block_k"]
    assert 4 in space.choices(one, h200)["block_n"]                   # the narrow-W default's GEMV tile
    kind, reason = space.check(gemv, many, h200)
    assert kind == "redundant" and "64 rows > 4" in reason
    kind, reason = space.check(gemv.replace(block_n=256), one, h200)
    assert kind == "hard" and "block_n 256 > 128" in reason
    kind, reason = space.check(gemv.replace(split_k=4), one, h200)
    assert kind == "redundant" and "ignores" in reason
    tile = space.make_config({"gemm": "triton", "block_m": 16, "block_n": 128, "swap_ab": "yes"}, "H200", "decode")
    assert space.check(tile, one, h200) is None
    for bad in (tile.replace(block_k=256), tile.replace(block_n=16)):
        kind, reason = space.check(bad, one, h200)
        assert kind == "redundant" and "gemm=gemv's" in reason
