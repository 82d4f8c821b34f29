"""The pipeline's side of a parallel build (`--parallel tp=T,ep=E`, model/parallel.py): joining the
torchrun world, this rank's sharded model, and the mesh a build records and a loader checks.

A parallel build and its generation run as one process per rank under torchrun, which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the default process group is gloo on the CPU and
NCCL on GPUs (rank r on GPU LOCAL_RANK). Every rank holds the plain model sharded by `parallelize`, and
each engine of rank r is an AOTInductor package that calls torch.distributed's functional collectives
(`_c10d_functional.all_reduce` / `wait_tensor`) over process groups it names: AOTInductor of torch 2.13
packages and runs them on the CPU over gloo (tried in a world of 2, 2026-12-04). ONNX has no
collectives: a parallel build exports AOTInductor only.

The packages name their groups as this process knows them: torch numbers process groups in creation
order ("0" is the default group). The engines' groups are their own (`process_mesh`), made first after
the default group; the manifest records, per rank, each group its engines call with its ranks
(`mesh.ranks[r].groups`), and `join_build_mesh` makes the loading process's groups the same way the
build did and refuses, in one line, a process whose groups differ (another world size, a group
created before the load).
"""
from __future__ import annotations

import atexit
import os
import shlex
import sys
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .arguments import UsageError
from .manifest import ArtifactError
from .model.parallel import MESH_DIMS, ParallelLayout, parallelize

# How the manifest's mesh record describes what each rank's engine is.
ENGINE_NOTE = ("one AOTInductor package per rank and engine (rank r's files under rank<r>/), each calling "
               "torch.distributed functional collectives (all_reduce) over the process groups listed per rank: "
               "run every rank together, one process per rank (torchrun)")
# A collective that waits longer than this is a rank that died or diverged: fail instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def torchrun_command(world_size: int, argv: list[str]) -> str:
    """The command line that runs `python -m dsv4_compile <argv>` as `world_size` ranks."""
    return shlex.join(["torchrun", "--nproc-per-node", str(world_size), "-m", "dsv4_compile", *argv])


def world_from_env() -> tuple[int, int] | None:
    """(rank, world size) as torchrun sets them, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def join_world(layout: ParallelLayout, cuda: bool, argv: list[str], what: str | None = None) -> int:
    """Join (or check) the default process group for `layout` and return this rank. UsageError (one
    line, the torchrun command to use) outside torchrun or in a world of another size. `what` names
    what needs the world in that line (default: the --parallel option)."""
    world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else world_from_env()
    if world is None or world[1] != layout.world_size:
        have = "one process, no torchrun" if world is None else f"a world of {world[1]} processes"
        raise UsageError(f"{what or f'--parallel {layout}'} needs {layout.world_size} processes, one per rank; this "
                         f"is {have}: run `{torchrun_command(layout.world_size, argv)}`")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", world[0])))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
        # Ended while the interpreter still lives: a gloo group left to interpreter teardown can abort
        # the process after its work is done ("terminate called without an active exception").
        atexit.register(leave_world)
    return dist.get_rank()


def leave_world() -> None:
    """Destroy this process's process groups and forget its meshes (nothing when there are none)."""
    if dist.is_initialized():
        _MESHES.clear()
        dist.destroy_process_group()


def sharded_model(model, layout: ParallelLayout, device_type: str, role: str = "engines"):
    """The plain `model`, sharded in place for this rank over this process's mesh of `layout` for
    `role` (process_mesh)."""
    return parallelize(model, layout, process_mesh(layout, device_type, role))


_MESHES: dict[tuple[str, str, str], DeviceMesh] = {}


def process_mesh(layout: ParallelLayout, device_type: str, role: str = "engines") -> DeviceMesh:
    """This process's (ep, tp) DeviceMesh of `layout` for `role`, made once, over process groups of its
    own (never the default group, which object collectives and barriers use).

    Roles: "engines", the groups a build's engines call (made first, so that a loading process makes
    the same ones, `join_build_mesh`); "reference", the eager reference's groups in verification. They
    must differ: an eager collective next to a package's on one gloo group deadlocks (docs/DESIGN.md,
    traps)."""
    key = (str(layout), device_type, role)
    if key not in _MESHES:
        ranks = torch.arange(layout.world_size).view(layout.ep, layout.tp)  # [ep, tp]
        groups = []
        for lines in (ranks.t(), ranks):  # the "ep" groups (columns), then the "tp" groups (rows)
            mine = None
            for line in lines.tolist():  # every rank makes every group, in the same order (new_group's rule)
                group = dist.new_group(line)
                if dist.get_rank() in line:
                    mine = group
            groups.append(mine)
        _MESHES[key] = DeviceMesh.from_group(groups, device_type, mesh=ranks, mesh_dim_names=MESH_DIMS)
    return _MESHES[key]


