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


def shard_attention(attn: Attention, rank: int, ranks: int, group_name: str) -> None:
    """Keep query heads [rank H/ranks, (rank+1) H/ranks) of `attn` (in place); see the module docstring."""
    heads, groups = attn.n_heads // ranks, attn.o_groups // ranks
    D, r = attn.head_dim, attn.o_lora_rank
    wq_b, wo_a, wo_b = (_need_linear(attn, name) for name in ("wq_b", "wo_a", "wo_b"))
    with torch.no_grad():
        attn.wq_b = _linear(wq_b.weight[rank * heads * D:(rank + 1) * heads * D])      # [heads*D, q_lora_rank]
        attn.attn_sink = nn.Parameter(attn.attn_sink[rank * heads:(rank + 1) * heads].clone())
        attn.wo_a = _linear(wo_a.weight[rank * groups * r:(rank + 1) * groups * r])    # [groups*r, H/G*D]
        attn.wo_b = RowParallelLinear(wo_b.weight[:, rank * groups * r:(rank + 1) * groups * r], group_name)
    attn.n_heads, attn.o_groups = heads, groups


def shard_experts(moe: MoE, rank: int, ranks: int, group_name: str) -> None:
    """Keep this rank's share of `moe`'s routed experts (in place); see the module docstring."""
    if type(moe.experts) is not RoutedExperts:
        raise TypeError(f"parallelize: the routed experts are {type(moe.experts).__name__}; expert parallelism "
                        f"takes RoutedExperts (float weights) only")
    n = moe.experts.w1.shape[0] // ranks
    with torch.no_grad():
        moe.experts = ExpertShard(moe.experts, rank * n, n, group_name)


def parallelize(model: Transformer, layout: ParallelLayout, mesh: DeviceMesh | None = None) -> Transformer:
    """Shard the plain `model` in place for this rank under `layout` and return it.

    mesh: a DeviceMesh of shape (ep, tp) with dims ("ep", "tp"); by default layout.device_mesh() on the
    model's device type (the default process group must be initialised, of world size tp * ep). Every
    rank must hold the same model (same config and seed, or checkpoint) before the call.
    """
    c = model.config
    if c.n_heads % layout.tp or c.o_groups % layout.tp:
        raise ValueError(f"parallel layout {layout}: tp = {layout.tp} must divide n_heads ({c.n_heads}) and "
                         f"o_groups ({c.o_groups})")
    if c.n_routed_experts % layout.ep:
        raise ValueError(f"parallel layout {layout}: ep = {layout.ep} must divide n_routed_experts "
                         f"({c.n_routed_experts})")
    if mesh is None:
        mesh = layout.device_mesh(model.head.weight.device.type)
    elif mesh.mesh_dim_names != MESH_DIMS or tuple(mesh.shape) != (layout.ep, layout.tp):
        raise ValueError(f"parallel layout {layout}: mesh has dims {mesh.mesh_dim_names} of shape {tuple(mesh.shape)}; "
                         f"need {MESH_DIMS} of shape ({layout.ep}, {layout.tp})")
    blocks = [*model.layers, *(m.block for m in model.mtp)]
    if layout.tp > 1:
        rank, group_name = mesh.get_local_rank("tp"), mesh.get_group("tp").group_name
        for block in blocks:
            shard_attention(block.attn, rank, layout.tp, group_name)
    if layout.ep > 1:
        rank, group_name = mesh.get_local_rank("ep"), mesh.get_group("ep").group_name
        for block in blocks:
            shard_experts(block.ffn, rank, layout.ep, group_name)
    return model
