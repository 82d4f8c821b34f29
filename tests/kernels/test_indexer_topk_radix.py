"""Radix-select top-k (kernels/indexer_topk/radix_topk.py) against its naive twin (naive.radix_topk):
exact equality of the selected indices and their order.

CPU: the Triton interpreter at odd shapes (R 1 / 3 / 7; N 1 / 5 / 129 / 1000 / 4099; k 1 / 7 / 64 / 512,
k > N included), small tiles so rows span many, both digit widths (8 and 11 bits). Scores: Gaussian;
drawn from a few values (exact ties across tiles and passes: the k-th best's class is resolved by
the lowest indices); NaN, +-inf, -0.0 and +0.0 mixed in; rows shorter than N (lengths, 0 included)
and strided rows. The tie rule is pinned by explicit expectations and by checking that the tie-heavy
inputs' reference differs from the reversed-index rule's, so equality with the twin is not trivial.
GPU (marked): the compiled kernel against torch's stable sort at the indexer's shapes.

The op's selection="radix" (indexer_topk: a score kernel writes chunks of scores, the radix select picks):
the same indices in the same order as selection="threshold" (the fused kernel, same tiles and score
code), the naive twin and the plain op, on every dtype path (exact fp32, bf16 / fp16 MMA, bf16 q over
fp32 keys with and without the residual dots, FP8 with its fallback tiles), dyadic inputs (exact scores,
many ties), ties across tiles, NaN scores, rows with fewer visible keys than k (-1 padding) or none,
decode (one query a batch row: the key tiles split over programs), and several chunks (a tiny
WORKSPACE_BYTES, the last chunk partial). GPU (marked): V4-Flash's indexer (64 heads x 128 dims,
top-512) over 32K keys, prefill and decode, chunked.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels._common import split_chunks  # noqa: E402
from dsv4_compile.kernels.indexer_topk import (IndexerTopkConfig, RadixTopkConfig, indexer_topk, naive,  # noqa: E402
                                              radix_topk)
from indexer_inputs import DEVICE, KERNEL_MODULE, fp4_gauss, make_inputs, ordered_inputs  # noqa: E402



def make_scores(R, N, kind, seed=0):
    """[R, N] fp32 scores: 'gauss'; 'ties' (5 values, so every class is full of ties); 'special'
    (Gaussian with NaN of both signs, +-inf, -0.0 and +0.0 scattered, and a few exact ties)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return (torch.randint(0, 5, (R, N), generator=g).float() - 2) / 4
    s = torch.randn(R, N, generator=g)
    if kind == "special":
        pick = torch.rand(R, N, generator=g)
        s = torch.where(pick < 0.05, float("nan"), s)
        s = torch.where((pick >= 0.05) & (pick < 0.08), float("inf"), s)
        s = torch.where((pick >= 0.08) & (pick < 0.11), float("-inf"), s)
        s = torch.where((pick >= 0.11) & (pick < 0.16), -0.0, s)
        s = torch.where((pick >= 0.16) & (pick < 0.21), 0.0, s)
        s = torch.where((pick >= 0.21) & (pick < 0.25), 0.5, s)
        s = torch.where(torch.rand(R, N, generator=g) < 0.5, s, s.neg())  # NaN with the sign bit too
    return s


def reversed_tie_rule(scores, lengths, k):
    """The twin's selection with ties going to the HIGHEST index instead: the rule a wrong kernel could
    share with a wrong reference. The tests assert it differs from the real rule on their tie inputs."""
    R, N = scores.shape
    n = torch.full((R,), N) if lengths is None else lengths.long().clamp(0, N)
    flipped = torch.stack([torch.cat([row[:m].flip(0), row[m:]]) for row, m in zip(scores.cpu(), n.tolist())])
    out = naive.radix_topk(flipped, n.int(), k).long()
    return torch.where(out >= 0, n[:, None] - 1 - out, -1).int()


def check(scores, lengths, k, config=None):
    out = radix_topk(scores.to(DEVICE), None if lengths is None else lengths.to(DEVICE), k, config)
    assert out.dtype == torch.int32 and out.shape == (scores.shape[0], k)
    ref = naive.radix_topk(scores, lengths, k)
    assert torch.equal(out.cpu(), ref), f"{int((out.cpu() != ref).sum())} of {ref.numel()} indices differ"
    return ref


