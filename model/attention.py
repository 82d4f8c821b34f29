"""Hybrid attention: sliding window + compressed entries (CSA with the lightning indexer, or HCA),
one softmax with a per-head attention sink, over one shared 512-dim key=value head.

Every layer has two paths:
- prefill: written for export (static index widths, -1 padding, no Python branches on the sequence
  length); given a `LayerKVCache` it also stores what decode needs to continue after the prompt;
- decode (`decode=True`, one token per sequence at per-sequence positions): writes the token into
  the FP8 production cache and attends over the cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import CompressorState, LayerKVCache
from .kv_layout import pack_indexer_keys, pack_main_entries
from .layers import RMSNorm, float32_product, rope_angles, rope_inv_freq, visible_block_indices, window_indices
from .ops import bf16_round, fp4_simulate, fp8_round, hadamard, rope_rotate

CSA_RATIO = 4


def _batch_rows(batch: int, device) -> torch.Tensor:
    return torch.arange(batch, device=device)


def ring_positions(lengths: torch.Tensor, rows: int) -> torch.Tensor:
    """lengths [B] -> [B, rows] int64: the position a ring of `rows` slots (slot = position % rows)
    holds after positions 0..lengths[b]-1 were written, -1 where none was."""
    last = lengths.long().unsqueeze(1) - 1
    return last - (last - torch.arange(rows, device=lengths.device)) % rows


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one entry (torch.ops.dsv4.compress_kv).

    CSA (ratio 4) overlaps: the projections are 2*width wide, the first half pooling the previous
    block. The main compressor stores FP8 entries; the indexer's (`quant="hadamard_fp4"`) stores
    Hadamard-rotated FP4 keys.
    """

    def __init__(self, config: ModelConfig, ratio: int, width: int, quant: str):
        super().__init__()
        self.ratio, self.width, self.quant = ratio, width, quant
        # Prefill emits a static max_seq_len // ratio entries (those past the prompt are 0 and never
        # visible), so that shapes do not depend on the sequence length (export with dynamic S).
        self.n_entries = config.max_seq_len // ratio
        self.overlap = ratio == CSA_RATIO
        channels = width * (2 if self.overlap else 1)
        self.norm_eps = config.norm_eps
        # The pooling runs in float32 (as DeepSeek's): the two projections are float32 too.
        self.wkv = nn.Linear(config.dim, channels, bias=False, dtype=torch.float32)
        self.wgate = nn.Linear(config.dim, channels, bias=False, dtype=torch.float32)
        self.ape = nn.Parameter(torch.zeros(ratio, channels, dtype=torch.float32))
        self.norm = RMSNorm(width, config.norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, dim] -> kv, score [B, T, C] float32."""
        return float32_product(x, self.wkv.weight), float32_product(x, self.wgate.weight)

    def pool(self, kv, score, first_positions, inv_freq) -> torch.Tensor:
        """kv, score [B, T, C]; first_positions [N] or [B, N] -> entries [B, N, width] float32."""
        cos, sin = rope_angles(first_positions, inv_freq)
        return torch.ops.dsv4.compress_kv(kv, score, self.ape, self.norm.weight, cos, sin, self.ratio,
                                          self.overlap, self.norm_eps, self.quant)

    def forward(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Prefill: x [B, S, dim] -> entries [B, max_seq_len // ratio, width] float32; entry i is
        complete (and visible) for queries at t >= (i + 1) * ratio - 1."""
        kv, score = self.project(x)
        first = torch.arange(self.n_entries, device=x.device) * self.ratio           # [N], all sequences
        return self.pool(kv, score, first, inv_freq)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, state: CompressorState,
               inv_freq: torch.Tensor) -> torch.Tensor:
        """x [B, 1, dim] at positions [B]: record the token, return the entry of its block [B, width].

        The entry is recomputed every step from the block's tokens so far; it only becomes visible
        (block i < (t + 1) // ratio) once the block is complete, when it equals the prefill entry.
        """
        B = x.shape[0]
        r, rows = self.ratio, state.kv.shape[1]
        kv, score = self.project(x)
        batch = _batch_rows(B, x.device)
        state.kv[batch, positions % rows] = kv[:, 0]
        state.score[batch, positions % rows] = score[:, 0]
        block = torch.div(positions, r, rounding_mode="floor")                       # [B]
        # Rows in block order (previous block first for CSA); rows of the current block that are
        # not written yet, and the previous block of block 0, are masked out.
        n_blocks = rows // r
        first_block = block - (n_blocks - 1)                                          # [B]
        row_block = first_block.unsqueeze(1) + torch.arange(rows, device=x.device) // r  # [B, rows]
        row_pos = row_block * r + torch.arange(rows, device=x.device) % r
        ring = (row_pos % rows).clamp_min(0)
        order = ring.unsqueeze(-1).expand(-1, -1, state.kv.shape[-1])
        kv_rows = state.kv.gather(1, order)
        written = (row_pos >= 0) & (row_pos <= positions.unsqueeze(1))
        score_rows = state.score.gather(1, order).masked_fill(~written.unsqueeze(-1), float("-inf"))
        first = (row_block[:, ::r] * r).clamp_min(0)                                  # [B, n_blocks]
        return self.pool(kv_rows, score_rows, first, inv_freq)[:, -1]

    def fill_state(self, x: torch.Tensor, state: CompressorState, lengths: torch.Tensor) -> None:
        """After a prefill of x [B, S, dim] whose sequence b holds lengths[b] real tokens: keep the
        projections of each sequence's last `rows` real tokens (rows not reached keep their value)."""
        pos = ring_positions(lengths, state.kv.shape[1])                              # [B, rows]
        kv, score = self.project(x.gather(1, pos.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[-1])))
        written = (pos >= 0).unsqueeze(-1)
        state.kv.copy_(torch.where(written, kv, state.kv))
        state.score.copy_(torch.where(written, score, state.score))


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer: picks `index_topk` compressed entries per query."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.rope_dim = config.rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(config.dim, self.n_heads, bias=False)
        # Without quantization simulation neither keys nor queries are Hadamard-rotated: the rotation is
        # orthogonal, so it leaves the scores unchanged up to rounding; it exists for the FP4 codes.
        self.simulate_quantization = config.simulate_quantization
        self.compressor = Compressor(config, CSA_RATIO, self.head_dim,
                                     "hadamard_fp4" if config.simulate_quantization else "none")
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5

    def queries(self, x, qr, positions, inv_freq):
        """-> q [B, S, Hi, di] (RoPE, Hadamard, FP4-simulated), weights [B, S, Hi]."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        cos, sin = rope_angles(positions.unsqueeze(-1), inv_freq)                    # [B, S, 1, R/2]
        q = torch.cat([q[..., :-self.rope_dim], rope_rotate(q[..., -self.rope_dim:], cos, sin)], dim=-1)
        if self.simulate_quantization:
            q = fp4_simulate(hadamard(q), 32)
        return q, self.weights_proj(x) * self.weight_scale

    def select(self, q, weights, keys, positions) -> torch.Tensor:
        """q [B, S, Hi, di], weights [B, S, Hi], keys [B, N, di], positions [B, S] -> the entries picked
        [B, S, topk] int32 (-1 = none). (A tensor-parallel shard completes its heads' scores here.)"""
        return torch.ops.dsv4.indexer_topk(q, weights, keys, positions, CSA_RATIO, self.topk)

    def select_cached(self, q, weights, index_cache, positions, fmt: str) -> torch.Tensor:
        """`select` over the packed key cache index_cache [B, N, entry_bytes] uint8 (decode): the same
        picks as `select(q, weights, unpack_indexer_keys(index_cache, di, fmt), positions)`, without
        unpacking the whole cache to float32 every step."""
        return torch.ops.dsv4.indexer_topk_cached(q, weights, index_cache, positions, CSA_RATIO, self.topk, fmt)

    def forward(self, x, qr, positions, inv_freq) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill -> (selected entry indices [B, S, topk] int32 (-1 = none), keys [B, N, di])."""
        q, weights = self.queries(x, qr, positions, inv_freq)
        keys = self.compressor(x, inv_freq)
        return self.select(q, weights, keys, positions), keys


def layer_inv_freq(c: ModelConfig, ratio: int) -> torch.Tensor:
    """RoPE inverse frequencies [rope_head_dim / 2] of a layer: YaRN-extended for compressed layers."""
    if ratio:
        return rope_inv_freq(c.rope_head_dim, c.compress_rope_theta, c.original_seq_len, c.rope_factor,
                             c.beta_fast, c.beta_slow)
    return rope_inv_freq(c.rope_head_dim, c.rope_theta)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ratio: int):
        super().__init__()
        c = config
        self.ratio, self.window = ratio, c.window_size
        self.n_heads, self.head_dim, self.rope_dim = c.n_heads, c.head_dim, c.rope_head_dim
        self.o_groups, self.o_lora_rank = c.o_groups, c.o_lora_rank
        self.eps = c.norm_eps
        self.softmax_scale = c.head_dim ** -0.5
        self.attn_sink = nn.Parameter(torch.zeros(c.n_heads, dtype=torch.float32))
        self.wq_a = nn.Linear(c.dim, c.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
        self.wq_b = nn.Linear(c.q_lora_rank, c.n_heads * c.head_dim, bias=False)
        self.wkv = nn.Linear(c.dim, c.head_dim, bias=False)
        self.kv_norm = RMSNorm(c.head_dim, c.norm_eps)
        # Grouped low-rank output: each group of heads -> o_lora_rank, then all groups -> dim.
        self.wo_a = nn.Linear(c.n_heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(c.o_groups * c.o_lora_rank, c.dim, bias=False)
        self.simulate_quantization = c.simulate_quantization
        self.compressor = Compressor(c, ratio, c.head_dim, "fp8" if c.simulate_quantization else "none") if ratio else None
        self.indexer = Indexer(c) if ratio == CSA_RATIO else None
        self.register_buffer("inv_freq", layer_inv_freq(c, ratio), persistent=False)

    # ---- shared pieces ----------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x [B, S, ..., D] at positions [B, S]: rotate the last rope_dim dims."""
        cos, sin = rope_angles(positions, self.inv_freq)
        cos = cos.view(*cos.shape[:2], *[1] * (x.dim() - 3), cos.shape[-1])
        sin = sin.view(cos.shape)
        rd = self.rope_dim
        return torch.cat([x[..., :-rd], rope_rotate(x[..., -rd:], cos, sin, inverse)], dim=-1)

    def _queries(self, x, positions):
        """-> q [B, S, H, D] (per-head RMS-normalised, RoPE), qr [B, S, q_lora_rank]."""
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = (q.float() * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self._rope(q, positions), qr

    def _window_kv(self, x, positions):
        """-> kv [B, S, D]: the cache's values (FP8-rounded non-rope dims, BF16-exact rope dims). The FP8
        rounding is plain code (fp8_round), fused by the compiler into this producer."""
        kv = self._rope(self.kv_norm(self.wkv(x)), positions)
        if not self.simulate_quantization:
            return kv
        rd = self.rope_dim
        return torch.cat([fp8_round(kv[..., :-rd], 64), bf16_round(kv[..., -rd:].float()).to(kv.dtype)], dim=-1)

    def _output(self, o, positions):
        """o [B, S, H, D] -> [B, S, dim]: inverse RoPE, grouped low-rank projection."""
        o = self._rope(o, positions, inverse=True)
        B, S = o.shape[:2]
        o = o.reshape(B, S, self.o_groups, -1)                                          # [B, S, G, H/G*D]
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)               # [G, r, H/G*D]
        o = torch.einsum("bsgd,grd->bsgr", o, wo_a)
        return self.wo_b(o.flatten(2))

    # ---- prefill ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache | None = None,
                decode: bool = False, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, dim], positions [B, S] -> [B, S, dim].

        Prefill (positions 0..S-1); with a cache it also stores what decode needs to continue at S,
        or at lengths[b] for a right-padded batch (lengths [B]: real tokens per sequence; attention
        is causal, so the padding never reaches a real position).
        `decode=True`: one token per sequence (S = 1) attending over the cache.
        """
        if decode:
            return self.decode(x, positions[:, 0], cache)
        B, S, _ = x.shape
        q, qr = self._queries(x, positions)
        kv = self._window_kv(x, positions)                                              # [B, S, D]
        idx = window_indices(positions, self.window)                                    # [B, S, win]
        attended = kv
        if self.ratio:
            entries = self.compressor(x, self.inv_freq)                                 # [B, N, D]
            if self.indexer is not None:
                picked, keys = self.indexer(x, qr, positions, self.inv_freq)
            else:
                picked = visible_block_indices(positions, entries.shape[1], self.ratio)
            # Compressed entries follow the S raw tokens in the attended tensor.
            idx = torch.cat([idx, torch.where(picked >= 0, picked + S, -1)], dim=-1)
            attended = torch.cat([kv, entries.to(kv.dtype)], dim=1)
        o = torch.ops.dsv4.sparse_attention(q, attended, self.attn_sink, idx.to(torch.int32), self.softmax_scale)
        if cache is not None:
            if lengths is None:
                lengths = torch.full((B,), S, dtype=torch.int64, device=x.device)
            self._fill_cache(cache, x, kv, entries if self.ratio else None, keys if self.indexer is not None else None,
                             lengths)
        return self._output(o, positions)

    def _fill_cache(self, cache: LayerKVCache, x, kv, entries, keys, lengths: torch.Tensor) -> None:
        """Store a prefill so that decode continues at lengths[b] (positions 0..lengths[b]-1 real).

        Window ring: each sequence's last `window` real rows (slots no real token reached keep their
        bytes). Compressed entries and indexer keys: all of them; those of blocks holding padding are
        not visible before decode has rewritten them from the compressor state (a block's entry is
        visible once its last position is decoded, and decode rewrites the entry of its own block).
        """
        pos = ring_positions(lengths, self.window)                                      # [B, win]
        rows = kv.gather(1, pos.clamp_min(0).unsqueeze(-1).expand(-1, -1, kv.shape[-1]))
        window = cache.main[:, :self.window]
        window.copy_(torch.where((pos >= 0).unsqueeze(-1), pack_main_entries(rows, self.rope_dim), window))
        if entries is not None:
            n_blocks = cache.main.shape[1] - self.window
            cache.main[:, self.window:] = pack_main_entries(entries[:, :n_blocks], self.rope_dim)
            self.compressor.fill_state(x, cache.compressor, lengths)
        if keys is not None:
            cache.index[:] = pack_indexer_keys(keys[:, :cache.index.shape[1]], cache.index_format)
            self.indexer.compressor.fill_state(x, cache.index_compressor, lengths)

    # ---- decode -------------------------------------------------------------------------------
    def decode(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
        """x [B, 1, dim], positions [B] (each sequence's own) -> [B, 1, dim]; updates the cache."""
        B = x.shape[0]
        batch = _batch_rows(B, x.device)
        pos2 = positions.unsqueeze(1)                                                    # [B, 1]
        q, qr = self._queries(x, pos2)
        kv = self._window_kv(x, pos2)
        cache.main[batch, positions % self.window] = pack_main_entries(kv[:, 0], self.rope_dim)
        # Window slots of positions t-win+1..t in the ring.
        win = window_indices(pos2, self.window)
        idx = torch.where(win >= 0, win % self.window, -1)                              # [B, 1, win]
        if self.ratio:
            block = torch.div(positions, self.ratio, rounding_mode="floor")
            entry = self.compressor.decode(x, positions, cache.compressor, self.inv_freq)
            cache.main[batch, self.window + block] = pack_main_entries(entry, self.rope_dim)
            n_blocks = cache.main.shape[1] - self.window
            if self.indexer is not None:
                fmt = cache.index_format
                key = self.indexer.compressor.decode(x, positions, cache.index_compressor, self.inv_freq)
                cache.index[batch, block] = pack_indexer_keys(key, fmt)
                iq, weights = self.indexer.queries(x, qr, pos2, self.inv_freq)
                picked = self.indexer.select_cached(iq, weights, cache.index, pos2, fmt)
            else:
                picked = visible_block_indices(pos2, n_blocks, self.ratio)
            idx = torch.cat([idx, torch.where(picked >= 0, picked + self.window, -1)], dim=-1)
        o = torch.ops.dsv4.sparse_attention_cached(q, cache.main, self.attn_sink, idx.to(torch.int32),
                                                   self.softmax_scale, self.rope_dim)
        return self._output(o, pos2)
