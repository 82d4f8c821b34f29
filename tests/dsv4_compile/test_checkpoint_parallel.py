"""Sharded loading, `from_pretrained(path, weights="bf16" or "as-shipped", parallel="tp=T,ep=E")`, on CPU: a world of 2
spawned processes over gloo (tests/parallel_worlds.py) loads synthetic checkpoints of seeded tiny
models (write_checkpoint) for tp=2 and for ep=2:
- "hf": the tiny preset in the Hugging Face layout (3 files); its FP8 weights' tensor-parallel parts
  cut 128x128 scale tiles (wq_b: 384 rows, 192 a rank), so a rank dequantizes whole tiles and keeps
  its rows (tp splits the attention's and the indexer's heads and the vocabulary: embed, head);
- "inference": the same model in the inference layout, mp=1;
- "inference mp=2": a wider tiny model (FP8 splits into whole tiles, as convert.py needs) in the
  inference layout over 2 MP shards, so parts are gathered across shards (ep=2) or lie in one (tp=2).
In both weights modes (as-shipped: the wider model keeps wq_b, wo_b and the indexer's wq_b in FP8,
split on whole tiles, and every model its experts in MXFP4, split by expert) each rank's load must
equal, bit for bit, the full single-process load of that mode sharded in memory by `parallelize` (the
same values, cut the same way), and its logits (exact mode, no FP8/FP4 activation simulation) the
full load's by parallel_worlds' criteria: within fp32's 1e-5 for the tiny preset (observed, either
mode: prefill 5.6e-7 for tp=2, 0 for ep=2), the decode steps over the FP8 cache within 1e-3 (observed
8.1e-6 for both: sequence 1's steps 8.5e-6 and 1.4e-5, an FP8 rounding of the cache moved); with flips for the wider model,
where reassociating tp's sums flips a near-tie of a top-k choice in the decode of sequence 1 (3.9e-5
relative RMS over the decode steps, 1.1e-6 at most elsewhere). In exact mode the as-shipped logits
equal the bf16 ones (FP8Linear multiplies by its dequantized weight), so the activation simulation
runs once here, as shipped, for tp=2 (test_as_shipped_tensor_parallel_with_activation_quantization);
the float model's quantized mode is test_parallel.py's.
Every tensor read is counted (TensorReader.read wrapped in the workers): a rank reads its own routed
experts and no other's, every tensor it keeps whole once and whole, and of a split tensor its part's
bytes (widened to whole FP8 tiles). A base model's FP8 routed experts (the wider model with inter 128,
FP8-shipped experts, the activation simulation on) load as shipped with ep=2 as FP8ExpertShard, W8A8
(test_fp8_experts_split_by_whole_experts).
"""
from __future__ import annotations

import re
import weakref
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

# Not `import dsv4_compile`: a spawned rank imports this module without conftest.py, where tests/dsv4_compile/
# is found as a namespace package `dsv4_compile` without the package's top level (submodules still resolve).
from dsv4_compile.checkpoint import from_pretrained, write_checkpoint
from dsv4_compile.checkpoint.files import TensorReader, read_header
from dsv4_compile.model import ModelConfig, Transformer
from dsv4_compile.model.parallel import ParallelLayout, parallelize
from helpers import assert_bits_equal, wide_tiny
from parallel_worlds import assert_parallel_logits, prompt_tokens, run_logits, spawn_world

pytestmark = pytest.mark.xdist_group("parallel")  # as test_parallel.py: one xdist worker spawns the worlds

TINY = ModelConfig.load("tiny").replace(simulate_quantization=False)
WIDE = wide_tiny(simulate_quantization=False)
QUANTIZED = WIDE.replace(simulate_quantization=True)  # FP8Linear quantizes its input (torch.ops.dsv4.fp8_linear)
FP8_EXPERTS = QUANTIZED.replace(moe_inter_dim=128)   # FP8Experts (W8A8: dim and inter whole 128-blocks)
LAYOUTS = ("tp=2", "ep=2")
WEIGHTS = ("bf16", "as-shipped")
EXPERT = re.compile(r"(layers\.\d+|mtp\.\d+)\.ffn\.experts\.(\d+)\.")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, ModelConfig]]:
    root = tmp_path_factory.mktemp("ckpt")
    tiny, wide = Transformer(TINY, seed=0), Transformer(WIDE, seed=0)
    return {"hf": (str(write_checkpoint(tiny, root / "hf", shards=3)), TINY),
            "inference": (str(write_checkpoint(tiny, root / "inf1", layout="inference")), TINY),
            "inference mp=2": (str(write_checkpoint(wide, root / "inf2", layout="inference", mp=2)), WIDE)}