SHAPES = [(1, 1, 1), (3, 5, 7), (7, 5, 1), (3, 129, 7), (1, 129, 512), (3, 1000, 64), (1, 4099, 512),
          (7, 129, 64)]


@pytest.mark.parametrize("kind", ["gauss", "ties", "special"])
@pytest.mark.parametrize("R,N,k", SHAPES, ids=[f"R{r}-N{n}-k{k}" for r, n, k in SHAPES])
def test_matches_naive(R, N, k, kind):
    check(make_scores(R, N, kind, seed=R * N + k), None, k)


@pytest.mark.parametrize("config", ["block_n=16", "block_n=32,digit_bits=11"])
@pytest.mark.parametrize("kind", ["gauss", "ties", "special"])
def test_small_tiles_and_lengths(kind, config):
    """Rows of 150 keys in tiles of 16 or 32, lengths 0, 1, shorter than k, at a tile edge, > N
    (clamped) and -5 (clamped to 0); both digit widths."""
    R, N, k = 7, 150, 40
    scores = make_scores(R, N, kind, seed=1)
    lengths = torch.tensor([0, 1, 17, 64, 65, 150, 1000], dtype=torch.int32)
    ref = check(scores, lengths, k, config)
    assert (ref[0] == -1).all() and (ref[1, 1:] == -1).all() and (ref[2, 17:] == -1).all() and (ref[3:] >= 0).all()
    check(scores[:4], torch.tensor([-5, 40, 41, 39], dtype=torch.int32), k, config)


def test_tie_rule_is_pinned():
    """Ties go to the lowest index: explicit expectations, and on the tie-heavy inputs the reference
    differs from the reversed-index rule (so the equality tests above cannot pass with either)."""
    # all equal: the first k indices in order; NaN first among them; -0.0 ties +0.0
    assert radix_topk(torch.ones(1, 20, device=DEVICE), None, 5, "block_n=16").tolist() == [[0, 1, 2, 3, 4]]
    row = torch.tensor([[0.0, -0.0, 1.0, float("nan"), -0.0, 1.0, 0.0, float("-inf"), -float("nan"), 2.0]])
    assert radix_topk(row.to(DEVICE), None, 10, "block_n=16").tolist() == [[3, 8, 9, 2, 5, 0, 1, 4, 6, 7]]
    # five tied best keys out of order across tiles of 16, then two tied runners-up
    scores = torch.zeros(1, 70)
    scores[0, [66, 2, 35, 17, 50]] = 3.0
    scores[0, [40, 8]] = 1.5
    assert radix_topk(scores.to(DEVICE), None, 7, "block_n=16").tolist() == [[2, 17, 35, 50, 66, 8, 40]]
    assert reversed_tie_rule(scores, None, 7).tolist() == [[66, 50, 35, 17, 2, 40, 8]]
    for kind, (R, N, k) in [("ties", (3, 1000, 64)), ("special", (3, 1000, 64)), ("ties", (1, 129, 7))]:
        scores = make_scores(R, N, kind, seed=R * N + k)
        assert not torch.equal(naive.radix_topk(scores, None, k), reversed_tie_rule(scores, None, k)), kind


def test_strided_rows_and_inputs():
    """Rows of a wider buffer (row stride > N); bad inputs get one-line errors naming the value."""
    wide = make_scores(3, 200, "ties", seed=2)
    check(wide[:, :150], None, 33, "block_n=64")
    s = wide.to(DEVICE)
    assert radix_topk(s, None, 0).shape == (3, 0)
    assert radix_topk(s[:0], None, 4).shape == (0, 4)
    assert (radix_topk(s[:, :0], None, 4) == -1).all()
    with pytest.raises(ValueError, match="unit stride in the last dimension"):
        radix_topk(s.t(), None, 4)
    with pytest.raises(ValueError, match="scores is torch.float16"):
        radix_topk(s.half(), None, 4)
    with pytest.raises(ValueError, match="lengths is torch.int64"):
        radix_topk(s, torch.zeros(3, dtype=torch.int64, device=DEVICE), 4)
    with pytest.raises(ValueError, match="k = -1"):
        radix_topk(s, None, -1)
    with pytest.raises(ValueError, match="digit_bits = 9"):
        RadixTopkConfig(digit_bits=9)


