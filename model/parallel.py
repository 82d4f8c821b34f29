"""Tensor and expert parallelism of the plain model over torch.distributed (NCCL on GPUs, gloo on CPUs).

The parallel form is the plain `Transformer`, built as usual on every rank (same config, same seed or
checkpoint), then sharded in place for this rank by `parallelize(model, layout)`: each rank keeps its
slice of the weights and the modules that hold a slice finish their sums with a functional all-reduce
(the head: an all-gather; torch.distributed._functional_collectives, which torch.compile and export
trace). There is no second
model: what is not named below runs as in the plain model, replicated on every rank.

Layout `tp=T,ep=E` (ParallelLayout) over a world of T * E ranks, as a DeviceMesh of shape (E, T) with
dims ("ep", "tp"): rank = ep_rank * T + tp_rank, so a tensor-parallel group is T consecutive ranks.

- Tensor parallelism (attention, every block including the MTP block's): rank r keeps query heads
  [r H/T, (r+1) H/T): its rows of wq_b, its attention sinks, the rows of wo_a of its output groups (T
  must divide o_groups, so that the grouped low-rank output splits by whole groups) and the matching
  columns of wo_b, whose partial products are all-reduced over the "tp" group (RowParallelLinear).
  The lightning indexer of a CSA layer is split by head too (IndexerShard): rank r keeps indexer heads
  [r Hi/T, (r+1) Hi/T), its rows of the indexer's wq_b and weights_proj; its heads' weighted ReLU
  scores (ops.indexer_scores) are all-reduced over "tp" and the sum goes through the same selection as
  `torch.ops.dsv4.indexer_topk` (ops.indexer_select: ties to the lowest index), so every rank picks
  the same entries. Replicated: wq_a and q_norm (the low-rank query), the shared key=value head (wkv,
  kv_norm), the compressors, the indexer's compressor (its keys serve every head). The KV cache holds
  the one shared head and the indexer keys, so every rank keeps the whole cache.
- Vocab parallelism over the same "tp" group: rank r keeps vocabulary rows [r V/T, (r+1) V/T) of the
  embedding (VocabParallelEmbedding: ids outside them give zeros, all-reduced over "tp": exact) and of
  the head (VocabParallelHead: its logits all-gathered over "tp" into the whole [..., V] on every
  rank). The MTP blocks use these two; they have none of their own.
- Expert parallelism (MoE, every block): rank r of the "ep" group keeps routed experts
  [r E'/E, (r+1) E'/E) of E' (ExpertShard). Every rank routes all its tokens (the gate is replicated),
  runs the plain `torch.ops.dsv4.moe_experts` over its own experts with the other experts' ids mapped
  to -1 (no contribution), and the partial outputs are all-reduced over the "ep" group. No all-to-all:
  tensor-parallel attention leaves every token on every rank, so dispatch costs nothing, and the
  combine (an all-reduce of [T, D]) moves 2 (E-1)/E T D values a rank, where an all-to-all dispatch and
  combine of T/E tokens a rank with top-k routing, plus the all-gather that gives every rank its tokens
  back, would move (2k/E + 1) (E-1)/E T D: more while E < 2k (12 ranks for V4's k = 6, past one node).
  The shared expert is replicated. With T > 1 the T ranks of a tensor-parallel group hold the same experts.
- Replicated, not split here: the mHC maps and norms, the final norm, the MTP blocks' projections
  (e_proj, h_proj) and norms, the MoE gate and shared expert.

T must divide n_heads, o_groups, index_n_heads and vocab_size; E must divide n_routed_experts
(`ParallelLayout.check_config`, one line otherwise).

The model may be on the meta device: sharding it there and giving it storage afterwards allocates only
this rank's shards, which a checkpoint loader fills from `local_parts` (what each sharded tensor is of
the plain model's).

Weights as shipped (checkpoint/load.py's weights="as-shipped"): a split FP8Linear (wq_b, wo_b, the
indexer's wq_b) keeps its part's FP8 codes and 128 x 128 scale tiles (RowParallelFP8Linear for wo_b);
a part that does not fall on whole tiles is refused in one line before anything is sharded
(`_weight_parts`). MXFP4Experts and FP8Experts split by whole experts (MXFP4ExpertShard, FP8ExpertShard). The other modules of the
vocabulary and attention splits take float weights only (wo_a is always float: DeepSeek multiplies
it in BF16; nn.Embedding, the head, the indexer's weights_proj).

Inference only: the collectives have no backward here. Not done: data-parallel attention (tokens split
over ranks, where all-to-all expert dispatch pays), splitting the compressors by channel. The sharded
indexer loops over the op's query chunks in plain Python when the length is a number; a symbolic
length (torch.export) takes all queries at once, as the decompose pass does for the op
(tests/dsv4_compile/test_parallel_build.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .attention import CSA_RATIO, Attention, Indexer
from .config import ModelConfig
from .kv_layout import unpack_indexer_keys
from .layers import FP8Linear, Head, float32_product
from .moe import FP8Experts, MoE, MXFP4Experts, RoutedExperts
from .ops import indexer_query_chunk, indexer_scores, indexer_select
from .transformer import Transformer
from .weight_formats import FP8_WEIGHT_BLOCK

MESH_DIMS = ("ep", "tp")
SHIPPED_EXPERT_BUFFERS = ("w1", "w2", "w3", "w1_scale", "w2_scale", "w3_scale")  # MXFP4Experts', FP8Experts'
SHIPPED_EXPERTS = (MXFP4Experts, FP8Experts)
# A part of a tensor along one dimension: (dim, start, stop).
Part = tuple[int, int, int]
_LAYOUT_PART = re.compile(r"(tp|ep)=([0-9]+)")
_ACCEPTED = "accepted: 'tp=T,ep=E' with positive integers (either part may be left out, meaning 1)"


@dataclass(frozen=True)
class ParallelLayout:
    """tp: tensor-parallel ranks (attention and indexer heads, vocabulary); ep: expert-parallel ranks
    (routed experts)."""
    tp: int = 1
    ep: int = 1

    @classmethod
    def parse(cls, text: str) -> "ParallelLayout":
        """'tp=2,ep=4' (or 'tp=2', 'ep=4', in either order) -> ParallelLayout(tp=2, ep=4)."""
        sizes: dict[str, int] = {}
        for part in text.split(","):
            match = _LAYOUT_PART.fullmatch(part.strip())
            if match is None or match[1] in sizes or int(match[2]) < 1:
                raise ValueError(f"parallel layout {text!r}: bad part {part.strip()!r}; {_ACCEPTED}")
            sizes[match[1]] = int(match[2])
        return cls(**sizes)

    def __str__(self) -> str:
        return f"tp={self.tp},ep={self.ep}"

    @property
    def world_size(self) -> int:
        return self.tp * self.ep

    def check_config(self, config: ModelConfig) -> None:
        """ValueError (one line) unless tp divides the heads, output groups, indexer heads and vocabulary,
        and ep the routed experts."""
        c = config
        if any(n % self.tp for n in (c.n_heads, c.o_groups, c.index_n_heads, c.vocab_size)):
            raise ValueError(f"parallel layout {self}: tp = {self.tp} must divide n_heads ({c.n_heads}), o_groups "
                             f"({c.o_groups}), index_n_heads ({c.index_n_heads}) and vocab_size ({c.vocab_size})")
        if config.n_routed_experts % self.ep:
            raise ValueError(f"parallel layout {self}: ep = {self.ep} must divide n_routed_experts "
                             f"({config.n_routed_experts})")

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(f"parallel layout {self}: needs a world size of tp * ep = {self.world_size}, "
                             f"not {world_size}")

    def device_mesh(self, device_type: str) -> DeviceMesh:
        """The (ep, tp) mesh over the default process group (initialised, of world size tp * ep)."""
        self.check_world_size(dist.get_world_size())
        return init_device_mesh(device_type, (self.ep, self.tp), mesh_dim_names=MESH_DIMS)


# The functional all-gather along dim 0: all_gather_single since torch 2.13 (all_gather_tensor there is its
# deprecated alias, a FutureWarning a call), all_gather_tensor alone in torch 2.11 (the GPU machines').
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of x over the ranks of a process group, on every rank (functional: x is unchanged)."""
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group_name))