def collective_groups(model) -> dict[str, list[int]]:
    """The process groups `model`'s collectives run over (what its engines name): group name -> ranks."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    names = {m.group_name for m in model.modules() if isinstance(getattr(m, "group_name", None), str)}  # parallel.py's shards
    return {name: dist.get_process_group_ranks(_resolve_process_group(name)) for name in sorted(names)}


def rank_root(rank: int) -> str:
    """The folder of rank `rank`'s engines inside a build folder."""
    return f"rank{rank}"


def mesh_record(layout: ParallelLayout, device_kind: str, groups_by_rank: list[dict], files: dict) -> dict:
    """The manifest's `mesh`: the layout, world size, backend, device kind, what an engine is, and per
    rank its folder, the groups its engines call and its files with their sha256 (from the manifest's
    `files` table)."""
    ranks = []
    for rank, groups in enumerate(groups_by_rank):
        root = rank_root(rank)
        ranks.append({"rank": rank, "root": root, "groups": groups,
                      "files": {rel: entry["sha256"] for rel, entry in sorted(files.items())
                                if rel.startswith(root + "/")}})
    return {"layout": str(layout), "tp": layout.tp, "ep": layout.ep, "world_size": layout.world_size,
            "dims": ["ep", "tp"], "backend": "nccl" if device_kind == "cuda" else "gloo", "device_kind": device_kind,
            "engine": ENGINE_NOTE, "ranks": ranks}


def join_build_mesh(path: str, mesh: dict) -> int:
    """Check that this process can run rank r of the build at `path` (its manifest's `mesh`) and return
    r: a process group of the build's world size (on a GPU build, enough visible GPUs), this rank's
    groups as the build recorded them (the mesh made here as the build made it). ArtifactError (one
    line) otherwise."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    size, layout = int(mesh["world_size"]), mesh["layout"]
    rerun = f"run it as {size} processes: torchrun --nproc-per-node {size} ..."
    if not dist.is_available() or not dist.is_initialized():
        raise ArtifactError(f"{path}: built for {size} ranks ({layout}); this process is in no torch.distributed "
                            f"process group: {rerun}")
    if dist.get_world_size() != size:
        raise ArtifactError(f"{path}: built for {size} ranks ({layout}); this process group has "
                            f"{dist.get_world_size()}: {rerun}")
    if mesh["device_kind"] == "cuda":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        if torch.cuda.device_count() < local:
            raise ArtifactError(f"{path}: built for {size} GPUs ({layout}); {local} ranks on this host see "
                                f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES)")
    rank = dist.get_rank()
    wanted = mesh["ranks"][rank]["groups"]

    def differing() -> str | None:
        for name, ranks in wanted.items():
            try:
                have = dist.get_process_group_ranks(_resolve_process_group(name))
            except (KeyError, ValueError, RuntimeError):
                have = None
            if have != ranks:
                return f"group {name!r} of ranks {ranks} is {'absent' if have is None else f'ranks {have}'}"
        return None

    if differing():
        process_mesh(ParallelLayout.parse(layout), "cuda" if mesh["device_kind"] == "cuda" else "cpu")
    problem = differing()
    if problem:
        raise ArtifactError(f"{path}: rank {rank}'s engines call process groups this process does not have "
                            f"({problem}): load the build before making other process groups")
    return rank


def from_rank0(value):
    """Rank 0's `value` on every rank (itself outside a process group)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value) -> list:
    """Every rank's `value`, by rank (a list of one outside a process group)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def everywhere(flag: bool) -> bool:
    """True when `flag` is true on every rank (`flag` itself outside a process group). For a decision
    that sets how many engine calls follow: an engine call is a collective, so a rank deciding alone
    runs one the others never join, and both wait forever."""
    return all(gathered(bool(flag)))


class RankFailed(RuntimeError):
    """A step of a collective sequence raised on some rank (`collectively`): raised on every rank."""


def error_line(err: Exception) -> str:
    """`err` in one line of at most 300 characters, its type first (a RankFailed names its rank instead)."""
    text = " ".join(str(err).split())[:300]
    return text if isinstance(err, RankFailed) else f"{type(err).__name__}: {text}"


T = TypeVar("T")


def collectively(step: Callable[[], T]) -> T:
    """`step()` on this rank, then a check with every rank: when it raised on any rank, every rank
    raises RankFailed ("rank r: <error>", the first such rank), so that no rank goes on alone to an
    engine call (a collective) the others will not join. Outside a process group: `step()`."""
    if not dist.is_initialized():
        return step()
    try:
        value, error = step(), None
    except Exception as err:  # noqa: BLE001 (every rank raises it below)
        value, error = None, error_line(err)
    failed = [(rank, e) for rank, e in enumerate(gathered(error)) if e is not None]
    if failed:
        raise RankFailed(f"rank {failed[0][0]}: {failed[0][1]}")
    return value


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if dist.is_initialized():
        dist.barrier()


def process_rank() -> int | None:
    """This process's rank in its torch.distributed process group; None outside one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def main_rank() -> bool:
    """True outside a process group and on its rank 0: the process that prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def silence_other_ranks() -> None:
    """Ranks other than 0 write nothing on stdout (their errors still reach stderr)."""
    if not main_rank():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)

