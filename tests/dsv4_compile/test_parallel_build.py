"""A parallel build on CPU: `torchrun --nproc-per-node 2 -m dsv4_compile build --parallel tp=2` (gloo), then
`verify` and `generate` across the 2 ranks, against the single-process (unsharded) model; the refusals.

The model is the tiny preset cut to one CSA layer (its compressor and indexer), no MTP, context 128
(`CUT`), and the build exports the two engines `generate` runs (prefill-cache and decode;
`BUILD_SCRIPT` leaves out the logits engine, which only `Engine.run` uses: each engine is an
AOTInductor C++ compile per rank, the cost of this file).
Each rank's engines are torch.export'ed with the prompt length dynamic (the example's S is the bucket's
half; verify and generate prefill other lengths) and checked against that rank's eager shard by the
build's verify step. Tensor parallelism, whose engines run an all-reduce per sublayer and the
vocabulary's all-gather:
`generate` calls them NEW_TOKENS times in a row on each rank, as fast as they return (outside
torch.inference_mode these calls deadlocked in gloo: docs/DESIGN.md, traps).
Generation across ranks is compared with the plain model's own greedy generation (EagerSteps, one
process): the tensor-parallel sums are reassociated, so a token may differ only at a near tie of the
plain model's top-2 logits (token_check's criterion, with the bound fixed here: `NEAR_TIE`);
observed: every token equal.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import dsv4_compile
from dsv4_compile import ModelConfig, Transformer
from dsv4_compile.cli import main as cli_main
from dsv4_compile.runtime import EagerSteps

# Its own xdist group: one worker builds once; it need not wait behind the spawned worlds' group.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("parallel-build")]

# The tiny preset cut to one CSA layer (compressor, indexer, score-routed MoE), no MTP, context 128.
CUT = {"n_layers": 1, "compress_ratios": [4], "n_hash_layers": 0, "n_mtp_layers": 0, "max_seq_len": 128}
PROMPTS = [[5, 17, 3, 99, 42, 7], [200, 1, 64]]
NEW_TOKENS = 12
# A greedy token may differ from the plain model's only where its top-2 logits are this close: the
# reassociated fp32 sums move logits by ~1e-6 relative and an FP8/FP4 flip by up to 1e-2 of their RMS
# (verify.py), far below any gap a wrong shard leaves.
NEAR_TIE = 5e-2


# `build` with the prefill-cache and decode engines only (see the module docstring).
BUILD_SCRIPT = """
import sys
from dsv4_compile import plan
from dsv4_compile.cli import main

plan.EXPORT_KINDS = ("prefill-cache", "decode")
sys.exit(main(["build", *sys.argv[1:]]))
"""


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _torchrun(args: list[str], cwd, timeout: int = 900, script: str | None = None) -> subprocess.CompletedProcess:
    """2 ranks of `python -m dsv4_compile <args>` (or of `script <args>`) under torchrun, on this machine.
    Past `timeout` seconds torchrun and every process under it are killed (SIGKILL: a rank hung in an
    AOTInductor engine ignores SIGTERM, and torchrun starts each rank in a session of its own) and the
    test fails with the output so far."""
    target = [script] if script else ["-m", "dsv4_compile"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *_descendants(proc.pid)]:  # all found before any dies (no reparenting)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out, err = proc.communicate()
            pytest.fail(f"torchrun {' '.join(args)} still running after {timeout} s: killed with its ranks\n"
                        f"{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(json.dumps({"base": "tiny", **CUT}))  # YAML is a superset of JSON
    return path


@pytest.fixture(scope="module")
def parallel_build(tmp_path_factory, config_file):
    out = tmp_path_factory.mktemp("parallel") / "small-tp2"
    script = out.parent / "build_two_engines.py"
    script.write_text(BUILD_SCRIPT)
    proc = _torchrun(["--parallel", "tp=2", "--config", str(config_file), "--out", str(out)], out.parent,
                     script=str(script))
    assert proc.returncode == 0, f"parallel build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc


@pytest.fixture(scope="module")
def single_process_tokens():
    """The plain (unsharded) model's greedy tokens, one process: what the single-process build generates."""
    config = ModelConfig.load("tiny").replace(**CUT)
    model = Transformer(config, seed=0).eval()
    steps = EagerSteps(model, max_batch=2)
    return steps, steps.generate(PROMPTS, NEW_TOKENS)


