"""Tensor and expert parallelism of the plain model over torch.distributed (NCCL on GPUs, gloo on CPUs).

The parallel form is the plain `Transformer`, built as usual on every rank (same config, same seed or
checkpoint), then sharded in place for this rank by `parallelize(model, layout)`: each rank keeps its
slice of the weights and the modules that hold a slice finish their sums with a functional all-reduce
(torch.distributed._functional_collectives, which torch.compile and export trace). There is no second
model: what is not named below runs as in the plain model, replicated on every rank.

Layout `tp=T,ep=E` (ParallelLayout) over a world of T * E ranks, as a DeviceMesh of shape (E, T) with
dims ("ep", "tp"): rank = ep_rank * T + tp_rank, so a tensor-parallel group is T consecutive ranks.

- Tensor parallelism (attention, every block including the MTP block's): rank r keeps query heads
  [r H/T, (r+1) H/T): its rows of wq_b, its attention sinks, the rows of wo_a of its output groups (T
  must divide o_groups, so that the grouped low-rank output splits by whole groups) and the matching
  columns of wo_b, whose partial products are all-reduced over the "tp" group (RowParallelLinear).
  Replicated: wq_a and q_norm (the low-rank query), the shared key=value head (wkv, kv_norm), the
  compressors, and the lightning indexer: its heads' scores are summed inside
  `torch.ops.dsv4.indexer_topk` before the top-k, so splitting them needs an op that returns partial
  scores for a collective to complete before the selection (not done here). The KV cache holds the
  one shared head, so every rank keeps the whole cache.
- Expert parallelism (MoE, every block): rank r of the "ep" group keeps routed experts
  [r E'/E, (r+1) E'/E) of E' (ExpertShard). Every rank routes all its tokens (the gate is replicated),
  runs the plain `torch.ops.dsv4.moe_experts` over its own experts with the other experts' ids mapped
  to -1 (no contribution), and the partial outputs are all-reduced over the "ep" group: the simplest
  correct dispatch/combine, with no all-to-all (that is for large token counts, not done here). The
  shared expert is replicated. With T > 1 the T ranks of a tensor-parallel group hold the same experts.
- Replicated, not split here: the embedding and the head (vocab parallelism), the mHC maps and norms.

The model may be on the meta device: sharding it there and giving it storage afterwards allocates only
this rank's shards, which a checkpoint loader fills from `local_parts` (what each sharded tensor is of
the plain model's).

Inference only: the all-reduce has no backward here. Float weights only (nn.Linear, RoutedExperts): a
model whose projections are FP8Linear or whose experts are MXFP4Experts is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .attention import Attention
from .config import ModelConfig
from .moe import MoE, RoutedExperts
from .transformer import Transformer

MESH_DIMS = ("ep", "tp")
_LAYOUT_PART = re.compile(r"(tp|ep)=([0-9]+)")
_ACCEPTED = "accepted: 'tp=T,ep=E' with positive integers (either part may be left out, meaning 1)"


@dataclass(frozen=True)
class ParallelLayout:
    """tp: tensor-parallel ranks (attention heads); ep: expert-parallel ranks (routed experts)."""
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
        """ValueError (one line) unless tp divides the heads and output groups and ep the routed experts."""
        if config.n_heads % self.tp or config.o_groups % self.tp:
            raise ValueError(f"parallel layout {self}: tp = {self.tp} must divide n_heads ({config.n_heads}) and "
                             f"o_groups ({config.o_groups})")
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


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of x over the ranks of a process group, on every rank (functional: x is unchanged)."""
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group_name))


class RowParallelLinear(nn.Linear):
    """A bias-free linear holding (a copy of) this rank's columns of a weight, [out, in / ranks]: the
    ranks' partial products are summed by an all-reduce, so every rank gets the whole output."""

    def __init__(self, weight: torch.Tensor, group_name: str):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight.clone())
        self.group_name = group_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(super().forward(x), self.group_name)


