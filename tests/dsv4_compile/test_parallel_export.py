"""torch.export of a tensor-parallel shard (model/parallel.py) keeps the prompt length dynamic: a world
of 2 spawned gloo ranks exports the prefill-into-cache engine of the tiny model cut to one CSA layer
under tp=2 (attention heads, indexer heads, vocabulary split; the indexer's partial scores
all-reduced), then runs the exported program at a prompt length other than the example's against
the eager shard. Only torch.export here (seconds); test_parallel_build.py packages and runs engines.
"""
from __future__ import annotations

import torch

from dsv4_compile.engines import PrefillIntoCache, example_inputs, export_engine
from dsv4_compile.model import ModelConfig, Transformer
from dsv4_compile.model.parallel import ParallelLayout, parallelize
from helpers import assert_close
from parallel_worlds import spawn_world

CUT = {"n_layers": 1, "compress_ratios": [4], "n_hash_layers": 0, "n_mtp_layers": 0, "max_seq_len": 128}
SEQ = 37  # not the example's (bucket // 2): a specialised S would refuse it


def _worker(rank: int, world: int) -> dict:
    config = ModelConfig.load("tiny").replace(**CUT)
    model = parallelize(Transformer(config, seed=0).eval(), ParallelLayout.parse("tp=2"))
    exported = export_engine(model, "prefill-cache", max_batch=2, functional=False, gpu="cpu")
    program = exported.result.program
    collectives = sorted({str(n.target) for n in program.graph.nodes
                          if n.op == "call_function" and "_c10d_functional" in str(n.target)})
    inputs = example_inputs("prefill-cache", config, 1, SEQ, "cpu")
    twin = tuple(t.clone() for t in inputs)
    with torch.no_grad():
        out = program.module()(*inputs)
        ref = PrefillIntoCache(model)(*twin)
    return {"seq_range": exported.result.seq_range, "collectives": collectives, "out": out, "ref": ref,
            "cache_out": inputs[2:], "cache_ref": twin[2:]}


def test_tensor_parallel_prefill_exports_with_a_dynamic_length(tmp_path):
    ranks = spawn_world(_worker, 2, tmp_path)
    for rank, got in enumerate(ranks):
        assert got["seq_range"] == (2, CUT["max_seq_len"]), f"rank {rank}: {got['seq_range']}"
        assert "_c10d_functional.all_reduce.default" in got["collectives"], got["collectives"]
        assert "_c10d_functional.all_gather_into_tensor.default" in got["collectives"], got["collectives"]
        # the same graph as the eager shard, only fused differently by export's decompositions (fp32)
        assert_close(f"rank {rank} logits at S = {SEQ}", got["ref"], got["out"])
        for i, (a, b) in enumerate(zip(got["cache_ref"], got["cache_out"])):  # FP8 codes compared as bytes
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 else \
                torch.equal(a, b), f"rank {rank}: cache tensor {i} differs from the eager shard's"
