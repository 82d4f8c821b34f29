"""The selection order of the indexer top-k kernels as integers (@triton.jit helpers shared by the fused
kernel, indexer_topk.py, and the radix select, radix_topk.py): best first, NaN first, -0.0 == +0.0,
ties to the lowest index.

- order_bits(score) -> int32 whose signed order is the score order: the fp32 bits x mapped by
  x ^ ((x >> 31) & 0x7fffffff) (negative floats reversed), -0.0 made +0.0 first, every NaN made
  INT32_MAX so NaN sorts first (above +inf).
- pack_keys(score, index, valid) -> int64 whose signed order is the selection order: high 32 bits =
  order_bits, low 32 bits = 2^31 - 1 - index (among equal scores the lower index is larger). Keys are
  unique; EMPTY = INT64_MIN (invalid keys, empty slots) is below every real key.
- unpack_index(key) -> the int32 index, -1 for EMPTY.
"""
import triton
import triton.language as tl

EMPTY = tl.constexpr(-9223372036854775808)


@triton.jit
def order_bits(b_score):
    # b_score fp32 (any shape) -> int32 of the same shape, signed order = selection order of the scores
    bits = b_score.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)                            # -0.0 -> +0.0
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)                                # signed order = float order
    return tl.where(b_score != b_score, 2147483647, mono)                    # every NaN first


@triton.jit
def pack_keys(b_score, o_n, valid):
    # b_score fp32, o_n int32 key indices, valid (same shape) -> int64 sort keys (see module doc)
    key = (order_bits(b_score).to(tl.int64) << 32) | (2147483647 - o_n).to(tl.int64)
    return tl.where(valid, key, EMPTY)


@triton.jit
def unpack_index(key):
    # int64 sort keys -> int32 key indices, -1 for EMPTY
    return tl.where(key == EMPTY, -1, 2147483647 - (key & 0xFFFFFFFF)).to(tl.int32)