@pytest.mark.gpu
@pytest.mark.parametrize("R,N,k", [(64, 32768, 512), (16, 131072, 1024), (300, 5000, 512)])
@pytest.mark.parametrize("kind", ["gauss", "ties", "special"])
def test_gpu_matches_stable_sort(R, N, k, kind):
    """The compiled kernel at the indexer's sizes against torch's stable descending sort (every NaN
    first, -0.0 == +0.0, ties to the lowest index: the plain op's rule), random lengths."""
    scores = make_scores(R, N, kind, seed=3).to(DEVICE)
    lengths = torch.randint(0, N + 1, (R,), generator=torch.Generator().manual_seed(4)).int().to(DEVICE)
    lengths[0] = N
    out = radix_topk(scores, lengths, k)
    # every NaN counts as the best score; torch's CUDA sort orders a NaN with its sign bit set last
    # (it sorts the bits), so the reference sorts sign-cleared NaNs
    canonical = torch.where(scores.isnan(), float("nan"), scores)
    masked = canonical.masked_fill(torch.arange(N, device=DEVICE) >= lengths[:, None].long(), float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
    ref = torch.where(order < lengths[:, None].long(), order, -1).int()
    if ref.shape[1] < k:
        ref = torch.nn.functional.pad(ref, (0, k - ref.shape[1]), value=-1)
    assert torch.equal(out, ref)


# ================================================================================================
# The op's selection="radix": score chunks + the radix select, against the threshold path
# ================================================================================================

RADIX = "selection=radix"
dsv4 = torch.ops.dsv4


def check_selections(q, w, keys, pos, ratio, topk, config="", exact=True):
    """selection=radix equals selection=threshold at the same config, and (exact: dyadic inputs) the
    naive twin and the plain op; returns the picks."""
    radix = indexer_topk(q, w, keys, pos, ratio, topk, ",".join(c for c in (config, RADIX) if c))
    assert radix.dtype == torch.int32 and radix.shape == (*q.shape[:2], topk)
    assert torch.equal(radix, indexer_topk(q, w, keys, pos, ratio, topk, config)), "radix != threshold"
    if exact:
        assert torch.equal(radix.cpu(), naive.indexer_topk(q, w, keys, pos, ratio, topk).cpu()), "radix != naive"
        assert torch.equal(radix, dsv4.indexer_topk(q, w, keys, pos, ratio, topk)), "radix != plain op"
    return radix


# (q dtype, keys dtype, weights dtype, config): every path of config.launch_plan
DTYPE_PATHS = [
    pytest.param(torch.float32, torch.float32, torch.float32, "", id="exact-fp32"),
    pytest.param(torch.float16, torch.float32, torch.bfloat16, "", id="exact-fp16q-fp32k"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.float32, "block_n=32", id="bf16"),
    pytest.param(torch.float16, torch.float16, torch.float16, "score_rows=heads", id="fp16-heads"),
    pytest.param(torch.bfloat16, torch.float32, torch.bfloat16, "block_s=4", id="bf16-fix"),
    pytest.param(torch.bfloat16, torch.float32, torch.bfloat16, "score_mma=fp8", id="fp8"),
]


@pytest.mark.parametrize("q_dtype,k_dtype,w_dtype,config", DTYPE_PATHS)
def test_radix_selection_every_path_exact(q_dtype, k_dtype, w_dtype, config):
    """Dyadic inputs at odd shapes (S = 7 not a multiple of block_s, N = 37 keys in tiles of 16 or 32,
    H = 3, d = 40, top-13; two batch rows, a query that sees nothing and one that sees every key):
    identical picks on every dtype path. The bf16-fix keys get one value that is not bf16-exact (64.25:
    9 significant bits; the residual dots), the scores stay exact."""
    B, S, H, d, N, ratio, topk = 2, 7, 3, 40, 37, 4, 13
    q, w, keys, pos = make_inputs(B, S, H, d, N, ratio, topk, seed=11)
    if k_dtype == torch.float32 and q_dtype == torch.bfloat16 and "fp8" not in config:
        keys[1, 30, 5] = 64.25                                                # not bf16-exact: residual dots
    check_selections(q.to(q_dtype), w.to(w_dtype), keys.to(k_dtype), pos, ratio, topk, config)


@pytest.mark.parametrize("order,topk", [("ties", 24), ("nan", 24), ("late_kth", 5), ("random", 24)])
def test_radix_selection_ties_nan_and_padding(order, topk):
    """Scores along the keys from test_indexer_topk.ordered_inputs over 160 keys (10 tiles of 16):
    ties repeating every 7 keys (the lowest indices win across tiles), NaN first, the k-th best tied
    with later keys; rows that see no key, 3 keys (< topk: -1 padding) and all keys; bf16 q."""
    q, w, keys, pos = ordered_inputs(order, topk=topk)
    out = check_selections(q.bfloat16(), w.bfloat16(), keys, pos, 4, topk, "block_n=16")
    assert (out[0, 0] == -1).all() and (out[0, 1, 3:] == -1).all() and (out[0, 1, :3] >= 0).all()
    if order == "ties":                                       # the best value 6/4 at n = 6, 13, 20, ...
        assert out[0, -1, :4].tolist() == [6, 13, 20, 27]


def test_radix_selection_decode_key_splits(monkeypatch):
    """Decode: one query a batch row (3 rows), 16 persistent programs, so the 3 query blocks split
    their key tiles over cdiv(16, 3) = 6 programs each (3 tiles of 16 at most: splits 3; some
    programs have no tile); FP8 with keys from index 21 refused (the bf16 dots from tile 1 on: the
    splits' second loop starts at their first tile past it) and plain bf16."""
    monkeypatch.setattr(KERNEL_MODULE, "INTERPRET_PROGRAMS", 16)
    B, S, H, d, N, ratio, topk = 3, 1, 2, 64, 45, 1, 9
    g = torch.Generator().manual_seed(12)
    q = fp4_gauss((B, S, H, d), g).bfloat16()
    keys = fp4_gauss((B, N, d), g)
    keys[1, 21:, 40] *= 2.0 ** -17                            # batch row 1: not FP4-like from key 21 on
    w = torch.randn(B, S, H, generator=g).bfloat16()
    pos = torch.tensor([[44], [30], [5]])
    q, w, keys, pos = (t.to(DEVICE) for t in (q, w, keys, pos))
    for config in ("block_n=16,score_mma=fp8", "block_n=16"):
        out = check_selections(q, w, keys, pos, ratio, topk, config, exact=False)
        assert (out[2, 0, 6:] == -1).all() and (out[:2] >= 0).all()


def test_radix_selection_several_chunks(monkeypatch):
    """WORKSPACE_BYTES forced down to 3 query blocks' rows (block_s 2 x 50 keys x 4 bytes x 3): the 2 x 4
    = 8 query blocks (S = 7) go through 3 chunks, the last holding 2 blocks and one past the end
    (its rows have no output); then the exact path (block_s 1: 14 blocks, 3 chunks of 6); then one
    query block a chunk."""
    B, S, H, d, N, ratio, topk = 2, 7, 5, 16, 50, 3, 6
    monkeypatch.setattr(KERNEL_MODULE, "WORKSPACE_BYTES", 2 * N * 4 * 3 + 7)
    assert KERNEL_MODULE.score_chunk_blocks(N, 2) == 3 and split_chunks(8, 3) == (3, 3)
    assert KERNEL_MODULE.score_chunk_blocks(N, 1) == 6 and split_chunks(14, 6) == (6, 3)
    q, w, keys, pos = make_inputs(B, S, H, d, N, ratio, topk, seed=13)
    check_selections(q.bfloat16(), w, keys, pos, ratio, topk, "block_n=16")
    check_selections(q, w, keys, pos, ratio, topk, "block_n=16")
    monkeypatch.setattr(KERNEL_MODULE, "WORKSPACE_BYTES", 1)        # one query block a chunk
    check_selections(q[:1, :3].contiguous(), w[:1, :3].contiguous(), keys[:1].contiguous(), pos[:1, :3].contiguous(),
                     ratio, topk, "block_n=16")


def test_radix_selection_workspace_bound():
    """At V4-Flash's 128K prefill (32K keys, block_s 2) a chunk's workspace stays within WORKSPACE_BYTES
    and takes as many query blocks as fit; one chunk when everything fits (decode)."""
    bound = KERNEL_MODULE.WORKSPACE_BYTES
    chunk = KERNEL_MODULE.score_chunk_blocks(32768, 2)
    assert chunk * 2 * 32768 * 4 <= bound < (chunk + 1) * 2 * 32768 * 4
    assert split_chunks(65536, chunk) == (chunk, -(-65536 // chunk))
    assert split_chunks(64, KERNEL_MODULE.score_chunk_blocks(32768, 1)) == (64, 1)


def test_radix_selection_config_op_and_opcheck():
    """The config field parses and refuses bad values; torch.ops.dsv4_triton.indexer_topk takes it in its
    config string and passes opcheck (schema, fake tensors, dynamic-shape AOT dispatch: the chunk plan
    of symbolic sizes)."""
    assert IndexerTopkConfig.from_str(RADIX).selection == "radix" and IndexerTopkConfig().selection == "threshold"
    with pytest.raises(ValueError, match="selection = 'heap': choose one of"):
        IndexerTopkConfig(selection="heap")
    q, w, keys, pos = make_inputs(1, 3, 2, 8, 9, 4, 4, seed=14)
    out = torch.ops.dsv4_triton.indexer_topk(q, w, keys, pos, 4, 4, RADIX)
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, 4, 4))
    torch.library.opcheck(torch.ops.dsv4_triton.indexer_topk.default, (q, w, keys, pos, 4, 4, RADIX),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["", "score_mma=fp8", "block_s=1", "score_rows=heads,block_n=64"])
def test_gpu_radix_selection_real_shapes(config, monkeypatch):
    """V4-Flash's indexer: 64 heads x 128 dims, top-512, ratio 4, 32K keys. Prefill of 512 queries
    spread over positions 0 .. 128K (the last sees all 32K keys, the first none), then decode (64 batch
    rows, one query each, the key tiles split over programs), then the prefill in several chunks
    (WORKSPACE_BYTES forced to 64 query rows of 32K keys). Dyadic bf16 q over fp32 keys: radix equals
    threshold and the plain op; FP4-simulated Gaussians (the model's operands): radix equals threshold
    (the same score code and tiles: the same fp32 scores)."""
    H, d, N, ratio, topk = 64, 128, 32768, 4, 512
    g = torch.Generator().manual_seed(15)
    q = (torch.randint(-12, 13, (1, 512, H, d), generator=g).float() / 4).bfloat16().to(DEVICE)
    w = (torch.randint(-12, 13, (1, 512, H), generator=g).float() / 4).to(DEVICE)
    keys = (torch.randint(-12, 13, (1, N, d), generator=g).float() / 4).to(DEVICE)
    pos = (torch.arange(512) * (N * ratio // 512)).view(1, 512)
    pos[0, -1] = N * ratio - 1
    pos = pos.to(DEVICE)
    out = check_selections(q, w, keys, pos, ratio, topk, config, exact=False)
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, ratio, topk))
    qg = fp4_gauss((1, 512, H, d), g).bfloat16().to(DEVICE)
    kg = fp4_gauss((1, N, d), g).to(DEVICE)
    check_selections(qg, w, kg, pos, ratio, topk, config, exact=False)
    dec = torch.randint(0, N * ratio, (64, 1), generator=g).to(DEVICE)
    dec[0, 0] = N * ratio - 1
    check_selections(qg[0, :64].unsqueeze(1).contiguous(), w[0, :64].unsqueeze(1).contiguous(),
                     kg.expand(64, N, d).contiguous(), dec, ratio, topk, config, exact=False)
    monkeypatch.setattr(KERNEL_MODULE, "WORKSPACE_BYTES", 64 * N * 4)
    check_selections(qg, w, kg, pos, ratio, topk, config, exact=False)
