"""The DeepSeek-V4 model: embedding -> hc_mult residual streams -> blocks (mHC around hybrid
attention and MoE) -> stream merge -> norm -> head; plus the MTP block.

Interfaces:
- `model(tokens [B, S])` -> last position's logits [B, V] (DeepSeek's prefill interface);
  `all_logits=True` -> [B, S, V].
- `model.prefill(tokens, cache)` also fills a `KVCache` (`lengths` [B]: a right-padded batch of
  prompts, logits of each one's last real token); `model.decode(tokens [B, 1], positions [B], cache)`
  -> [B, V] continues each sequence at its own position.
- `model.mtp_logits(hidden, next_tokens)`: the MTP block's logits for the token after next.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, layer_inv_freq
from .config import ModelConfig
from .kv_cache import KVCache
from .layers import Head, RMSNorm, float32_product
from .moe import MoE


class HyperConnection(nn.Module):
    """mHC parameters of one sub-layer: n streams -> one input (pre), output -> n streams (post, comb)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        mix = (2 + n) * n
        self.iters, self.norm_eps, self.hc_eps = config.hc_sinkhorn_iters, config.norm_eps, config.hc_eps
        self.fn = nn.Parameter(torch.empty(mix, n * config.dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(mix, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def pre(self, h: torch.Tensor):
        """h [B, S, n, dim] -> (x [B, S, dim], post [B, S, n], comb [B, S, n, n])."""
        return torch.ops.dsv4.hc_pre(h, self.fn, self.scale, self.base, self.iters, self.norm_eps, self.hc_eps)

    @staticmethod
    def post(x: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New streams h'_j = post_j * x + sum_i comb_ij h_i -> [B, S, n, dim].

        The sum over the n streams is written out as n products: pointwise work that a compiler fuses
        with the rest of this line, where an einsum is a batched GEMM with K = n (its own launch, at
        decode a CUDA-core GEMM of 4-deep products: bench/results/H100/session30_decode_step_engine64_profile.md)."""
        hf = h.float()
        mixed = comb[..., 0, :].unsqueeze(-1) * hf[..., 0, :].unsqueeze(-2)            # [B, S, n, dim]
        for i in range(1, h.shape[-2]):
            mixed = mixed + comb[..., i, :].unsqueeze(-1) * hf[..., i, :].unsqueeze(-2)
        return (post.unsqueeze(-1) * x.float().unsqueeze(-2) + mixed).to(h.dtype)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, ratio: int):
        super().__init__()
        self.attn = Attention(config, ratio)
        self.ffn = MoE(config, layer_id)
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.hc_attn = HyperConnection(config)
        self.hc_ffn = HyperConnection(config)

    def forward(self, h, positions, tokens, cache=None, decode=False, lengths=None):
        """h [B, S, n, dim] streams -> [B, S, n, dim]."""
        x, post, comb = self.hc_attn.pre(h)
        h = self.hc_attn.post(self.attn(self.attn_norm(x), positions, cache, decode, lengths), h, post, comb)
        x, post, comb = self.hc_ffn.pre(h)
        return self.hc_ffn.post(self.ffn(self.ffn_norm(x), tokens), h, post, comb)


class HeadMerge(nn.Module):
    """Merges the streams with sigmoid weights before the final norm: y = sum_i w_i h_i."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.norm_eps, self.hc_eps = config.norm_eps, config.hc_eps
        self.fn = nn.Parameter(torch.empty(n, n * config.dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.flatten(-2)                                                              # [B, S, n * dim]
        rms = torch.rsqrt(flat.float().square().mean(-1, keepdim=True) + self.norm_eps)
        mixes = float32_product(flat, self.fn) * rms
        weights = torch.sigmoid(mixes * self.scale + self.base) + self.hc_eps             # [B, S, n]
        return (weights.unsqueeze(-1) * h.float()).sum(-2).to(h.dtype)


class MTPBlock(nn.Module):
    """Multi-token prediction: a window-only block fed with proj(norm(embed(next))) + proj(norm(h))."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.block = Block(config, layer_id, ratio=0)
        self.e_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.h_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.enorm = RMSNorm(config.dim, config.norm_eps)
        self.hnorm = RMSNorm(config.dim, config.norm_eps)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.hc_head = HeadMerge(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, seed: int | None = 0):
        """Builds the model in config.dtype on the current default device; `seed` initialises the
        weights deterministically (None leaves them uninitialised, e.g. to load a checkpoint)."""
        super().__init__()
        self.config = c = config
        dtype = c.torch_dtype
        with _default_dtype(dtype):
            self.embed = nn.Embedding(c.vocab_size, c.dim)
            self.layers = nn.ModuleList(Block(c, i, r) for i, r in enumerate(c.compress_ratios))
            self.mtp = nn.ModuleList(MTPBlock(c, c.n_layers + i) for i in range(c.n_mtp_layers))
        self.hc_head = HeadMerge(c)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = Head(c.dim, c.vocab_size, dtype=dtype)
        if seed is not None:
            self.init_weights(seed)

    @torch.no_grad()
    def materialize(self, device: torch.device | str) -> "Transformer":
        """A model built on the meta device -> uninitialised storage on `device` (to be filled from a
        checkpoint), with the buffers that are computed rather than loaded (RoPE frequencies) filled."""
        self.to_empty(device=device)
        for block in [*self.layers, *(m.block for m in self.mtp)]:
            block.attn.inv_freq = layer_inv_freq(self.config, block.attn.ratio).to(device)
        return self

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic weights for a given seed and device: matrices ~ N(0, 1/fan_in), embeddings
        N(0, 1), mHC maps small, norms 1, biases/sinks/positional biases 0, a random hash table."""
        c = self.config
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            gen = torch.Generator(p.device).manual_seed(seed + _stable_hash(name))
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name.rsplit(".", 2)[-2] or leaf == "scale":
                p.fill_(1.0)
            elif leaf in ("base", "bias", "ape", "attn_sink"):
                p.zero_()
            elif name == "embed.weight":
                p.normal_(0, 1, generator=gen)
            elif leaf == "fn":
                p.normal_(0, 0.1 * p.shape[-1] ** -0.5, generator=gen)
            else:
                p.normal_(0, p.shape[-1] ** -0.5, generator=gen)
        for name, buf in self.named_buffers():
            if name.endswith("tid2eid") and not buf.is_meta:
                gen = torch.Generator(buf.device).manual_seed(seed + _stable_hash(name))
                ranks = torch.rand(c.vocab_size, c.n_routed_experts, generator=gen, device=buf.device)
                buf.copy_(ranks.argsort(-1)[:, :c.n_activated_experts])

    # ---- forward ------------------------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] -> streams [B, S, n, dim]. With `positions` [B] (one token each): decode.
        `lengths` [B]: real tokens per sequence of a right-padded prefill (what the cache keeps)."""
        decode = positions is not None
        B, S = tokens.shape
        if S > self.config.max_seq_len:
            raise ValueError(f"tokens: sequence length {S} exceeds the config's max_seq_len {self.config.max_seq_len}")
        pos = positions.view(B, 1) if decode else torch.arange(S, device=tokens.device).expand(B, S)
        h = self.embed(tokens).unsqueeze(2).repeat(1, 1, self.config.hc_mult, 1)
        for i, layer in enumerate(self.layers):
            h = layer(h, pos, tokens, cache.layers[i] if cache is not None else None, decode, lengths)
        return h

    def logits(self, h: torch.Tensor, all_logits: bool = False, merge: HeadMerge | None = None,
               norm: RMSNorm | None = None) -> torch.Tensor:
        """streams [B, S, n, dim] -> [B, V] (last position) or [B, S, V], float32."""
        x = (norm or self.norm)((merge or self.hc_head)(h))
        if not all_logits:
            x = x[:, -1]
        return self.head(x)

    def forward(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, S] int64 -> logits [B, V] of the last position ([B, S, V] with all_logits)."""
        return self.logits(self.hidden_states(tokens), all_logits)

    def prefill(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Like forward, from position 0, and fills `cache` so that decode continues at S.

        lengths [B] (int, each in [1, S]): right-padded prompts; sequence b's decode continues at
        lengths[b], and the logits [B, V] are those of its last real token (position lengths[b] - 1).
        """
        h = self.hidden_states(tokens, cache, lengths=lengths)
        if lengths is not None and not all_logits:
            last = (lengths.long() - 1).view(-1, 1, 1, 1).expand(-1, 1, *h.shape[2:])
            h = h.gather(1, last)                                                       # [B, 1, n, dim]
        return self.logits(h, all_logits)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens [B, 1] at positions [B] (per sequence) -> logits [B, V]; updates `cache`."""
        return self.logits(self.hidden_states(tokens, cache, positions))

    def mtp_logits(self, h: torch.Tensor, next_tokens: torch.Tensor, all_logits: bool = True) -> torch.Tensor:
        """MTP: streams h [B, S, n, dim] of positions t and tokens t+1 [B, S] -> logits for t+2."""
        mtp = self.mtp[0]
        B, S = next_tokens.shape
        e = mtp.e_proj(mtp.enorm(self.embed(next_tokens))).unsqueeze(2)
        x = e + mtp.h_proj(mtp.hnorm(h))
        pos = torch.arange(S, device=next_tokens.device).expand(B, S)
        x = mtp.block(x, pos, next_tokens)
        return self.logits(x, all_logits, mtp.hc_head, mtp.norm)


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.prev)


def _stable_hash(name: str) -> int:
    """A per-parameter seed offset that does not change between processes (unlike hash())."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name)) % (1 << 31)