def _generate(build, cwd, script: str | None = None) -> dict:
    proc = _torchrun(["generate", str(build), "--batch-file", str(cwd / "prompts.jsonl"), "--max-new-tokens",
                      str(NEW_TOKENS), "--json"] if script is None else [str(build), str(cwd / "prompts.jsonl")],
                     cwd, timeout=300, script=script)
    assert proc.returncode == 0, f"generate failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"only rank 0 prints, one JSON line: {lines}"
    return json.loads(lines[0])


def _first_difference_is_a_near_tie(steps, tokens: list[list[int]], reference: list[list[int]]) -> str | None:
    """None when `tokens` equal `reference` up to each sequence's first difference and that difference
    is at a near tie of the plain model's top-2 logits (teacher-forced on the shared history); else why not."""
    for i, (got, want) in enumerate(zip(tokens, reference)):
        if got == want:
            continue
        k = next((t for t in range(min(len(got), len(want))) if got[t] != want[t]), None)
        if k is None:
            return f"sequence {i}: {len(got)} tokens, the single process made {len(want)}"
        history = PROMPTS[i] + want[:k]
        cache = steps.new_cache(1)
        logits = steps.prefill(torch.tensor([history]), torch.tensor([len(history)]), cache)[0]
        top2 = logits.topk(2).values
        gap = float(top2[0] - top2[1]) / float(logits.pow(2).mean().sqrt())
        if gap > NEAR_TIE:
            return (f"sequence {i}: token {k} is {got[k]}, the single process's {want[k]}, with a top-2 gap of "
                    f"{gap:.2e} (relative to the logits' RMS) > {NEAR_TIE:.0e}: not a near tie")
    return None


def test_parallel_build_has_one_engine_per_rank_and_the_mesh(parallel_build):
    out, proc = parallel_build
    manifest = json.loads((out / "manifest.json").read_text())
    mesh = manifest["mesh"]
    assert {k: mesh[k] for k in ("layout", "tp", "ep", "world_size", "dims", "backend", "device_kind")} == \
        {"layout": "tp=2,ep=1", "tp": 2, "ep": 1, "world_size": 2, "dims": ["ep", "tp"], "backend": "gloo",
         "device_kind": "cpu"}
    assert "AOTInductor package per rank" in mesh["engine"] and "collectives" in mesh["engine"]
    assert manifest["formats"] == ["aoti"] and manifest["device"]["kind"] == "cpu"
    kinds = sorted(f"{e['kind']}-{e['bucket']}" for e in manifest["engines"])
    assert kinds == ["decode-128", "prefill-cache-128"]
    assert all(e["verified"]["status"] == "verified" for e in manifest["engines"]), manifest["engines"]
    # the prompt length stays dynamic through the sharded model's export (the indexer's symbolic-length path)
    assert {e["kind"]: e["seq_range"] for e in manifest["engines"]} == {"prefill-cache": [2, 128], "decode": [1, 1]}
    engines = sorted(f"aoti/{k}.pt2" for k in kinds)
    # the engines' one group (tp spans the world), the same on both ranks, not the default group "0"
    (group,) = mesh["ranks"][0]["groups"]
    assert group != "0"
    for rank, entry in enumerate(mesh["ranks"]):
        assert entry["rank"] == rank and entry["root"] == f"rank{rank}"
        assert entry["groups"] == {group: [0, 1]}
        # each rank's engines share its shard's one weights file (shared_weights.py)
        assert sorted(entry["files"]) == [f"rank{rank}/{e}" for e in [*engines, "aoti/weights.safetensors"]]
        for rel, sha in entry["files"].items():
            assert manifest["files"][rel]["sha256"] == sha == dsv4_compile.manifest.sha256_file(out / rel)
    assert sorted(manifest["files"]) == sorted(f for entry in mesh["ranks"] for f in entry["files"])
    ranks = [mesh["ranks"][r]["files"][f"rank{r}/aoti/decode-128.pt2"] for r in (0, 1)]
    assert ranks[0] != ranks[1], "each rank packages its own shard"
    assert "torchrun --nproc-per-node 2 -m dsv4_compile generate" in proc.stdout


def test_generation_across_2_ranks_equals_the_single_process(parallel_build, single_process_tokens, tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"tokens": p}) + "\n" for p in PROMPTS))
    report = _generate(parallel_build[0], tmp_path)
    steps, reference = single_process_tokens
    assert report["format"] == "aoti"
    assert _first_difference_is_a_near_tie(steps, report["new_tokens"], reference) is None  # observed: all equal