def all_gather_last(x: torch.Tensor, ranks: int, group_name: str) -> torch.Tensor:
    """x [..., n] on each of the `ranks` ranks of a process group -> [..., ranks * n], the ranks' x
    side by side in rank order, on every rank."""
    gathered = funcol.wait_tensor(_all_gather_dim0(x.contiguous(), 0, group_name))  # [ranks * x.shape[0], ...]
    return torch.cat(gathered.chunk(ranks, dim=0), dim=-1)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [first, first + n) of an embedding (this rank's share of the vocabulary), [n, dim]: a rank
    looks up the ids it holds, zeros for the others, and the all-reduce over the tensor-parallel group
    adds each id's one row to zeros (exact)."""

    def __init__(self, weight: torch.Tensor, first: int, group_name: str):
        super().__init__(weight.shape[0], weight.shape[1], device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight.clone())
        self.first, self.group_name = first, group_name

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] (global ids) -> [..., dim]."""
        local = tokens - self.first
        mine = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(torch.where(mine, local, 0), self.weight)
        return all_reduce_sum(torch.where(mine.unsqueeze(-1), rows, 0), self.group_name)


class VocabParallelHead(Head):
    """The output head's rows of this rank's vocabulary, [V / ranks, dim]: the local float32 logits
    [..., V / ranks] are all-gathered over the tensor-parallel group into the whole [..., V] on every rank."""

    def __init__(self, weight: torch.Tensor, ranks: int, group_name: str):
        super().__init__(weight.shape[1], weight.shape[0], device="meta", dtype=weight.dtype)
        self.weight = nn.Parameter(weight.clone())
        self.ranks, self.group_name = ranks, group_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(super().forward(x), self.ranks, self.group_name)


def sum_partials(partial: torch.Tensor, dtype: torch.dtype, group_name: str) -> torch.Tensor:
    """The sum over a process group of each rank's float32 partial product, rounded once to `dtype`.

    Why float32: the plain model's one GEMM accumulates in float32 and rounds its output once; rounding
    each rank's partial product to bf16 before the sum adds a rounding per partial, and tp bf16 then
    drifts from one-process bf16 by as much as bf16 is from float32 (bench/results/cpu/parallel_notes.md).
    The cost: the all-reduce carries float32 [..., out] (twice bf16's bytes); the product itself comes
    from `float32_product`."""
    return all_reduce_sum(partial.float(), group_name).to(dtype)


class RowParallelLinear(nn.Linear):
    """A bias-free linear holding (a copy of) this rank's columns of a weight, [out, in / ranks]: the
    ranks' float32 partial products are summed by an all-reduce and rounded once to x's dtype
    (`sum_partials`), so every rank gets the whole output."""

    def __init__(self, weight: torch.Tensor, group_name: str):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight.clone())
        self.group_name = group_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_partials(float32_product(x, self.weight), x.dtype, self.group_name)


class RowParallelFP8Linear(FP8Linear):
    """RowParallelLinear of an as-shipped FP8 weight: (a copy of) this rank's columns [out, in / ranks]
    and their scale tiles (whole 128-column tiles, so the activation's 128-wide quantization blocks
    are the plain model's); float32 partial products (`sum_partials`: FP8Linear's output is its
    input's dtype, and a bf16 input quantizes to the same FP8 codes as float32)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, quantize_input: bool, group_name: str):
        super().__init__(weight.shape[1], weight.shape[0], device="meta", quantize_input=quantize_input)
        self.weight, self.scale = weight.clone(), scale.clone()
        self.group_name = group_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum_partials(super().forward(x.float()), x.dtype, self.group_name)


class _LocalExperts:
    """The forward of an expert shard (`first`, `group_name`, `w1` [n, ...]): the other ranks' experts'
    ids become -1 (no contribution) and the partial outputs are summed over the expert-parallel group."""

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, dim], topk_ids [T, k] int32 (global ids), topk_weights [T, k] float32 -> [T, dim] float32."""
        local = topk_ids - self.first
        local = torch.where((local >= 0) & (local < self.w1.shape[0]), local, -1)   # -1: not on this rank
        return all_reduce_sum(super().forward(x, local, topk_weights), self.group_name)


class ExpertShard(_LocalExperts, RoutedExperts):
    """This rank's routed experts [first, first + n) of a MoE layer: w1, w3 [n, inter, dim], w2 [n, dim,
    inter]. Takes the global expert ids; the output (float32) is summed over the expert-parallel group."""

    def __init__(self, experts: RoutedExperts, first: int, n: int, group_name: str):
        nn.Module.__init__(self)  # not RoutedExperts': its empty weights would be allocated only to be replaced
        self.limit, self.first, self.group_name = experts.limit, first, group_name
        for name in ("w1", "w2", "w3"):
            setattr(self, name, nn.Parameter(getattr(experts, name)[first:first + n].clone()))


def _keep_shipped_experts(shard: nn.Module, experts: nn.Module, first: int, n: int, group_name: str) -> None:
    """shard (an nn.Module just initialised) gets experts' limit, whether the activations are quantized
    (quantize_input) and its experts [first, first + n)'s codes and scales (SHIPPED_EXPERT_BUFFERS [n, ...];
    a scale block or tile never spans two experts)."""
    shard.limit, shard.first, shard.group_name = experts.limit, first, group_name
    shard.quantize_input = experts.quantize_input
    for name in SHIPPED_EXPERT_BUFFERS:
        shard.register_buffer(name, getattr(experts, name)[first:first + n].clone())


class MXFP4ExpertShard(_LocalExperts, MXFP4Experts):
    """ExpertShard of as-shipped MXFP4 experts: this rank's experts' codes and scales, and whether the
    activations are quantized (MXFP4Experts.quantize_input)."""

    def __init__(self, experts: MXFP4Experts, first: int, n: int, group_name: str):
        nn.Module.__init__(self)
        _keep_shipped_experts(self, experts, first, n, group_name)


class FP8ExpertShard(_LocalExperts, FP8Experts):
    """ExpertShard of as-shipped FP8 experts: this rank's experts' codes and scale tiles, and whether the
    activations are quantized (FP8Experts.quantize_input)."""

    def __init__(self, experts: FP8Experts, first: int, n: int, group_name: str):
        nn.Module.__init__(self)
        _keep_shipped_experts(self, experts, first, n, group_name)




def _narrow(t: torch.Tensor, part: Part) -> torch.Tensor:
    dim, start, stop = part
    return t.narrow(dim, start, stop - start)


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding (a copy of) weight [out, in]."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.clone())
    return linear


def _need_linear(module: nn.Module, name: str, where: str = "attention", fp8: bool = False) -> nn.Linear | FP8Linear:
    """module.name, an nn.Linear (or, with fp8, an FP8Linear); TypeError for anything else."""
    linear = getattr(module, name)
    if type(linear) is not nn.Linear and not (fp8 and type(linear) is FP8Linear):
        raise TypeError(f"parallelize: {where}.{name} is {type(linear).__name__}; tensor parallelism takes "
                        f"nn.Linear{' or FP8Linear' if fp8 else ''} here")
    return linear


def _fp8_narrow(linear: FP8Linear, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8Linear's part of its weight and the matching scale tiles (views; `_weight_parts` checks
    that the part falls on whole tiles)."""
    return _narrow(linear.weight, part), _narrow(linear.scale, _tile_part(part))


