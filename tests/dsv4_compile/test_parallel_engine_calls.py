"""An AOTInductor package with functional collectives, called many times in a row on a gloo world of 2
spawned ranks, as `dsv4_compile.load` runs a parallel build's engines (`libstdcxx.load_aoti_package`).

The package is a one-line model of a tensor-parallel engine: an all-reduce of partial products, then an
all-gather (which AOTInductor runs through its proxy executor, as the vocabulary-parallel head's).
Called outside torch.inference_mode, it deadlocked within a few calls (docs/DESIGN.md, traps): a
collective's tensor got a Python object from torch's Python autograd kernel of the op, and gloo's
worker thread, freeing it with its Work, waited for the GIL that the next call held. Here each rank
calls it CALLS times at changing [B, S], no pause; a rank still calling after HANG_S seconds exits
(faulthandler) and the test fails. Rank 0 packages it once (one C++ compile) for both ranks: they hold
the same group name and weight.
"""
from __future__ import annotations

import faulthandler
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp

from helpers import assert_close
from parallel_worlds import spawn_world

DIM = 8
CALLS = 200  # observed without inference mode: the deadlock within the first 10 calls, every run
HANG_S = 60  # 200 calls take under a second here


class _ReduceThenGather(torch.nn.Module):
    def __init__(self, group_name: str):
        super().__init__()
        self.group_name = group_name
        self.weight = torch.nn.Parameter(_weight(), requires_grad=False)

    def forward(self, x):  # x [B, S, DIM] -> [world * B, S, DIM]
        summed = funcol.all_reduce(x @ self.weight, "sum", self.group_name)
        return funcol.all_gather_tensor(summed + x, 0, self.group_name)


def _weight() -> torch.Tensor:
    return torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0))


def _shape(call: int) -> tuple[int, int]:
    return 1 + call % 3, 2 + (7 * call) % 40


def _input(call: int, rank: int) -> torch.Tensor:
    return torch.randn(*_shape(call), DIM, generator=torch.Generator().manual_seed(2 * call + rank))


def _worker(rank: int, world: int, folder: str) -> dict:
    from dsv4_compile.compile import inductor_options
    from dsv4_compile.libstdcxx import load_aoti_package

    group = dist.new_group(list(range(world)))  # the engines' own group, as distributed.process_mesh makes
    path = os.path.join(folder, "reduce-gather.pt2")
    if rank == 0:
        batch, seq = torch.export.Dim("batch", min=1, max=4), torch.export.Dim("seq", min=2, max=64)
        program = torch.export.export(_ReduceThenGather(group.group_name), (torch.zeros(2, 5, DIM),),
                                      dynamic_shapes=({0: batch, 1: seq},))
        torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=inductor_options())
    dist.barrier()
    engine = load_aoti_package(path, cuda=False)
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    outputs = [engine(_input(call, rank)) for call in range(CALLS)]
    faulthandler.cancel_dump_traceback_later()
    return {"inference": all(out.is_inference() for out in outputs), "last": [o.clone() for o in outputs[-3:]]}


def test_an_engine_with_collectives_runs_many_calls_in_a_row(tmp_path):
    try:
        ranks = spawn_world(_worker, 2, tmp_path, str(tmp_path))
    except mp.ProcessExitedException as err:
        pytest.fail(f"{err}: a rank still calling its engine after {HANG_S} s (the gloo/GIL deadlock of "
                    f"docs/DESIGN.md, traps; its stack is in the output above)")
    weight = _weight()
    for rank, got in enumerate(ranks):
        assert got["inference"], f"rank {rank}: an output made outside torch.inference_mode"
        for k, out in enumerate(got["last"]):
            call = CALLS - 3 + k
            inputs = [_input(call, r) for r in range(2)]
            summed = sum(x @ weight for x in inputs)
            assert_close(f"rank {rank} call {call}", torch.cat([summed + x for x in inputs]), out)