def test_a_rank_running_the_other_ranks_engine_is_caught(parallel_build, single_process_tokens, tmp_path):
    """Planted bug: rank 1 loads rank 0's engines (both then run query heads 0-1 and the first half of
    the vocabulary, none the rest): the generated tokens fail the criterion above."""
    script = tmp_path / "wrong_rank.py"
    script.write_text(textwrap.dedent("""
        import sys
        from dsv4_compile.cli import main
        from dsv4_compile.manifest import Manifest

        Manifest.engine_root = lambda self, rank: "rank0"   # every rank loads rank 0's engines
        sys.exit(main(["generate", sys.argv[1], "--batch-file", sys.argv[2], "--max-new-tokens", "%d", "--json"]))
    """ % NEW_TOKENS))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"tokens": p}) + "\n" for p in PROMPTS))
    report = _generate(parallel_build[0], tmp_path, script=str(script))
    steps, reference = single_process_tokens
    assert _first_difference_is_a_near_tie(steps, report["new_tokens"], reference) is not None


def test_verify_across_2_ranks(parallel_build, tmp_path):
    proc = _torchrun(["verify", str(parallel_build[0]), "--seed", "3"], tmp_path, timeout=600)
    assert proc.returncode == 0, f"verify failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count(f"verify {parallel_build[0]}: the build's 2 rank processes (tp=2,ep=1)") == 1  # rank 0
    assert proc.stdout.count(" ok") == 2, proc.stdout  # prefill-cache, decode


def test_verify_across_2_ranks_refuses_a_changed_file_of_one_rank(parallel_build, tmp_path):
    """Each rank's worker reads the checksums (the command itself does not): a byte changed in a file of
    rank 1 is refused on every rank, each exits 2 (torchrun itself exits 1 when a rank fails), each
    rank's error naming the file once."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(parallel_build[0], copy)
    rel = sorted(r for r in json.loads((copy / "manifest.json").read_text())["files"] if "rank1" in r)[0]
    with open(copy / rel, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0x01]))
    proc = _torchrun(["verify", str(copy), "--seed", "3"], tmp_path, timeout=600)
    assert proc.returncode == 1 and "(exitcode: 2)" in proc.stderr, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # each rank that prints names the file once (the ranks share stderr: their lines may run together)
    refusals = proc.stderr.count("dsv4_compile verify: error: ")
    assert refusals >= 1 and proc.stderr.count(f"checksum mismatch for {rel}") == refusals, proc.stderr


def test_each_rank_reads_the_contents_of_its_own_files_and_the_shared_ones(parallel_build, tmp_path, monkeypatch):
    """check_manifest(rank=r) hashes the shared files and rank r's folder, never another rank's (every
    rank's presence and sizes are still checked): together the ranks read every file once (this build
    has no file outside the rank folders; one there would be read by every rank)."""
    import dataclasses
    import shutil

    from dsv4_compile import manifest as manifest_module

    copy = tmp_path / "copy"
    shutil.copytree(parallel_build[0], copy)
    files = sorted(json.loads((copy / "manifest.json").read_text())["files"])
    hashed: dict[int, list[str]] = {}
    real_hashes = manifest_module.sha256_files
    for rank in (0, 1):
        monkeypatch.setattr(manifest_module, "sha256_files",
                            lambda root, rels, rank=rank: hashed.setdefault(rank, list(rels)) and real_hashes(root, rels))
        manifest_module.check_manifest(str(copy), rank=rank)
    shared = [rel for rel in files if not rel.startswith(("rank0/", "rank1/"))]
    for rank in (0, 1):
        assert hashed[rank] == sorted(shared + [rel for rel in files if rel.startswith(f"rank{rank}/")])
    assert {rel for rels in hashed.values() for rel in rels} == set(files)
    built = manifest_module.read_manifest(str(copy))
    with_shared = dataclasses.replace(built, files={**built.files, "tokenizer.json": {"sha256": "0", "size": 1}})
    for rank in (0, 1):
        assert "tokenizer.json" in with_shared.files_checked_by(rank)
    assert with_shared.files_checked_by(2) == with_shared.files_checked_by(None) == sorted(with_shared.files)
    rel = next(r for r in files if r.startswith("rank1/"))
    with open(copy / rel, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0x01]))
    monkeypatch.setattr(manifest_module, "sha256_files", real_hashes)
    manifest_module.check_manifest(str(copy), rank=0)  # rank 1's change is rank 1's to find
    with pytest.raises(dsv4_compile.ArtifactError, match=f"checksum mismatch for {rel}"):
        manifest_module.check_manifest(str(copy), rank=1)
    with pytest.raises(dsv4_compile.ArtifactError, match=f"checksum mismatch for {rel}"):
        manifest_module.check_manifest(str(copy))  # outside a process group: every file
    with open(copy / rel, "ab") as f:
        f.write(b"x")
    with pytest.raises(dsv4_compile.ArtifactError, match=f"{rel} has .* bytes"):
        manifest_module.check_manifest(str(copy), rank=0)  # sizes: every rank checks every file


# A rank that hangs as one stuck in an AOTInductor engine does: SIGTERM does not end it. It names its
# pid in words: the two ranks share torchrun's stdout, and their lines came back run together once.
HANGING_RANK = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"rank pid {os.getpid()};", flush=True)
time.sleep(600)
"""