def _split(linear: nn.Linear | FP8Linear, part: Part) -> nn.Linear | FP8Linear:
    """A linear holding (a copy of) `linear`'s part, of its kind (float nn.Linear or as-shipped FP8Linear)."""
    if type(linear) is nn.Linear:
        return _linear(_narrow(linear.weight, part))
    weight, scale = _fp8_narrow(linear, part)
    split = FP8Linear(weight.shape[1], weight.shape[0], device="meta", quantize_input=linear.quantize_input)
    split.weight, split.scale = weight.clone(), scale.clone()
    return split


def _tile_part(part: Part) -> Part:
    """The scale tiles [start / B, ceil(stop / B)) of a part (dim, start, stop) of an FP8 weight
    (B = FP8_WEIGHT_BLOCK)."""
    dim, start, stop = part
    return dim, start // FP8_WEIGHT_BLOCK, -(-stop // FP8_WEIGHT_BLOCK)


def _weight_parts(linear: nn.Module, name: str, part: Part, ranks: int, owner: str = "") -> dict[str, Part]:
    """{name.weight: part} of a linear, and {name.scale: its tiles} when it is an as-shipped FP8Linear,
    whose part must fall on whole FP8_WEIGHT_BLOCK-wide tiles (ValueError, one line, naming owner +
    name, otherwise)."""
    if type(linear) is not FP8Linear:
        return {f"{name}.weight": part}
    dim, start, stop = part
    size, B = linear.weight.shape[dim], FP8_WEIGHT_BLOCK
    if start % B or (stop % B and stop != size):
        side = ("rows", "row") if dim == 0 else ("columns", "column")
        raise ValueError(f"parallelize: {owner}{name} (FP8, {list(linear.weight.shape)}) split {ranks} ways gives {side[0]} "
                         f"[{start}, {stop}), not whole {B}-{side[1]} scale tiles; an FP8 weight splits on its tiles only")
    return {f"{name}.weight": part, f"{name}.scale": _tile_part(part)}