def _load(path: str, config: ModelConfig, weights: str = "bf16", **kwargs) -> Transformer:
    return from_pretrained(path, config=config, weights=weights, **kwargs)


def _worker(rank: int, world: int, checkpoints: dict, fp8_experts: str) -> dict:
    reads: list[tuple[str, str, int, int]] = []   # (file, tensor, bytes read, bytes stored) of every read
    in_flight = {"now": 0, "peak": 0}              # bytes of the tensors read and not yet freed
    read = TensorReader.read

    def freed(n: int) -> None:
        in_flight["now"] -= n

    def counted(self, entry, part=None):
        value = read(self, entry, part)
        reads.append((entry.file.name, entry.name, value.numel() * value.element_size(), entry.nbytes))
        n = value.untyped_storage().nbytes()
        in_flight["now"] += n
        in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
        weakref.finalize(value, freed, n)
        return value

    TensorReader.read = counted
    results = {}
    for name, (path, config) in checkpoints.items():
        for text in LAYOUTS:
            for weights in WEIGHTS:
                reads.clear()
                before = in_flight["peak"] = in_flight["now"]
                sharded = _load(path, config, weights, parallel=text)
                results[name, text, weights] = {"state": sharded.state_dict(), "reads": list(reads),
                                                "peak in flight": in_flight["peak"] - before,
                                                "info": sharded.checkpoint.parallel, "kinds": _kinds(sharded),
                                                "logits": run_logits(sharded, prompt_tokens(config))}
                in_memory = parallelize(_load(path, config, weights), ParallelLayout.parse(text))
                results[name, text, weights]["in memory"] = in_memory.state_dict()
    quantized = _load(checkpoints["inference mp=2"][0], QUANTIZED, "as-shipped", parallel="tp=2")
    results["quantized"] = {"logits": run_logits(quantized, prompt_tokens(QUANTIZED)), "kinds": _kinds(quantized),
                            "quantize_input": quantized.layers[1].attn.wo_b.quantize_input}
    reads.clear()
    sharded = _load(fp8_experts, FP8_EXPERTS, "as-shipped", parallel="ep=2")
    results["fp8 experts"] = {
        "state": sharded.state_dict(), "reads": list(reads), "kinds": _kinds(sharded),
        "quantize_input": sharded.layers[1].ffn.experts.quantize_input,
        "in memory": parallelize(_load(fp8_experts, FP8_EXPERTS, "as-shipped"), ParallelLayout.parse("ep=2")).state_dict(),
        "logits": run_logits(sharded, prompt_tokens(FP8_EXPERTS))}
    results["build"] = _build_shard(checkpoints["hf"][0], reads)
    try:
        _load(*checkpoints["hf"], parallel="tp=2,ep=2")
    except ValueError as error:
        results["world size"] = str(error)
    return results