def test_a_torchrun_past_its_timeout_is_killed_with_its_ranks(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANGING_RANK)
    with pytest.raises(pytest.fail.Exception, match="still running after 15 s") as failed:
        _torchrun([], tmp_path, timeout=15, script=str(script))
    ranks = [int(pid) for pid in re.findall(r"rank pid (\d+);", str(failed.value))]
    assert len(ranks) == 2, str(failed.value)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in ranks), f"ranks {ranks} outlived their torchrun"


def _one_line_exit_2(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    return lines[0]


def test_generate_outside_torchrun_or_in_another_world_size_is_refused(parallel_build, tmp_path):
    build = str(parallel_build[0])
    cmd = [sys.executable, "-m", "dsv4_compile", "generate", build, "--tokens", "1,2,3"]
    line = _one_line_exit_2(subprocess.run(cmd, capture_output=True, text=True, timeout=120))
    assert line == (f"dsv4_compile generate: error: {build} (built for tp=2,ep=1) needs 2 processes, one per rank; "
                    f"this is one process, no torchrun: run `torchrun --nproc-per-node 2 -m dsv4_compile generate "
                    f"{build} --tokens 1,2,3`")
    world1 = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": "0"}
    line = _one_line_exit_2(subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=world1))
    assert "needs 2 processes, one per rank; this is a world of 1 processes" in line


def test_load_refuses_another_world_size(parallel_build, tmp_path):
    """dsv4_compile.load in a process group of 1 (and in none) refuses the 2-rank build in one line."""
    code = textwrap.dedent(f"""
        import torch.distributed as dist
        import dsv4_compile
        for init in (False, True):
            if init:
                dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
            try:
                dsv4_compile.load({str(parallel_build[0])!r})
            except dsv4_compile.ArtifactError as err:
                print(err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    build = str(parallel_build[0])
    assert proc.stdout.splitlines() == [
        f"{build}: built for 2 ranks (tp=2,ep=1); this process is in no torch.distributed process group: run it as "
        f"2 processes: torchrun --nproc-per-node 2 ...",
        f"{build}: built for 2 ranks (tp=2,ep=1); this process group has 1: run it as 2 processes: torchrun "
        f"--nproc-per-node 2 ..."], proc.stderr[-2000:]


@pytest.mark.parametrize("argv, expected", [
    (["--parallel", "tp=2"], "--parallel tp=2,ep=1 needs 2 processes, one per rank; this is one process, no torchrun: "
                             "run `torchrun --nproc-per-node 2 -m dsv4_compile build --config tiny --out "),
    (["--parallel", "tp=2", "--format", "aoti,onnx"], "--format aoti,onnx with --parallel tp=2,ep=1: a parallel build "
                                                      "exports aoti only"),
    (["--parallel", "tp=3"], "--parallel: parallel layout tp=3,ep=1: tp = 3 must divide n_heads (4)"),
    (["--parallel", "pp=2"], "--parallel: parallel layout 'pp=2': bad part 'pp=2'"),
])
def test_build_refusals_exit_2_in_one_line(argv, expected, capsys, tmp_path):
    assert cli_main(["build", "--config", "tiny", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err
    assert not (tmp_path / "out").exists()


def test_sampling_on_a_rank_needs_one_seed():
    """Each rank samples for itself: without a shared seed the ranks would feed different tokens."""
    engine = object.__new__(dsv4_compile.loader.Engine)  # only what generate reads before the engines
    engine.rank = 1
    with pytest.raises(ValueError, match=r"^temperature 0.5 on rank 1 of a parallel build: pass seed="):
        engine.generate([[1, 2]], 4, temperature=0.5)