class IndexerShard(Indexer):
    """This rank's heads of a lightning indexer: its rows of wq_b and weights_proj (the per-head weight
    scale stays that of all heads); the compressor, whose keys every head shares, is the plain one
    (replicated). `select` sums this rank's heads' scores (ops.indexer_scores), all-reduces the partial
    sums over the tensor-parallel group and selects as `indexer_topk` does (ops.indexer_select: ties to
    the lowest index), in the op's query chunks (eager) or in one (export)."""

    def __init__(self, indexer: Indexer, parts: dict[str, Part], ranks: int, group_name: str):
        nn.Module.__init__(self)  # not Indexer's: it would build a second compressor
        self.head_dim, self.topk, self.rope_dim = indexer.head_dim, indexer.topk, indexer.rope_dim
        self.simulate_quantization, self.weight_scale = indexer.simulate_quantization, indexer.weight_scale
        self.n_heads, self.group_name = indexer.n_heads // ranks, group_name
        self.wq_b = _split(_need_linear(indexer, "wq_b", "attention.indexer", fp8=True), parts["wq_b.weight"])
        self.weights_proj = _linear(_narrow(_need_linear(indexer, "weights_proj", "attention.indexer").weight,
                                            parts["weights_proj.weight"]))
        self.compressor = indexer.compressor

    def select(self, q, weights, keys, positions) -> torch.Tensor:
        """q [B, S, Hi / ranks, di], weights [B, S, Hi / ranks] (this rank's heads), keys [B, N, di],
        positions [B, S] -> [B, S, topk] int32, the plain indexer's selection over all heads."""
        def chunk(rows: slice) -> torch.Tensor:
            scores = all_reduce_sum(indexer_scores(q[:, rows], weights[:, rows], keys), self.group_name)
            return indexer_select(scores, positions[:, rows], CSA_RATIO, self.topk)

        S = q.shape[1]
        if not isinstance(S, int):  # symbolic (torch.export): all queries at once, as the decompose pass
            return chunk(slice(None))  # runs the plain op; a Python loop over S cannot be traced
        step = indexer_query_chunk(q, keys)
        return torch.cat([chunk(slice(s, s + step)) for s in range(0, S, step)], dim=1)

    def select_cached(self, q, weights, index_cache, positions, fmt: str) -> torch.Tensor:
        """`select` over the unpacked cache: the partial scores must be all-reduced before the
        selection, which the fused op `indexer_topk_cached` cannot do."""
        return self.select(q, weights, unpack_indexer_keys(index_cache, self.head_dim, fmt), positions)