class ExpertShard(RoutedExperts):
    """This rank's routed experts [first, first + n) of a MoE layer: w1, w3 [n, inter, dim], w2 [n, dim,
    inter]. Takes the global expert ids; the output (float32) is summed over the expert-parallel group."""

    def __init__(self, experts: RoutedExperts, first: int, n: int, group_name: str):
        nn.Module.__init__(self)  # not RoutedExperts': its empty weights would be allocated only to be replaced
        self.limit, self.first, self.group_name = experts.limit, first, group_name
        for name in ("w1", "w2", "w3"):
            setattr(self, name, nn.Parameter(getattr(experts, name)[first:first + n].clone()))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, dim], topk_ids [T, k] int32 (global ids), topk_weights [T, k] float32 -> [T, dim] float32."""
        local = topk_ids - self.first
        local = torch.where((local >= 0) & (local < self.w1.shape[0]), local, -1)   # -1: not on this rank
        return all_reduce_sum(super().forward(x, local, topk_weights), self.group_name)


# A part of a tensor along one dimension: (dim, start, stop).
Part = tuple[int, int, int]


def _narrow(t: torch.Tensor, part: Part) -> torch.Tensor:
    dim, start, stop = part
    return t.narrow(dim, start, stop - start)


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding (a copy of) weight [out, in]."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.clone())
    return linear


def _need_linear(module: nn.Module, name: str) -> nn.Linear:
    linear = getattr(module, name)
    if type(linear) is not nn.Linear:
        raise TypeError(f"parallelize: attention.{name} is {type(linear).__name__}; tensor parallelism takes "
                        f"float nn.Linear projections only")
    return linear


def attention_parts(attn: Attention, rank: int, ranks: int) -> dict[str, Part]:
    """What `shard_attention` keeps of the unsharded `attn`'s tensors (names relative to it): query heads
    [rank H/ranks, (rank+1) H/ranks), i.e. their rows of wq_b and sinks, and their output groups' rows
    of wo_a and columns of wo_b."""
    heads, groups = attn.n_heads // ranks, attn.o_groups // ranks
    q, o = heads * attn.head_dim, groups * attn.o_lora_rank
    return {"wq_b.weight": (0, rank * q, (rank + 1) * q),               # [H*D, q_lora_rank]
            "attn_sink": (0, rank * heads, (rank + 1) * heads),         # [H]
            "wo_a.weight": (0, rank * o, (rank + 1) * o),               # [G*r, H/G*D]
            "wo_b.weight": (1, rank * o, (rank + 1) * o)}               # [dim, G*r]


def expert_part(moe: MoE, rank: int, ranks: int) -> Part:
    """The routed experts [first, first + E/ranks) that `shard_experts` keeps, along dim 0 of w1, w2, w3."""
    n = moe.experts.w1.shape[0] // ranks
    return 0, rank * n, (rank + 1) * n


def shard_attention(attn: Attention, rank: int, ranks: int, group_name: str) -> None:
    """Keep query heads [rank H/ranks, (rank+1) H/ranks) of `attn` (in place); see the module docstring."""
    parts = attention_parts(attn, rank, ranks)
    wq_b, wo_a, wo_b = (_need_linear(attn, name) for name in ("wq_b", "wo_a", "wo_b"))
    with torch.no_grad():
        attn.wq_b = _linear(_narrow(wq_b.weight, parts["wq_b.weight"]))
        attn.attn_sink = nn.Parameter(_narrow(attn.attn_sink, parts["attn_sink"]).clone())
        attn.wo_a = _linear(_narrow(wo_a.weight, parts["wo_a.weight"]))
        attn.wo_b = RowParallelLinear(_narrow(wo_b.weight, parts["wo_b.weight"]), group_name)
    attn.n_heads, attn.o_groups = attn.n_heads // ranks, attn.o_groups // ranks


def shard_experts(moe: MoE, rank: int, ranks: int, group_name: str) -> None:
    """Keep this rank's share of `moe`'s routed experts (in place); see the module docstring."""
    if type(moe.experts) is not RoutedExperts:
        raise TypeError(f"parallelize: the routed experts are {type(moe.experts).__name__}; expert parallelism "
                        f"takes RoutedExperts (float weights) only")
    _, first, stop = expert_part(moe, rank, ranks)
    with torch.no_grad():
        moe.experts = ExpertShard(moe.experts, first, stop - first, group_name)


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
    for prefix, block in _blocks(model):
        if layout.tp > 1:
            for name, part in attention_parts(block.attn, mesh.get_local_rank("tp"), layout.tp).items():
                parts[f"{prefix}.attn.{name}"] = part
        if layout.ep > 1:
            part = expert_part(block.ffn, mesh.get_local_rank("ep"), layout.ep)
            parts.update({f"{prefix}.ffn.experts.{w}": part for w in ("w1", "w2", "w3")})
    return parts


def parallelize(model: Transformer, layout: ParallelLayout, mesh: DeviceMesh | None = None) -> Transformer:
    """Shard the plain `model` in place for this rank under `layout` and return it.

    mesh: a DeviceMesh of shape (ep, tp) with dims ("ep", "tp"); by default layout.device_mesh() on the
    model's device type (the default process group must be initialised, of world size tp * ep). Every
    rank must hold the same model (same config and seed, or checkpoint) before the call, or the model
    on the meta device (pass a mesh then), to be given storage and filled afterwards (`local_parts`).
    """
    mesh = _checked_mesh(model, layout, mesh)
    if layout.tp > 1:
        rank, group_name = mesh.get_local_rank("tp"), mesh.get_group("tp").group_name
        for _, block in _blocks(model):
            shard_attention(block.attn, rank, layout.tp, group_name)
    if layout.ep > 1:
        rank, group_name = mesh.get_local_rank("ep"), mesh.get_group("ep").group_name
        for _, block in _blocks(model):
            shard_experts(block.ffn, rank, layout.ep, group_name)
    return model