def _build_shard(path: str, reads: list) -> dict:
    """`build --parallel tp=2 --weights <checkpoint folder>`'s plan on this rank: its model (Plan.model),
    the tensors read for it, the process groups its collectives call and the build's engine groups; the
    same of verify's reference of that build (reference.build_reference) and its groups; and of
    from_pretrained(parallel="tp=2") over the default group's mesh, for comparison."""
    import argparse
    import tempfile

    from dsv4_compile.build import add_arguments
    from dsv4_compile.distributed import collective_groups, process_mesh
    from dsv4_compile.plan import Plan
    from dsv4_compile.reference import build_reference

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = str(Path(tempfile.mkdtemp()) / "out")
    plan = Plan(parser.parse_args(["--gpu", "cpu", "--context", "128", "--parallel", "tp=2", "--weights", path, "--out", out]))
    got = {"state before model()": plan.state}
    reads.clear()
    model = plan.model(128)
    got.update(state=model.state_dict(), reads=list(reads), groups=set(collective_groups(model)),
               engine_groups={group.group_name for group in process_mesh(plan.layout, "cpu").get_all_groups()})
    reads.clear()  # verify's eager reference of such a build (a manifest's weights, device and mesh)
    build = SimpleNamespace(weights=plan.weights, device={"kind": "cpu"}, mesh={"layout": str(plan.layout)})
    reference = build_reference(build, plan.config, 128, plan.config.dtype)
    got["reference"] = {"state": reference.state_dict(), "reads": list(reads), "groups": set(collective_groups(reference)),
                        "reference_groups": {group.group_name for group in
                                             process_mesh(plan.layout, "cpu", "reference").get_all_groups()}}
    reads.clear()
    loaded = _load(path, plan.config.replace(max_seq_len=128), parallel="tp=2")
    got["loader"] = {"state": loaded.state_dict(), "reads": list(reads), "groups": set(collective_groups(loaded))}
    return got


def _kinds(model: Transformer) -> dict[str, str]:
    """The module types of the first CSA layer's split projections and routed experts."""
    attn = model.layers[1].attn
    return {"wq_b": type(attn.wq_b).__name__, "wo_b": type(attn.wo_b).__name__,
            "indexer.wq_b": type(attn.indexer.wq_b).__name__, "experts": type(model.layers[1].ffn.experts).__name__}


@pytest.fixture(scope="module")
def full(checkpoints) -> dict[tuple[str, str], tuple[dict, dict]]:
    """Per checkpoint and weights mode: the single-process load's state_dict and logits."""
    loads = {(name, weights): _load(path, config, weights) for name, (path, config) in checkpoints.items()
             for weights in WEIGHTS}
    return {key: (model.state_dict(), run_logits(model, prompt_tokens(model.config))) for key, model in loads.items()}


@pytest.fixture(scope="module")
def fp8_experts(tmp_path_factory) -> str:
    """A checkpoint of the FP8_EXPERTS model with its routed experts shipped FP8 (as base models)."""
    return str(write_checkpoint(Transformer(FP8_EXPERTS, seed=0), tmp_path_factory.mktemp("fp8_experts") / "hf",
                                expert_format="fp8"))


@pytest.fixture(scope="module")
def world2(checkpoints, fp8_experts, tmp_path_factory) -> list[dict]:
    return spawn_world(_worker, 2, tmp_path_factory.mktemp("world2"), checkpoints, fp8_experts)