def indexer_parts(indexer: Indexer, rank: int, ranks: int) -> dict[str, Part]:
    """What `IndexerShard` keeps of the unsharded `indexer`'s tensors (names relative to it): indexer
    heads [rank Hi/ranks, (rank+1) Hi/ranks), their rows of wq_b and of weights_proj."""
    heads = indexer.n_heads // ranks
    q = heads * indexer.head_dim
    return {**_weight_parts(indexer.wq_b, "wq_b", (0, rank * q, (rank + 1) * q), ranks, "indexer."),  # [Hi*di, q_lora_rank]
            "weights_proj.weight": (0, rank * heads, (rank + 1) * heads)}              # [Hi, dim]


def attention_parts(attn: Attention, rank: int, ranks: int) -> dict[str, Part]:
    """What `shard_attention` keeps of the unsharded `attn`'s tensors (names relative to it): query heads
    [rank H/ranks, (rank+1) H/ranks), i.e. their rows of wq_b and sinks, and their output groups' rows
    of wo_a and columns of wo_b; and of a CSA layer's indexer, `indexer_parts`."""
    heads, groups = attn.n_heads // ranks, attn.o_groups // ranks
    q, o = heads * attn.head_dim, groups * attn.o_lora_rank
    parts = {**_weight_parts(attn.wq_b, "wq_b", (0, rank * q, (rank + 1) * q), ranks),  # [H*D, q_lora_rank]
             "attn_sink": (0, rank * heads, (rank + 1) * heads),                      # [H]
             "wo_a.weight": (0, rank * o, (rank + 1) * o),                            # [G*r, H/G*D]
             **_weight_parts(attn.wo_b, "wo_b", (1, rank * o, (rank + 1) * o), ranks)}  # [dim, G*r]
    if attn.indexer is not None:
        parts.update({f"indexer.{name}": part for name, part in indexer_parts(attn.indexer, rank, ranks).items()})
    return parts


