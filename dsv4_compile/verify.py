"""`python -m dsv4_compile verify PATH`: every engine of a build against the eager model, in a fresh process.

The command checks the manifest, every checksum, the device and the versions here (exit 2 with one
line on any mismatch, as `load` would refuse), then starts a fresh Python process (with
LD_PRELOAD=<system libstdc++> where this interpreter loads an older one: the lent GPU image) that
loads each format with `dsv4_compile.load(path, format=...)`, rebuilds the eager model from the
manifest's config and seed (or its weights file, whose sha256 must match), and compares them on
fresh random tokens: for every context bucket, [B_max, S_max] and [1, random S in the bucket's range].
The prefill-cache and decode engines are checked by tokens against the eager model's prefill + decode
(token_check.py). Exit 0 only if every engine is within its tolerance; the error of each is printed.

Tolerances (relative RMS of the last-position logits against eager). Three token sets per bucket:
a short prompt ([1, 4]), the bucket's largest shape ([B_max, S_max]) and a random one.

- The model is discontinuous: it simulates FP8 (KV entries) and FP4 (indexer keys and queries)
  quantization, and the indexer picks top-k entries. Any reordered float sum (Inductor's fusion,
  onnxruntime's MLAS kernels) moves some value across a rounding boundary now and then; one flipped
  FP8 code (1 part in 16) or one changed top-k pick then moves the logits by 1e-5 to 1e-2 relative.
  Measured on tiny (CPU, fp32, 2026-11-23), 30 token sets of [2, 512] / [1, random S] each: AOTI
  median 3.7e-5, max 1.8e-3; ONNX median 7.5e-5, max 1.6e-2; without a flip both sit at 3e-7 to 7e-7.
  Long prompts flip almost always, so no tight bound can hold for them.
- So the tight tolerance (`TOLERANCES`) is applied to the short prompt, where a flip is rarer (about
  1 in 6 token sets at 8 tokens, measured; at 4 tokens fewer): up to 3 token sets are tried and the
  best counts, so a real error fails all three and a chance flip almost never does.
  AOTInductor fp32 1e-5 (the same aten graph as eager's plain ops, only summation order and fused
  exp/rsqrt differ: ~5e-7 measured); ONNX fp32 1e-4
  (onnxruntime's own matmul blocking and Exp/Sqrt approximations; ~5e-7 measured, the decade of
  margin is for other CPUs); bf16 models 2e-2 (8 mantissa bits).
- Every prompt shape must also stay within `FLIP_BOUND` (fp32 5e-2: 3x the largest flip measured; a
  wrong op, wrong weights or a dropped rounding step give 3e-3 to 1 and fail the short-prompt bound).
  Flip cascades can still exceed it now and then (8.0e-2 once on a [2, 512] set, AVX512, 2026-12-04),
  so a shape over it also gets up to 3 token sets and the best counts: a fault fails every set.
  Engines over weights as shipped flip far more (FP8 inputs on every FP8 linear): FLIP_BOUND_AS_SHIPPED.
- TensorRT: never verified here (no TensorRT on our machines): reported as unverified.

A GPU build's engines that run on this machine's CPU (ONNX where onnxruntime has no CUDA provider) are
checked on prompts of at most `CPU_CHECK_SEQ` tokens; `--thorough` (verify and build) checks the
bucket's longest prompt there too.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable

TOLERANCES = {("aoti", "float32"): 1e-5, ("onnx", "float32"): 1e-4, ("tensorrt", "float32"): 1e-3,
              ("aoti", "bfloat16"): 2e-2, ("onnx", "bfloat16"): 2e-2, ("tensorrt", "bfloat16"): 2e-2}


# Longer prompts cross FP8/FP4 rounding boundaries differently (see the module docstring): they are
# held to FLIP_BOUND; the tight tolerance applies to a short prompt of SHORT_SEQ tokens.
FLIP_BOUND = {"float32": 5e-2, "bfloat16": 1e-1}
# Engines over weights as shipped (build --weights-format as-shipped) quantize every FP8 linear's input to
# FP8 too (3 mantissa bits): a flipped code there moves a routing choice or a cached row, and the flip
# lives on for the window. Measured on tiny with 128-wide projections (tests/dsv4_compile/
# test_as_shipped_build.py's WIDE), eager's decode steps against eager's prefill of the same tokens
# (the same math in another order), 4 token sets of [4, 59] prompts + 32 steps: median 3.5e-7, worst
# 0.39 (2 of 4 sets above 5e-2). Their long prompts are held to 2x that; faults are the short prompt's
# (tight tolerance, unchanged) and the greedy tokens' to catch.
FLIP_BOUND_AS_SHIPPED = 0.8


def flip_bound(dtype: str, weights: dict | None) -> float:
    """The long prompts' bound for engines at compute `dtype` over a manifest's `weights`."""
    from .reference import weights_format

    return FLIP_BOUND_AS_SHIPPED if weights_format(weights or {}) == "as-shipped" else FLIP_BOUND[dtype]
SHORT_SEQ = 4
SHORT_ATTEMPTS = 3
# One [1, 8192] prompt of mini through onnxruntime on the CPU took over 136 s (H200 host, 2026-12-03):
# with it, a GPU build's verify alone broke the 10-minute budget of `build --gpu H200 --config mini
# --context 8k`. At 512 tokens the CPU engine still runs every op on a multi-tile prompt.
CPU_CHECK_SEQ = 512
# Its prefill-cache + decode pair's token check (token_check.py) on the CPU: each onnxruntime call of mini
# took ~5 s there (H200 host, 2026-12-05), and 32 greedy tokens (a teacher-forced and a free run, 64
# decode calls) kept verify running past 5 minutes. 4 tokens still take the short prompt through its
# tightly held decode steps (token_check.TIGHT_STEPS), a free greedy run and decode after prefill.
CPU_CHECK_TOKENS = 4


def longest_checked_prompt(fmt: str, device: dict, thorough: bool) -> int | None:
    """The longest prompt verify gives an engine of `fmt` from a build made for `device`: `CPU_CHECK_SEQ`
    where a GPU build's engine would run on this machine's CPU (unless `thorough`), else None (the bucket's)."""
    if thorough or device.get("kind") != "cuda" or fmt != "onnx":
        return None
    from .loader import onnx_providers

    return CPU_CHECK_SEQ if onnx_providers(device)[0] == "CPUExecutionProvider" else None


def checked_tokens(longest: int | None) -> int:
    """Greedy tokens per prompt of the token check for an engine given prompts up to `longest`
    (longest_checked_prompt: a number for a GPU build's engine on this CPU)."""
    from .token_check import GENERATE_TOKENS

    return GENERATE_TOKENS if longest is None else CPU_CHECK_TOKENS


def token_set_shapes(seq_range: tuple[int, int], batch_range: tuple[int, int], rng: random.Random,
                     longest: int | None = None) -> list[tuple[str, int, int]]:
    """(kind, batch, seq) of a prefill engine's token sets: a short prompt, the largest shape and a random
    one, prompts of at most `longest` tokens where given (never below the engine's shortest)."""
    (s0, s1), (b0, b1) = seq_range, batch_range
    top = s1 if longest is None else max(s0, min(s1, longest))
    short = max(s0, min(SHORT_SEQ, s1))
    return [("short", 1 if b0 <= 1 else b0, short), ("full", b1, top), ("random", b0, rng.randint(s0, top))]


def tolerance(fmt: str, dtype: str) -> float:
    return TOLERANCES[(fmt, dtype)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .token_check import GENERATE_TOKENS

    parser.add_argument("path", metavar="PATH", help="a build folder (artifacts/<build>)")
    parser.add_argument("--format", default=None, metavar="LIST",
                        help="formats to check (default: every built format that can run here)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random tokens (default: fresh)")
    parser.add_argument("--allow-version-skew", action="store_true", help="accept other torch/triton versions")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--thorough", action="store_true",
                        help=f"a GPU build's engines that run on this CPU get the bucket's longest prompt and "
                             f"{GENERATE_TOKENS} greedy tokens too (default: prompts up to {CPU_CHECK_SEQ} tokens and "
                             f"{CPU_CHECK_TOKENS} greedy tokens there)")


def check_weights(manifest) -> None:
    from .manifest import ArtifactError, sha256_file

    weights = manifest.weights or {"source": "seed", "seed": 0}
    path = weights.get("path", "")
    if weights.get("source") == "file":
        if not os.path.isfile(path):
            raise ArtifactError(f"the weights file this build was made from is gone: {path}")
        if sha256_file(path) != weights.get("sha256"):
            raise ArtifactError(f"the weights file {path} changed since the build (sha256 differs)")
    elif weights.get("source") == "checkpoint":  # its identity: config, shard names, sizes, headers (no tensor bytes)
        from .plan import checkpoint_identity

        if not os.path.isdir(path):
            raise ArtifactError(f"the checkpoint this build was made from is gone: {path}")
        if checkpoint_identity(path) != weights.get("sha256"):
            raise ArtifactError(f"the checkpoint {path} changed since the build (its config.json, shard names, "
                                f"sizes or headers differ)")


def run(args: argparse.Namespace) -> int:
    from .manifest import ArtifactError, check_manifest

    path = args.path
    try:
        # the checksums are read once, by the worker (its check_error below), not here as well
        manifest = check_manifest(path, allow_version_skew=args.allow_version_skew, checksums=False)
        if not manifest.build_complete:
            raise ArtifactError(f"{path}: incomplete build (build_complete is false)")
        check_weights(manifest)
    except ArtifactError as err:
        print(f"dsv4_compile verify: error: {err}", file=sys.stderr)
        return 2
    built = sorted({e.format for e in manifest.engines})
    if args.format:
        formats = [f.strip() for f in args.format.split(",") if f.strip()]
        unknown = [f for f in formats if f not in built]
        if unknown:
            print(f"dsv4_compile verify: error: format {unknown[0]!r} not in this build; built: {', '.join(built)}", file=sys.stderr)
            return 2
    else:
        from .export import tensorrt_unavailable

        formats = [f for f in built if f != "tensorrt" or tensorrt_unavailable() is None]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    if manifest.mesh is not None:  # a parallel build: every rank checks its own engines, in its process
        from .distributed import from_rank0, join_world, silence_other_ranks
        from .model.parallel import ParallelLayout

        layout = manifest.mesh["layout"]
        join_world(ParallelLayout.parse(layout), manifest.mesh["device_kind"] == "cuda",
                   getattr(args, "command_line", None) or ["verify", path], what=f"{path} (built for {layout})")
        silence_other_ranks()
        outcome = verify_ranks(path, formats, seed=from_rank0(seed), allow_version_skew=args.allow_version_skew)
    else:
        outcome = run_verify_worker(path, formats, seed=seed, cuda=manifest.device.get("kind") == "cuda",
                                    allow_version_skew=args.allow_version_skew, thorough=args.thorough,
                                    progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    if outcome.get("check_error"):  # what load() refuses before any engine runs: exit 2, as above
        print(f"dsv4_compile verify: error: {outcome['check_error']}", file=sys.stderr)
        return 2
    results = outcome.get("results", [])
    # What load() refuses fails here too: an engine the build itself recorded as failed.
    recorded = [e for e in manifest.engines if e.format in formats and e.verified.status == "failed"]
    ok = bool(results) and all(r["ok"] for r in results) and not outcome.get("worker_error") and not recorded
    if args.json:
        print(json.dumps({"ok": ok, "seed": seed, **outcome,
                          "recorded_failed": [{"format": e.format, "bucket": e.bucket} for e in recorded]},
                         indent=2, sort_keys=True))
    else:
        print(f"verify {path}: {outcome.get('where', 'fresh process')}, token seed {seed}"
              + (f", LD_PRELOAD={outcome['preload']}" if outcome.get("preload") else ""))
        rows = [("format", "engine", "context", "token sets [B,S]", "short rel RMS", "tolerance", "max rel RMS",
                 "flip bound", "s load/ref/engine/eager", "result")]
        for r in results:
            cases = " ".join(f"[{c['batch']},{c['seq']}]" for c in r.get("cases") or [])
            if r.get("tokens"):  # prefill-cache + decode, by tokens (token_check.py)
                cases = (f"prompts {r['tokens']['prompts']}, {r['tokens']['tokens_matched']}/"
                         f"{r['tokens']['tokens_compared']} greedy tokens as eager")
            rows.append((r["format"], r.get("kind", "prefill"), str(r["bucket"]), cases or "-",
                         "-" if r.get("rel_rms") is None else f"{r['rel_rms']:.2e}", f"{r['tolerance']:.0e}",
                         "-" if r.get("max_rel_rms") is None else f"{r['max_rel_rms']:.2e}",
                         "-" if r.get("flip_bound") is None else f"{r['flip_bound']:.0e}",
                         "/".join(f"{r['seconds'][k]:.1f}" for k in ("load", "reference", "engine", "eager"))
                         if r.get("seconds") and "load" in r["seconds"] else "-",
                         "ok" if r["ok"] else f"FAILED{': ' + r['error'] if r.get('error') else ''}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if outcome.get("worker_error"):
            print(f"dsv4_compile verify: error: {outcome['worker_error']}", file=sys.stderr)
        for e in recorded:
            print(f"dsv4_compile verify: error: the build recorded {e.format} context {e.bucket} as failed "
                  f"({e.verified.error or 'failed'}); load() refuses it", file=sys.stderr)
        skipped = sorted(set(built) - set(formats))
        if skipped:
            print(f"not checked here: {', '.join(skipped)} (TensorRT is not installed)")
    return 0 if ok else 1


# ---- the worker (runs in the fresh process) -------------------------------------------------------

# The prefix of the worker's progress lines on its stderr (the parent relays them as they come).
WORKER_PROGRESS = "dsv4-verify-progress: "


def run_verify_worker(path: str, formats: list[str], seed: int | None = None, cuda: bool = False,
                      allow_version_skew: bool = False, progress: Callable[[str], None] | None = None,
                      thorough: bool = False) -> dict:
    """`python -m dsv4_compile.verify --worker PATH` in a fresh process (libstdc++ preload where needed).
    The worker's progress lines (stderr) go to `progress` as they come."""
    from .libstdcxx import child_env

    env = child_env(cuda=cuda)
    preload = env.get("LD_PRELOAD")  # reported beside the results: what the worker ran with
    with tempfile.TemporaryDirectory(prefix="dsv4-verify-") as scratch:
        result_path = os.path.join(scratch, "result.json")
        cmd = [sys.executable, "-m", "dsv4_compile.verify", "--worker", os.path.abspath(path), "--result", result_path,
               "--formats", ",".join(formats)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        if allow_version_skew:
            cmd.append("--allow-version-skew")
        if thorough:
            cmd.append("--thorough")
        tail: collections.deque[str] = collections.deque(maxlen=3)
        with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            try:
                for line in proc.stderr:
                    line = line.rstrip()
                    if line.startswith(WORKER_PROGRESS):
                        if progress is not None:
                            progress(line[len(WORKER_PROGRESS):])
                    elif line:
                        tail.append(line)
            except BaseException:  # interrupted (SIGINT, SIGTERM): the worker goes too
                proc.kill()
                raise
        if proc.returncode != 0 or not os.path.isfile(result_path):
            return {"worker_error": f"verification process exited with {proc.returncode}: "
                                    f"{' | '.join(tail) or 'no output'}", "preload": preload, "results": []}
        with open(result_path) as f:
            data = json.load(f)
    data["preload"] = preload
    return data


def token_sets(compare: Callable[[], dict], limit: float, attempts: int = SHORT_ATTEMPTS) -> list[dict]:
    """Cases of one prompt shape: `compare()` (a fresh token set each call -> a case with "rel_rms") until
    one is within `limit`, at most `attempts` (a chance flip passes one set; a fault none).

    In a parallel build's world every rank calls this together and each `compare()` runs engines,
    whose collectives every rank must join: whether to draw another set is decided by all ranks
    together (the set is within `limit` on every rank), and a `compare()` that raised on one rank
    raises on every rank (distributed.collectively)."""
    from .distributed import collectively, everywhere

    cases = []
    for _ in range(attempts):
        cases.append(collectively(compare))
        if everywhere(cases[-1]["rel_rms"] <= limit):
            break
    return cases


def judge(cases: list[dict], tol: float, bound: float) -> dict:
    """One bucket's verdict from its cases (kinds "short", "full", "random"): the best set of each kind
    counts; the short prompt is held to `tol`, every kind to `bound`; NaNs must sit where eager's do.
    -> ok, rel_rms (the short prompt's), max_rel_rms, max_abs, error (None or one line)."""
    best: dict[str, float] = {}
    for case in cases:
        best[case["kind"]] = min(best.get(case["kind"], float("inf")), case["rel_rms"])
    short_err, worst = best["short"], max(best.values())
    error = ("NaN positions differ" if any(c.get("nan_mismatch") for c in cases)
             else f"short prompt rel RMS {short_err:.2e} > {tol:.0e}" if short_err > tol
             else f"rel RMS {worst:.2e} > {bound:.0e} (beyond quantization flips)" if worst > bound else None)
    return {"ok": error is None, "rel_rms": short_err, "max_rel_rms": worst,
            "max_abs": max(c["max_abs"] for c in cases), "error": error}


def verify_ranks(path: str, formats: list[str], seed: int, allow_version_skew: bool = False) -> dict:
    """A parallel build's check (all ranks of its world call this together, with the same seed): each
    rank runs `worker` in its own process on its own engines, against its shard of the eager model
    (the same token sets on every rank, so the collectives line up: `worker` takes every decision that
    changes its engine calls with all ranks) -> the outcome of every rank, on every rank: a result
    fails when it fails on any rank (named in its error)."""
    from .distributed import gathered
    from .manifest import current_device_for, describe_device, read_manifest

    manifest = read_manifest(path)
    try:
        mine = worker(path, formats, seed, allow_version_skew)
    except Exception as err:  # noqa: BLE001 (reported with the rank)
        mine = {"worker_error": _one_line(err), "results": []}
    outcomes = gathered(mine)
    where = (f"the build's {len(outcomes)} rank processes ({manifest.mesh['layout']}), each its own engines against "
             f"its eager shard, on {describe_device(current_device_for(manifest.device))}")
    refused = [_on_rank(rank, o["check_error"]) for rank, o in enumerate(outcomes) if o.get("check_error")]
    if refused:  # (a RankFailed names the same rank on every rank: said once)
        return {"where": where, "seed": seed, "check_error": "; ".join(dict.fromkeys(refused)), "results": []}
    errors = [_on_rank(rank, o["worker_error"]) for rank, o in enumerate(outcomes) if o.get("worker_error")]
    if errors:
        return {"where": where, "seed": seed, "worker_error": "; ".join(errors), "results": []}
    results = []
    for rows in zip(*(o["results"] for o in outcomes)):
        bad = next(((rank, row) for rank, row in enumerate(rows) if not row["ok"]), None)
        results.append(rows[0] if bad is None else {**bad[1], "error": _on_rank(bad[0], bad[1].get("error"))})
    return {"where": where, "seed": seed, "results": results}


def _one_line(err: Exception) -> str:
    from .distributed import error_line  # lazily: build imports this module for CPU_CHECK_SEQ

    return error_line(err)


def _on_rank(rank: int, error: str | None) -> str:
    """`error` of rank `rank`, naming it (unless it names the rank it came from: distributed.RankFailed)."""
    return error if error is not None and re.match(r"rank \d+: ", error) else f"rank {rank}: {error}"


def worker(path: str, formats: list[str], seed: int, allow_version_skew: bool = False, thorough: bool = False) -> dict:
    import torch

    from .distributed import RankFailed, collectively, process_rank
    from .loader import load
    from .manifest import (ArtifactError, check_config, check_manifest, current_device_for, describe_device,
                           read_manifest)
    from .metrics import rel_rms
    from .reference import build_reference

    manifest = read_manifest(path)
    config = check_config(manifest)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    device = "cuda" if manifest.device.get("kind") == "cuda" else "cpu"
    results = []
    eager_cache: dict[tuple, object] = {}
    # The folder's checks (manifest, every file's checksum: gigabytes of weights) once for all formats.
    t0 = time.perf_counter()
    _progress("checking the manifest and checksums ...")
    try:
        checked = collectively(lambda: check_manifest(path, allow_version_skew=allow_version_skew, rank=process_rank()))
        unchecked = None
        _progress(f"checked in {time.perf_counter() - t0:.1f} s")
    except (ArtifactError, RankFailed) as err:  # the folder is refused (on some rank): no format runs, exit 2
        line = _one_line(err) if isinstance(err, RankFailed) else " ".join(str(err).split())  # as load() words it
        return {"where": "fresh process", "seed": seed, "check_error": line, "results": []}
    except Exception as err:  # noqa: BLE001 (every format fails with it, below)
        checked, unchecked = None, err
    for fmt in formats:
        t0 = time.perf_counter()
        try:
            if unchecked is not None:
                raise unchecked
            _progress(f"{fmt}: loading ...")
            # every rank skips the format when it fails to load on any (as below: parallel builds' ranks
            # make every engine call together, so they take every step that decides one together)
            engine = collectively(lambda: load(path, format=fmt, allow_version_skew=allow_version_skew,
                                               _require_verified=False, _checked=checked))
        except Exception as err:  # noqa: BLE001 (reported per format)
            for bucket in manifest.context_buckets:
                results.append({"format": fmt, "bucket": bucket, "ok": False, "rel_rms": None,
                                "tolerance": tolerance(fmt, config.dtype), "error": _one_line(err)})
            continue
        loaded_s = time.perf_counter() - t0
        _progress(f"{fmt}: loaded in {loaded_s:.1f} s")
        longest = longest_checked_prompt(fmt, manifest.device, thorough)
        if longest is not None:
            _progress(f"{fmt}: runs on this CPU for a GPU build: prompts up to {longest} tokens (--thorough: "
                      f"the bucket's longest)")
        for entry in engine.engines:
            bucket = entry.bucket
            shapes = token_set_shapes(entry.seq_range, entry.batch_range, rng, longest)
            cases = []
            # the reference: eager at the engine's compute dtype, on the build's device
            dtype = entry.compute_dtype
            tol, bound = tolerance(fmt, dtype), flip_bound(dtype, manifest.weights)
            try:
                weights = getattr(engine, "weights", None)  # aoti: the build's shared weights, read by the first open
                unread = weights is not None and weights.read_s is None
                t0 = time.perf_counter()
                collectively(lambda: engine.open(bucket))
                opened_s = time.perf_counter() - t0
                read = (f", of which reading the shared weights onto {weights.device} {weights.read_s:.1f} s"
                        if unread and weights.read_s is not None else "")
                _progress(f"{fmt} {bucket}: engine file loaded in {opened_s:.1f} s{read}")
                seconds = {"load": round(loaded_s + opened_s, 2), "reference": 0.0, "engine": 0.0, "eager": 0.0}
                t0 = time.perf_counter()
                if (bucket, dtype) not in eager_cache:
                    eager_cache.clear()  # one reference model at a time (mini: 5.6 GB in bf16, 11 GB in fp32)
                    eager_cache[bucket, dtype] = collectively(lambda: build_reference(manifest, config, bucket, dtype))
                model = eager_cache[bucket, dtype]
                seconds["reference"] = round(time.perf_counter() - t0, 2)
                _progress(f"{fmt} {bucket}: eager reference ({dtype}) built in {seconds['reference']:.1f} s")

                def compare(kind: str, batch: int, seq: int) -> dict:
                    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=gen, dtype=torch.int64)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        ref = model(tokens.to(device)).float().cpu()
                    t1 = time.perf_counter()
                    out = engine.run(tokens, bucket=bucket).float().cpu()
                    t2 = time.perf_counter()
                    seconds["eager"] += t1 - t0
                    seconds["engine"] += t2 - t1
                    _progress(f"{fmt} {bucket}: [{batch},{seq}] engine {t2 - t1:.1f} s, eager {t1 - t0:.1f} s")
                    if out.shape != ref.shape:
                        raise RuntimeError(f"output shape {list(out.shape)}, eager {list(ref.shape)}")
                    return {"kind": kind, "batch": batch, "seq": seq, "rel_rms": rel_rms(ref, out),
                            "max_abs": float((ref - out).abs().nan_to_num(float("inf")).max()),
                            "nan_mismatch": bool((torch.isnan(ref) != torch.isnan(out)).any())}

                for kind, batch, seq in shapes:
                    cases += token_sets(lambda: compare(kind, batch, seq), tol if kind == "short" else bound)
                results.append({"format": fmt, "bucket": bucket, **judge(cases, tol, bound), "tolerance": tol,
                                "flip_bound": bound, "cases": cases, "longest_prompt": shapes[1][2],
                                "seconds": {k: round(v, 2) for k, v in seconds.items()}})
            except Exception as exc:  # noqa: BLE001
                results.append({"format": fmt, "bucket": bucket, "ok": False, "rel_rms": None, "tolerance": tol,
                                "cases": cases, "error": _one_line(exc)})
        if engine.steps is not None:
            results += _check_state_engines(engine, manifest, config, eager_cache, seed, checked_tokens(longest))
    here = describe_device(current_device_for(manifest.device))
    return {"where": f"fresh process on {here}", "seed": seed, "results": results}


def _check_state_engines(engine, manifest, config, eager_cache: dict, seed: int, tokens: int) -> list[dict]:
    """The prefill-cache + decode pair of every bucket, by tokens (token_check.py, `tokens` generated per
    prompt); one result per engine of the pair."""
    from .distributed import collectively
    from .reference import build_reference
    from .runtime import EagerSteps
    from .token_check import check_engine_pair

    steps, fmt = engine.steps, engine.format
    results = []
    for bucket in steps.buckets:
        dtype = steps.records["decode", bucket].compute_dtype
        tol, bound = tolerance(fmt, dtype), flip_bound(dtype, manifest.weights)
        t0 = time.perf_counter()
        try:
            if (bucket, dtype) not in eager_cache:
                eager_cache.clear()
                eager_cache[bucket, dtype] = collectively(lambda: build_reference(manifest, config, bucket, dtype))
            eager = EagerSteps(eager_cache[bucket, dtype], steps.max_batch)
            result = collectively(lambda: check_engine_pair(steps, eager, bucket, tol, bound, seed, tokens=tokens))
            result["tokens"] = {k: result[k] for k in ("tokens_matched", "tokens_compared", "prompts", "steps",
                                                       "attempts", "decode_vs_prefill_rel_rms",
                                                       "decode_vs_prefill_bound", "full_batch",
                                                       "full_batch_max_rel_rms")}
        except Exception as exc:  # noqa: BLE001 (reported per engine)
            result = {"ok": False, "rel_rms": None, "tolerance": tol, "error": _one_line(exc)}
        result["seconds"] = {"check": round(time.perf_counter() - t0, 2)}
        tokens = result.get("tokens")
        _progress(f"{fmt} {bucket}: prefill-cache + decode by tokens: "
                  + (f"{tokens['tokens_matched']}/{tokens['tokens_compared']} greedy tokens as eager, teacher-forced "
                     f"short {result['rel_rms']:.2e} (tolerance {tol:.0e}), max {result['max_rel_rms']:.2e}, "
                     f"decode vs prefill {tokens['decode_vs_prefill_rel_rms']:.2e} (bound "
                     f"{tokens['decode_vs_prefill_bound']:.1e})"
                     + (f", every row of batch {tokens['full_batch']} <= {tokens['full_batch_max_rel_rms']:.2e}"
                        if tokens["full_batch"] else "") if tokens else "")
                  + (f"; {result['error']}" if result.get("error") else ""))
        results += [{"format": fmt, "bucket": bucket, "kind": kind, **result} for kind in ("prefill-cache", "decode")]
    return results


def _progress(text: str) -> None:
    """One progress line for the parent (build / verify relays it as it comes)."""
    print(WORKER_PROGRESS + text, file=sys.stderr, flush=True)


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsv4_compile.verify --worker")
    parser.add_argument("--worker", required=True, metavar="PATH")
    parser.add_argument("--result", required=True)
    parser.add_argument("--formats", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-version-skew", action="store_true")
    parser.add_argument("--thorough", action="store_true")
    args = parser.parse_args(argv)
    data = worker(args.worker, [f for f in args.formats.split(",") if f], args.seed, args.allow_version_skew,
                  args.thorough)
    with open(args.result, "w") as f:
        json.dump(data, f)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