# What the sharded model holds as-shipped (weights="as-shipped"): the tiny preset's projections have K < 128
# (kept dequantized, nn.Linear); the wider model's wq_b, wo_b and indexer wq_b stay FP8 (whole tiles a rank).
AS_SHIPPED = {("tiny", "tp=2"): {"wq_b": "Linear", "wo_b": "RowParallelLinear", "indexer.wq_b": "Linear", "experts": "MXFP4Experts"},
              ("tiny", "ep=2"): {"wq_b": "Linear", "wo_b": "Linear", "indexer.wq_b": "Linear", "experts": "MXFP4ExpertShard"},
              ("wide", "tp=2"): {"wq_b": "FP8Linear", "wo_b": "RowParallelFP8Linear", "indexer.wq_b": "FP8Linear",
                                 "experts": "MXFP4Experts"},
              ("wide", "ep=2"): {"wq_b": "FP8Linear", "wo_b": "FP8Linear", "indexer.wq_b": "FP8Linear",
                                 "experts": "MXFP4ExpertShard"}}


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("name", ["hf", "inference", "inference mp=2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_load_is_the_full_load_sharded(world2, full, name, layout, weights):
    whole, reference = full[name, weights]
    for rank, results in enumerate(world2):
        got = results[name, layout, weights]
        if weights == "as-shipped":
            assert got["kinds"] == AS_SHIPPED["wide" if name == "inference mp=2" else "tiny", layout]
        assert got["info"] == str(ParallelLayout.parse(layout))
        assert got["state"].keys() == got["in memory"].keys() == whole.keys()
        for key, value in got["state"].items():
            assert_bits_equal(f"{name} {layout} rank {rank} {key}", got["in memory"][key], value)
        held = sum(t.numel() for t in got["state"].values())
        assert held < sum(t.numel() for t in whole.values())  # only the shards were given storage
        assert_parallel_logits(f"{name} {layout} rank {rank}", reference, got["logits"], flips=name == "inference mp=2")


@pytest.mark.parametrize("name", ["hf", "inference", "inference mp=2"])
def test_a_rank_reads_only_its_experts(world2, checkpoints, name):
    path, config = checkpoints[name]
    per_rank = config.n_routed_experts // 2
    blocks = {f"layers.{i}" for i in range(config.n_layers)} | {f"mtp.{m}" for m in range(config.n_mtp_layers)}
    for rank, results in enumerate(world2):
        for layout, weights in ((layout, weights) for layout in LAYOUTS for weights in WEIGHTS):
            reads = results[name, layout, weights]["reads"]
            assert max(Counter((f, t) for f, t, _, _ in reads).values()) == 1, "a tensor read twice"
            experts = Counter((m[1], int(m[2])) for _, tensor, _, _ in reads if (m := EXPERT.match(tensor)))
            mine = range(rank * per_rank, (rank + 1) * per_rank) if layout == "ep=2" else range(config.n_routed_experts)
            # w1, w2, w3 with their MXFP4 scales: 6 reads per expert of a block
            assert experts == {(block, e): 6 for block in blocks for e in mine}, f"{name} {layout} {weights} rank {rank}"


@pytest.mark.parametrize("name", ["hf", "inference", "inference mp=2"])
def test_a_rank_holds_its_share_and_one_tensor_in_flight(world2, full, name):
    """Host memory of a sharded load: the model's own storage is the rank's share (its state_dict is
    the full load's cut, test_sharded_load_is_the_full_load_sharded), and what is read beside it is
    freed tensor by tensor: the bytes read and not yet freed never exceed twice the largest single read
    (an FP8 weight's codes and its scale tiles are alive together, or two MP pieces being joined).
    Observed, every layout and mode: 1.25x the largest read (the tiny preset), 1.5x (inference mp=2:
    a part joined from two MP shards' pieces beside a previous tensor's). A loader that kept what it
    read (or read everything before copying) holds the checkpoint, many times the largest tensor.
    Measured RSS of a larger synthetic checkpoint: bench/results/cpu/parallel_notes.md."""
    whole = sum(t.numel() * t.element_size() for t in full[name, "bf16"][0].values())
    for rank, results in enumerate(world2):
        for layout, weights in ((layout, weights) for layout in LAYOUTS for weights in WEIGHTS):
            got = results[name, layout, weights]
            largest = max(n for _, _, n, _ in got["reads"])
            held = sum(t.numel() * t.element_size() for t in got["state"].values())
            assert largest <= got["peak in flight"] <= 2 * largest, \
                f"{name} {layout} {weights} rank {rank}: {got['peak in flight']} bytes in flight, largest read {largest}"
            assert held + got["peak in flight"] < whole, f"{name} {layout} {weights} rank {rank}"


# cut by tp: the attention's and the indexer's heads, the vocabulary
SPLIT = re.compile(r".*\.attn\.(wq_b|wo_a|wo_b|indexer\.wq_b|indexer\.weights_proj)\.(weight|scale)|.*\.attn\.attn_sink"
                   r"|(embed|head)\.weight")


@pytest.mark.parametrize("name", ["hf", "inference", "inference mp=2"])
def test_tensor_parallel_reads_only_the_parts(world2, checkpoints, name):
    """Every tensor outside SPLIT is read whole (ep=2: every tensor); under tp=2 the SPLIT tensors are
    read as parts: the rank's half when its rows/columns are whole FP8 tiles (inference mp=2: from its
    own MP shard alone), else widened to whole tiles (the tiny preset: wq_b's 192 rows of 384 take 2 of
    its 3 row tiles; wo_a, 64 rows, wo_b, 64 columns, and the indexer's wq_b, 128 rows, are one tile:
    read whole; the float embedding, head, sinks and indexer weights_proj: the rank's half)."""
    path, config = checkpoints[name]
    stored = sum(e.nbytes for f in Path(path).glob("*.safetensors") for e in read_header(f).values()
                 if SPLIT.fullmatch(e.name))
    for rank, results in enumerate(world2):
        for weights in WEIGHTS:
            for layout in LAYOUTS:
                reads = results[name, layout, weights]["reads"]
                assert all(got == whole for _, tensor, got, whole in reads if layout == "ep=2" or not SPLIT.fullmatch(tensor))
            split = [(file, got) for file, tensor, got, _ in results[name, "tp=2", weights]["reads"] if SPLIT.fullmatch(tensor)]
            got = sum(n for _, n in split)
            if name == "inference mp=2":
                assert got == stored // 2 and {file for file, _ in split} == {f"model{rank}-mp2.safetensors"}
            else:
                assert stored // 2 < got < stored, f"{name} {weights} rank {rank}: read {got} of {stored} bytes of the split tensors"


def test_as_shipped_tensor_parallel_with_activation_quantization(world2, checkpoints):
    """The wider model as shipped with the FP8/FP4 activation simulation: its FP8 wo_b's partial products
    quantize their input in the plain model's 128-wide blocks (the split falls on them), so tp=2 stays
    within the flip-aware criteria of the full load. Observed: sequence 0, the MTP logits and ep=2 exact (the next FP8Linear's input
    quantization absorbs the reassociated sums' ulps); in sequence 1 one FP8 rounding flips at
    position 23 and its compressed CSA entry, visible to every later query that picks it, moves later
    positions by up to 1e-2: 33 of the 308 positions over 1e-3, all in sequence 1 after it (median 0,
    89.3% within 1e-3, every token equal). Dropping wo_b's all-reduce fails test_sharded_load_is_the_
    full_load_sharded by far (median 0.67, 0% within 1e-3, 25% of tokens equal)."""
    path = checkpoints["inference mp=2"][0]
    reference = run_logits(_load(path, QUANTIZED, "as-shipped"), prompt_tokens(QUANTIZED))
    for rank, results in enumerate(world2):
        got = results["quantized"]
        assert got["kinds"] == AS_SHIPPED["wide", "tp=2"] and got["quantize_input"]
        assert_parallel_logits(f"inference mp=2 tp=2 as-shipped quantized rank {rank}", reference, got["logits"], flips=True)


def test_fp8_experts_split_by_whole_experts(world2, fp8_experts):
    """FP8-shipped routed experts as shipped with ep=2: each rank holds FP8ExpertShard (its experts' codes
    and 128x128 scale tiles, the full load's cut bit for bit) quantizing its activations (W8A8), reads
    its own experts' weights and scales and no other's, and its logits are the full load's by the
    flip-aware criteria (each assignment's numbers are the full model's; the ranks' partial sums
    reassociate in the all-reduce)."""
    reference = run_logits(_load(fp8_experts, FP8_EXPERTS, "as-shipped"), prompt_tokens(FP8_EXPERTS))
    per_rank = FP8_EXPERTS.n_routed_experts // 2
    for rank, results in enumerate(world2):
        got = results["fp8 experts"]
        assert got["kinds"]["experts"] == "FP8ExpertShard" and got["quantize_input"]
        assert got["state"].keys() == got["in memory"].keys()
        for key, value in got["state"].items():
            assert_bits_equal(f"fp8 experts ep=2 rank {rank} {key}", got["in memory"][key], value)
        experts = Counter(int(m[2]) for _, tensor, _, _ in got["reads"] if (m := EXPERT.match(tensor)))
        n_moe = FP8_EXPERTS.n_layers + FP8_EXPERTS.n_mtp_layers
        assert experts == {e: 6 * n_moe for e in range(rank * per_rank, (rank + 1) * per_rank)}, f"rank {rank}"
        assert_parallel_logits(f"fp8 experts ep=2 rank {rank}", reference, got["logits"], flips=True)


def test_a_parallel_build_reads_only_its_shard_over_its_engine_groups(world2, checkpoints):
    """`build --parallel tp=2 --weights DIR`: Plan checks the checkpoint's headers and keeps no state; its
    model is each rank's shard read as from_pretrained(parallel=...) reads it (the same tensors and
    bytes: its parts alone, far less than the checkpoint), equal bit for bit, but its collectives call
    the build's engine groups (distributed.process_mesh), not the default group's mesh; verify's eager
    reference of the build reads and holds the same, over the "reference" groups."""
    path = checkpoints["hf"][0]
    stored = sum(e.nbytes for f in Path(path).glob("*.safetensors") for e in read_header(f).values())
    for rank, results in enumerate(world2):
        got = results["build"]
        assert got["state before model()"] is None
        assert got["reads"] == got["loader"]["reads"] and sum(n for _, _, n, _ in got["reads"]) < stored
        assert got["state"].keys() == got["loader"]["state"].keys()
        for key, value in got["state"].items():
            assert_bits_equal(f"build shard rank {rank} {key}", got["loader"]["state"][key], value)
        assert got["groups"] and got["groups"] <= got["engine_groups"], (got["groups"], got["engine_groups"])
        assert not got["groups"] & got["loader"]["groups"]
        reference = got["reference"]
        assert reference["reads"] == got["reads"] and reference["state"].keys() == got["state"].keys()
        for key, value in reference["state"].items():
            assert_bits_equal(f"verify's reference rank {rank} {key}", got["state"][key], value)
        assert reference["groups"] and reference["groups"] <= reference["reference_groups"]
        assert not reference["groups"] & (got["engine_groups"] | got["loader"]["groups"])


def test_world_size_mismatch_is_refused_in_one_line(world2):
    for results in world2:
        assert results["world size"] == "parallel layout tp=2,ep=2: needs a world size of tp * ep = 4, not 2"


@pytest.mark.parametrize("kwargs, message", [
    ({"parallel": "tp=4"}, r"^parallel layout tp=4,ep=1: tp = 4 must divide n_heads \(4\), o_groups \(2\), "
                           r"index_n_heads \(4\) and vocab_size \(256\)$"),
    ({"parallel": "ep=3"}, r"^parallel layout tp=1,ep=3: ep = 3 must divide n_routed_experts \(8\)$"),
    ({"parallel": "tp=2;ep=2"}, r"^parallel layout 'tp=2;ep=2': bad part 'tp=2;ep=2'; accepted: 'tp=T,ep=E'"),
    ({"parallel": "tp=2"}, r"^parallel='tp=2,ep=1': needs an initialised torch.distributed process group of world "
                           r"size tp \* ep = 2 \(init_process_group on every rank\)$"),
])
def test_bad_layouts_are_refused_in_one_line(checkpoints, kwargs, message):
    path, config = checkpoints["hf"]
    with pytest.raises(ValueError, match=message) as error:
        from_pretrained(path, config=config, **{"weights": "bf16", **kwargs})
    assert "\n" not in str(error.value)


def test_reading_a_part_reads_its_bytes_alone(tmp_path):
    """TensorReader.read(entry, part) along every dimension equals the whole tensor's slice."""
    t = torch.arange(4 * 6 * 10, dtype=torch.bfloat16).reshape(4, 6, 10)
    safetensors.torch.save_file({"t": t}, str(tmp_path / "x.safetensors"))
    entry, reader = read_header(tmp_path / "x.safetensors")["t"], TensorReader()
    try:
        for dim, start, stop in [(0, 1, 3), (1, 2, 5), (2, 0, 10), (2, 3, 4), (1, 6, 6)]:
            assert torch.equal(reader.read(entry, (dim, start, stop)), t.narrow(dim, start, stop - start))
        with pytest.raises(ValueError, match=r"^t: part \(1, 4, 7\) outside its shape \[4, 6, 10\]$"):
            reader.read(entry, (1, 4, 7))
    finally:
        reader.close()