def vocab_parts(model: Transformer, rank: int, ranks: int) -> dict[str, Part]:
    """The vocabulary rows [rank V/ranks, (rank+1) V/ranks) of the embedding and the head, [V, dim] each,
    that `shard_vocab` keeps (the MTP blocks use these two too)."""
    n = model.config.vocab_size // ranks
    return {name: (0, rank * n, (rank + 1) * n) for name in ("embed.weight", "head.weight")}


def expert_part(moe: MoE, rank: int, ranks: int) -> Part:
    """The routed experts [first, first + E/ranks) that `shard_experts` keeps, along dim 0 of w1, w2, w3."""
    n = moe.experts.w1.shape[0] // ranks
    return 0, rank * n, (rank + 1) * n


def shard_attention(attn: Attention, rank: int, ranks: int, group_name: str) -> None:
    """Keep query heads [rank H/ranks, (rank+1) H/ranks) of `attn` (in place); see the module docstring."""
    parts = attention_parts(attn, rank, ranks)
    wq_b, wo_a, wo_b = (_need_linear(attn, name, fp8=name != "wo_a") for name in ("wq_b", "wo_a", "wo_b"))
    with torch.no_grad():
        attn.wq_b = _split(wq_b, parts["wq_b.weight"])
        attn.attn_sink = nn.Parameter(_narrow(attn.attn_sink, parts["attn_sink"]).clone())
        attn.wo_a = _linear(_narrow(wo_a.weight, parts["wo_a.weight"]))
        attn.wo_b = (RowParallelLinear(_narrow(wo_b.weight, parts["wo_b.weight"]), group_name) if type(wo_b) is nn.Linear
                     else RowParallelFP8Linear(*_fp8_narrow(wo_b, parts["wo_b.weight"]), wo_b.quantize_input, group_name))
        if attn.indexer is not None:
            attn.indexer = IndexerShard(attn.indexer, indexer_parts(attn.indexer, rank, ranks), ranks, group_name)
    attn.n_heads, attn.o_groups = attn.n_heads // ranks, attn.o_groups // ranks


def shard_vocab(model: Transformer, rank: int, ranks: int, group_name: str) -> None:
    """Keep this rank's vocabulary rows of the embedding and the head (in place); see the module docstring."""
    parts = vocab_parts(model, rank, ranks)
    if type(model.head) is not Head or type(model.embed) is not nn.Embedding:
        raise TypeError(f"parallelize: the embedding and head are {type(model.embed).__name__} and "
                        f"{type(model.head).__name__}; vocab parallelism takes nn.Embedding and Head")
    with torch.no_grad():
        model.embed = VocabParallelEmbedding(_narrow(model.embed.weight, parts["embed.weight"]),
                                             parts["embed.weight"][1], group_name)
        model.head = VocabParallelHead(_narrow(model.head.weight, parts["head.weight"]), ranks, group_name)


