"""`python -m dsv4_compile build`: validate -> model -> compile + check -> export per bucket -> verify -> manifest.

    python -m dsv4_compile build                          # CPU machine: tiny preset, CPU, context 512, aoti+onnx
    python -m dsv4_compile build --gpu H100 --config mini --context 8k,32k --format aoti,onnx,tensorrt
    torchrun --nproc-per-node 2 -m dsv4_compile build --parallel ep=2 --context 128   # one engine per rank

Defaults: --config tiny without a GPU, mini with one (`--gpu auto` sees a CUDA device, or --gpu names
one); --context the config's max_seq_len (tiny: 512); --format aoti,onnx; --passes all; --out
artifacts/<config>-<device>-<8 hex of the build's identity>.

Every user mistake is found before anything is written (exit 2, one line): plan.py. The steps are in
steps.py, the reference model (shared with verify) in reference.py, the manifest in manifest.py.

The build is written into a hidden temporary folder beside --out (`.<name>.partial-<pid>`) and renamed
into place only when complete. Interrupted (SIGINT, SIGTERM) it removes that folder and exits 130 / 143;
killed (SIGKILL) it leaves it, with a manifest (if any) that says `build_complete: false`, which `load`
refuses, and the next build of the same --out removes the folders of dead builds (with a note). A
previous build at --out is replaced.

With `--parallel tp=T,ep=E` (model/parallel.py's layout) the build runs as T * E processes under
torchrun (anything else is refused in one line with the torchrun command): every rank builds the model
and keeps its shard (of a --weights checkpoint folder it reads its shard alone), checks compile, exports its own AOTInductor engines (the only format: they call
torch.distributed's functional collectives) into rank<r>/ of the build folder, and verifies them in
its own process against its sharded eager model, all ranks together; rank 0 writes the manifest with
the mesh (distributed.py) and prints.

`--weights-format as-shipped` builds the engines over the weights as a release ships them (FP8 e4m3
linears with 128x128 scales, MXFP4 routed experts: checkpoint/shipped.py; a checkpoint's kept as
loaded), about a quarter to a half of the bytes; the model step prints the weights' bytes in both forms
before anything is exported. The default, bf16, keeps every weight in the config's dtype, as builds
always did; the manifest's weights["format"] says which.

Exit codes: 0 built and every engine verified; 1 a check failed (compile or an export vs eager) or
an internal error (the folder is still written, with the failure in the manifest, when the export
itself succeeded); 2 user mistake, nothing written.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import threading

from .arguments import contexts_arg, positive_int_arg
from .checkpoint.shipped import weight_sizes
from .manifest import FORMATS, EngineRecord, FolderDigests, Manifest, new_manifest, write_manifest
from .model.context import format_context
from .plan import DEFAULT_FORMATS, DEFAULT_MAX_BATCH, PARALLEL_FORMATS, Plan
from .reference import DEFAULT_WEIGHTS_FORMAT, WEIGHT_MODES
from .shared_weights import finish_shared_weights
from .steps import ExportRun, Progress, compile_check, verify_engines
from .verify import CPU_CHECK_SEQ, CPU_CHECK_TOKENS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .model.config import preset_names
    from .token_check import GENERATE_TOKENS

    parser.add_argument("--config", default=None, metavar="NAME|PATH",
                        help=f"preset ({', '.join(preset_names())}) or YAML file (default: tiny without a GPU, mini with one)")
    parser.add_argument("--gpu", default="auto", metavar="auto|cpu|H100|H200",
                        help="target device; auto detects; a named GPU that is not present is an error (default: auto)")
    parser.add_argument("--context", type=contexts_arg, default=None, metavar="LIST",
                        help="context buckets, e.g. 512 or 8k,32k (multiples of 128, at most 1m; default: the config's max_seq_len)")
    parser.add_argument("--format", default=None, metavar="LIST",
                        help=f"comma-separated engine formats among {', '.join(FORMATS)} (default: {DEFAULT_FORMATS}; "
                             f"with --parallel {PARALLEL_FORMATS}, the only one)")
    parser.add_argument("--parallel", default=None, metavar="tp=T,ep=E",
                        help="tensor-parallel attention heads x expert-parallel routed experts over T * E ranks: run "
                             "under `torchrun --nproc-per-node T*E -m dsv4_compile build --parallel ...`; one engine "
                             "per rank (default: one process, no parallelism)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: artifacts/<config>-<device>-<short hash>)")
    parser.add_argument("--weights", default=None, metavar="FILE|DIR",
                        help="a released checkpoint folder (Hugging Face or DeepSeek inference layout; its config.json "
                             "is the config unless --config is given; FP8/MXFP4 weights dequantized to the config's "
                             "dtype unless --weights-format as-shipped), or a safetensors file with the model's own "
                             "state_dict names (default: seeded weights)")
    parser.add_argument("--weights-format", default=DEFAULT_WEIGHTS_FORMAT, choices=WEIGHT_MODES,
                        help="the engines' weights: bf16, every weight in the config's dtype (bf16 for the releases; "
                             "a checkpoint's FP8/MXFP4 dequantized); as-shipped, the linears DeepSeek runs as FP8 GEMMs "
                             "in FP8 e4m3 with 128x128 scales and the routed experts in MXFP4, as a release ships them "
                             "(a checkpoint's kept; seeded weights or a weights file quantized so): about a quarter "
                             "to a half of the bytes (V4-Flash ~162 GB instead of ~583 GB) (default: bf16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic weights (default: 0)")
    parser.add_argument("--passes", default="all", metavar="LIST",
                        help="substitution passes: all, none, or comma-separated names/families (default: all)")
    parser.add_argument("--max-batch", type=positive_int_arg, default=None, metavar="N",
                        help=f"largest batch of the prefill-cache and decode engines (default: {DEFAULT_MAX_BATCH['gpu']} "
                             f"with a GPU, {DEFAULT_MAX_BATCH['cpu']} on the CPU)")
    parser.add_argument("--jobs", type=positive_int_arg, default=None, metavar="N",
                        help="engines exported in parallel processes, one (context, engine kind) each (default: up to "
                             "the CPU count; on a GPU build also as many model copies as its free memory holds, one "
                             "per 4 cores; 1 with weights from a file)")
    parser.add_argument("--thorough", action="store_true",
                        help="verify the engines that run on this CPU for a GPU build (ONNX) at the bucket's longest "
                             f"prompt and with {GENERATE_TOKENS} greedy tokens too (default: prompts up to {CPU_CHECK_SEQ} "
                             f"tokens and {CPU_CHECK_TOKENS} greedy tokens there)")
    parser.add_argument("--json", action="store_true", help="print the build summary as JSON on stdout (progress on stderr)")


def summary_table(manifest: Manifest) -> str:
    rows = [("format", "engine", "context", "S range", "B range", "file", "MB", "verified", "short rel RMS", "tolerance",
             "max rel RMS")]
    root = manifest.engine_root(0)  # a parallel build: rank 0's files (every rank's are alike)
    for e in manifest.engines:
        v = e.verified
        size = sum(manifest.files.get(f"{root}/{f}" if root else f, {}).get("size", 0) for f in e.files) / 1e6
        rows.append((e.format, e.kind, format_context(e.bucket), f"{e.seq_range[0]}-{e.seq_range[1]}",
                     f"{e.batch_range[0]}-{e.batch_range[1]}", e.files[0], f"{size:.1f}", v.status,
                     "-" if v.rel_rms is None else f"{v.rel_rms:.1e}", "-" if v.tolerance is None else f"{v.tolerance:.0e}",
                     "-" if v.max_rel_rms is None else f"{v.max_rel_rms:.1e}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _place(tmp: str, out: str) -> None:
    """Rename the finished temporary folder to `out`, replacing a previous build there."""
    old = None
    if os.path.exists(out):
        old = f"{os.path.join(os.path.dirname(os.path.abspath(out)), '.' + os.path.basename(os.path.abspath(out)))}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(out: str) -> list[str]:
    """Remove the temporary folders (`.<name>.partial-<pid>`, `.<name>.old-<pid>`) that builds of `out`
    whose process is gone left beside it. Returns their paths."""
    parent, name = os.path.split(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:partial|old)-(\d+)")
    removed = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = pattern.fullmatch(entry)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(os.path.join(parent, entry))
    return removed


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM raises SystemExit(143) (like SIGINT's KeyboardInterrupt), so that cleanup runs. Raised at
    any point, that SystemExit can be replaced on its way out by an exception of the code it interrupts
    (a library's cleanup failing on its half-done state): once the signal came, the build still ends
    as terminated, 143, saying what replaced it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def terminate(signum, frame):
        received.append(signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except Exception as err:
        if not received:
            raise
        first_line = str(err).splitlines()[0] if str(err) else ""
        print(f"dsv4_compile build: terminated (signal {received[0]}); while stopping: {type(err).__name__}: "
              f"{first_line}", file=sys.stderr)
        raise SystemExit(128 + received[0]) from err
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    with _sigterm_exits(), _progress(args) as progress:
        return _run(args, progress)


@contextlib.contextmanager
def _progress(args: argparse.Namespace):
    """The build's Progress (stdout, stderr with --json, nowhere on ranks other than 0); its ticker ends
    with the build however it ends (a refusal in the middle of a step too)."""
    from .distributed import world_from_env

    stream = sys.stderr if args.json else sys.stdout
    if getattr(args, "parallel", None) and (world_from_env() or (0, 1))[0] != 0:
        stream = open(os.devnull, "w")  # noqa: SIM115 (rank 0 reports for every rank)
    progress = Progress(stream)
    try:
        yield progress
    finally:
        progress.stop()


def _run(args: argparse.Namespace, progress: Progress) -> int:
    from .distributed import barrier, collective_groups, from_rank0, gathered, mesh_record, rank_root
    from .verify import run_verify_worker, verify_ranks

    progress.start("validate")
    plan = Plan(args)  # UsageError / ConfigError -> exit 2, nothing written
    parallel, main = plan.layout is not None, plan.rank in (None, 0)
    progress.done(f"config {plan.config.name} ({plan.config.config_hash()[:12]}), target {plan.target}, contexts "
                  f"{','.join(format_context(b) for b in plan.buckets)}, formats {','.join(plan.formats)}, out {plan.out}"
                  + (f", parallel {plan.layout} over {plan.layout.world_size} ranks" if parallel else ""))

    import torch

    tmp = None
    if main:
        out_abs = os.path.abspath(plan.out)
        os.makedirs(os.path.dirname(out_abs), exist_ok=True)
        for stale in remove_stale_partials(out_abs):
            progress.note(f"removed {stale}: left by an earlier build of {plan.out} that was killed")
        tmp = f"{os.path.join(os.path.dirname(out_abs), '.' + os.path.basename(out_abs))}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    tmp = from_rank0(tmp)  # one build folder, each rank's engines in its own rank<r>/
    export_root = os.path.join(tmp, rank_root(plan.rank)) if parallel else tmp
    export_timings: dict[int, dict] = {}
    shared: dict[str, str] = {}
    groups_by_rank: list[dict] = []
    exports = None
    digests = FolderDigests(tmp)  # the folder's files hashed once for both manifests

    def manifest_now(engines: list[EngineRecord], complete: bool) -> Manifest:
        manifest = new_manifest(target=plan.target, config=plan.config, weights=plan.weights, buckets=plan.buckets,
                                formats=plan.formats, passes=plan.passes, compile_check=compile_result,
                                engines=engines, export_timings=export_timings, timings=progress.timings, root=tmp,
                                complete=complete, max_batch=plan.max_batch, shared_weights=shared, files=digests)
        if not parallel:
            return manifest
        mesh = mesh_record(plan.layout, "cuda" if plan.cuda else "cpu", groups_by_rank, manifest.files)
        return dataclasses.replace(manifest, mesh=mesh)

    try:
        progress.start("model", "seeded weights" if plan.weights["source"] == "seed" else f"weights {plan.weights_path}")
        model = plan.model(plan.buckets[0])
        n_weights, held, dequantized = weight_sizes(model)
        if parallel:
            groups_by_rank = gathered(collective_groups(model))
        # the engines' weights file holds about `held` bytes per format: said before the export fills a disk
        progress.done(f"{n_weights / 1e6:.2f} M parameters{' on rank 0' if parallel else ''}, {plan.config.dtype}, "
                      f"weights {plan.weights_format}: {_bytes(held)}"
                      + (f" ({_bytes(dequantized)} in {plan.config.dtype})" if held != dequantized else ""))

        progress.start("compile", f"dsv4_compile.compile(passes={plan.passes!r}, gpu={plan.target!r}) vs eager")
        os.makedirs(export_root, exist_ok=True)
        exports = ExportRun(plan, export_root, progress)  # its processes export while the check runs here
        compile_result = compile_check(plan, model, progress)
        progress.done("ok" if compile_result["ok"] else "FAILED")
        del model
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the verify process loads the engines and its own eager reference

        progress.start("export", f"{', '.join(plan.formats)} x {len(plan.buckets)} context bucket(s)"
                       + (f", rank 0 of {plan.layout.world_size} (each rank its own)" if parallel else ""))
        engines, timings = exports.wait()
        export_timings.update(timings)
        shared.update(finish_shared_weights(export_root))
        progress.note("weights: one copy per format in " + (", ".join(
            f"{path} ({os.path.getsize(os.path.join(export_root, path)) / 1e6:.1f} MB)" for path in shared.values())
            or "none (no format exports them apart)"))
        barrier()  # every rank's engines are written
        progress.done()

        progress.start("verify", "every rank's engines against its eager shard, in the rank processes" if parallel
                       else "every engine against eager, in a fresh process")
        if main:
            write_manifest(tmp, manifest_now(engines, complete=False))  # what the worker loads and checks
        barrier()
        to_verify = sorted({e.format for e in engines if e.verified.status == "pending"})
        if parallel:
            outcome = verify_ranks(tmp, to_verify, seed=plan.seed + 1000)
        else:
            outcome = run_verify_worker(tmp, to_verify, seed=plan.seed + 1000, cuda=plan.cuda, progress=progress.note,
                                        thorough=plan.thorough)
        engines = verify_engines(engines, outcome, progress)
        progress.done(f"in {outcome.get('where', 'fresh process')}"
                      + (f", LD_PRELOAD={outcome['preload']}" if outcome.get("preload") else ""))

        progress.start("manifest")
        manifest = manifest_now(engines, complete=True) if main else None
        if main:
            write_manifest(tmp, manifest)
            _place(tmp, plan.out)
        manifest = from_rank0(manifest)
        progress.done(plan.out)
    except BaseException:
        if exports is not None:
            exports.close()
        progress.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    failed = [e for e in engines if e.verified.status == "failed"]
    ok = compile_result["ok"] and not failed
    print(summary_table(manifest), file=progress.stream)
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in progress.timings.items()), file=progress.stream)
    if args.json and main:
        print(json.dumps({"ok": ok, "out": plan.out, "manifest": manifest.to_json()}, indent=2, sort_keys=True))
    if not ok:
        what = [f"{e.format} {e.kind} {format_context(e.bucket)}" for e in failed]
        if not compile_result["ok"]:
            what.insert(0, "compile check")
        if main:
            print(f"dsv4_compile build: error: verification failed ({', '.join(what)}); the build at {plan.out} "
                  f"records it and load() refuses those engines", file=sys.stderr)
        return 1
    run_it = f"torchrun --nproc-per-node {plan.layout.world_size} -m dsv4_compile generate {plan.out} --tokens 1,2,3" \
        if parallel else f"dsv4_compile.load({plan.out!r})"
    print(f"built {plan.out}: {'run' if parallel else 'load'} with {run_it}, check with "
          f"{'torchrun --nproc-per-node ' + str(plan.layout.world_size) + ' -m' if parallel else 'python -m'} "
          f"dsv4_compile verify {plan.out}", file=progress.stream)
    return 0