def shard_experts(moe: MoE, rank: int, ranks: int, group_name: str) -> None:
    """Keep this rank's share of `moe`'s routed experts (in place); see the module docstring."""
    shard = {RoutedExperts: ExpertShard, MXFP4Experts: MXFP4ExpertShard, FP8Experts: FP8ExpertShard}.get(type(moe.experts))
    if shard is None:
        raise TypeError(f"parallelize: the routed experts are {type(moe.experts).__name__}; expert parallelism "
                        f"takes RoutedExperts, MXFP4Experts or FP8Experts")
    _, first, stop = expert_part(moe, rank, ranks)
    with torch.no_grad():
        moe.experts = shard(moe.experts, first, stop - first, group_name)


def _blocks(model: Transformer) -> list[tuple[str, nn.Module]]:
    """(state_dict prefix, block) of every transformer block, the MTP blocks' included."""
    return [*((f"layers.{i}", block) for i, block in enumerate(model.layers)),
            *((f"mtp.{m}.block", mtp.block) for m, mtp in enumerate(model.mtp))]


def _checked_mesh(model: Transformer, layout: ParallelLayout, mesh: DeviceMesh | None) -> DeviceMesh:
    layout.check_config(model.config)
    if mesh is None:
        return layout.device_mesh(model.head.weight.device.type)
    if mesh.mesh_dim_names != MESH_DIMS or tuple(mesh.shape) != (layout.ep, layout.tp):
        raise ValueError(f"parallel layout {layout}: mesh has dims {mesh.mesh_dim_names} of shape {tuple(mesh.shape)}; "
                         f"need {MESH_DIMS} of shape ({layout.ep}, {layout.tp})")
    return mesh


def local_parts(model: Transformer, layout: ParallelLayout, mesh: DeviceMesh | None = None) -> dict[str, Part]:
    """The plain (not yet sharded) `model`'s state_dict names of the tensors `parallelize` splits -> the
    part of each that this rank keeps, (dim, start, stop); the tensors not named are kept whole. The
    sharded model's state_dict has the same names, each holding its part. mesh: as for `parallelize`."""
    mesh = _checked_mesh(model, layout, mesh)
    parts: dict[str, Part] = {}
    if layout.tp > 1:
        parts.update(vocab_parts(model, mesh.get_local_rank("tp"), layout.tp))
    for prefix, block in _blocks(model):
        if layout.tp > 1:
            for name, part in attention_parts(block.attn, mesh.get_local_rank("tp"), layout.tp).items():
                parts[f"{prefix}.attn.{name}"] = part
        if layout.ep > 1:
            part = expert_part(block.ffn, mesh.get_local_rank("ep"), layout.ep)
            weights = SHIPPED_EXPERT_BUFFERS if type(block.ffn.experts) in SHIPPED_EXPERTS else ("w1", "w2", "w3")
            parts.update({f"{prefix}.ffn.experts.{w}": part for w in weights})
    return parts


def parallelize(model: Transformer, layout: ParallelLayout, mesh: DeviceMesh | None = None) -> Transformer:
    """Shard the plain `model` in place for this rank under `layout` and return it.

    mesh: a DeviceMesh of shape (ep, tp) with dims ("ep", "tp"); by default layout.device_mesh() on the
    model's device type (the default process group must be initialised, of world size tp * ep). Every
    rank must hold the same model (same config and seed, or checkpoint) before the call, or the model
    on the meta device (pass a mesh then), to be given storage and filled afterwards (`local_parts`).
    """
    mesh = _checked_mesh(model, layout, mesh)
    local_parts(model, layout, mesh)  # its checks (FP8 splits on whole tiles) before anything is sharded
    if layout.tp > 1:
        rank, group_name = mesh.get_local_rank("tp"), mesh.get_group("tp").group_name
        for _, block in _blocks(model):
            shard_attention(block.attn, rank, layout.tp, group_name)
        shard_vocab(model, rank, layout.tp, group_name)
    if layout.ep > 1:
        rank, group_name = mesh.get_local_rank("ep"), mesh.get_group("ep").group_name
        for _, block in _blocks(model):
            shard_experts(block.ffn, rank, layout.ep, group_name)
    return model
