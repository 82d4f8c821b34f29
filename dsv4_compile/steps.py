"""The steps of `build` after validation: compile + check, export per bucket, verify; and their progress lines."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import warnings

from .manifest import EngineRecord, Verification
from .model.context import format_context
from .plan import EXPORT_KINDS, Plan, task_threads, usable_cpus
from .reference import float32_twin
from .shared_weights import WeightStore, aoti_tensors

STEPS = ("validate", "model", "compile", "export", "verify", "manifest")
# The dtype ONNX engines compute in: onnxruntime's CPU provider (the one every machine has) has no
# bf16 GEMM, so a bf16 model is exported as its float32 twin (the same weight values, `float32_twin`).
ONNX_COMPUTE_DTYPE = "float32"
# Relative RMS error of the torch.compile'd model against eager, fp32 (see verify.TOLERANCES).
COMPILE_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


class Progress:
    """One line per step start and end (with its time) and notes between, on `stream`.

    While a step runs, a ticker shows it is alive: on a terminal a spinner with the elapsed seconds,
    rewritten in place (`live`, default: `stream` is a TTY); otherwise a plain line every
    `heartbeat_s` seconds, so logs and CI output show progress without control characters.
    """

    SPINNER = "|/-\\"

    def __init__(self, stream, live: bool | None = None, heartbeat_s: float = 30.0):
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.heartbeat_s = heartbeat_s
        self.timings: dict[str, float] = {}
        self._t0 = 0.0
        self._step = ""
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._spinner_shown = False

    def start(self, step: str, detail: str = "") -> None:
        self._stop_ticker()
        self._step, self._t0 = step, time.perf_counter()
        n = STEPS.index(step) + 1
        self._write(f"[{n}/{len(STEPS)}] {step}{': ' + detail if detail else ''} ...")
        self._stop = threading.Event()
        threading.Thread(target=self._tick, args=(self._stop,), daemon=True).start()

    def note(self, text: str) -> None:
        self._write(f"      {text}")

    def done(self, detail: str = "") -> None:
        self._stop_ticker()
        elapsed = time.perf_counter() - self._t0
        self.timings[self._step] = round(self.timings.get(self._step, 0.0) + elapsed, 2)
        self._write(f"      {self._step} done in {elapsed:.1f} s{' (' + detail + ')' if detail else ''}")

    def _write(self, line: str) -> None:
        with self._lock:
            if self._spinner_shown:  # clear the spinner line before a real one
                self.stream.write("\r\033[K")
                self._spinner_shown = False
            print(line, file=self.stream, flush=True)

    def _tick(self, stop: threading.Event) -> None:
        period = 0.2 if self.live else self.heartbeat_s
        turn = 0
        while not stop.wait(period):
            elapsed = time.perf_counter() - self._t0
            with self._lock:
                if stop.is_set():
                    return
                if self.live:
                    self.stream.write(f"\r      {self.SPINNER[turn % 4]} {self._step} {elapsed:.0f} s")
                    self._spinner_shown = True
                else:
                    self.stream.write(f"      ... {self._step} still running ({elapsed:.0f} s)\n")
                self.stream.flush()
            turn += 1

    def stop(self) -> None:
        """End the ticker without a `done` line (a step that failed)."""
        self._stop_ticker()

    def _stop_ticker(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None


@contextlib.contextmanager
def known_export_warnings_silenced():
    """Hide the third-party warnings every export prints and nobody can act on: torch.export's own
    pytree `LeafSpec` deprecation (raised inside torch) and the ONNX exporter's log lines about
    torchvision's ops (`torchvision is not installed. Skipping torchvision::nms`, one per op)."""
    import logging

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*torchvision::nms.*")
            yield
    finally:
        registration.setLevel(level)


def compile_check(plan: Plan, model, progress: Progress) -> dict:
    """dsv4_compile.compile with the passes, on a sample prompt, against eager."""
    import torch

    from .compile import compile as dsv4_compile
    from .export import example_tokens
    from .metrics import rel_rms
    from .verify import SHORT_ATTEMPTS, SHORT_SEQ

    compiled = dsv4_compile(model, gpu=plan.target, passes=plan.passes)
    # Short prompts, best of a few: a reordered sum flips an FP8/FP4 code now and then, and one flip
    # moves the logits by up to 1e-2 (verify.py); a real error fails every attempt.
    seq = min(model.config.max_seq_len, SHORT_SEQ)
    tol = COMPILE_TOLERANCE[plan.config.dtype]
    device = next(model.parameters()).device
    errors = []
    with torch.no_grad():
        for attempt in range(SHORT_ATTEMPTS):
            tokens = example_tokens(model.config, 1, seq, seed=plan.seed + 1 + attempt).to(device)
            errors.append(rel_rms(model(tokens), compiled(tokens)))
            if errors[-1] <= tol:
                break
    err = min(errors)
    report = compiled.dsv4_report.to_dict()
    replaced = sum(op.get("replaced", 0) for op in report.get("ops", {}).values())
    left = sum(op.get("left_alone", 0) for op in report.get("ops", {}).values())
    unrecorded = report.get("unrecorded_graphs", 0)
    progress.note(f"passes={plan.passes}: {replaced} dsv4 nodes substituted, {left} left"
                  + (f" (in the graphs with a record; {unrecorded} came from Inductor's FX graph cache without one)"
                     if unrecorded else "")
                  + f"; compiled vs eager rel RMS {err:.2e} (tolerance {tol:.0e}; best of {len(errors)} prompts of "
                    f"[1, {seq}])")
    return {"rel_rms": err, "tolerance": tol, "ok": err <= tol, "tokens": [1, seq], "report": report}


@dataclasses.dataclass
class ExportTaskResult:
    bucket: int
    kind: str
    formats: tuple[str, ...]
    engines: list[EngineRecord]
    timings: dict[str, float]     # seconds of each part ("torch.export[aoti]", "onnx[decode]", ...)


class ExportRun:
    """Every engine of `plan` written under `tmp`, one task per (bucket, engine kind, formats)
    (Plan.export_tasks) in `plan.jobs` processes, started when this is made: the tasks are independent
    programs, and torch.export, AOTInductor's lowering and the ONNX translation are single-threaded
    Python, so one process would keep one core busy for minutes; the build's compile check runs in its
    own process meanwhile. The processes take the AOTInductor tasks first (the longest). With one
    process the tasks run in this one, in `wait`.

    wait() -> (engine records in bucket, kind, format order; {bucket: {part: seconds}}); close() ends the
    processes (also on an error or SIGTERM: no worker outlives the build or writes into a removed folder)."""

    def __init__(self, plan: Plan, tmp: str, progress: Progress):
        self.plan, self.tmp, self.progress = plan, tmp, progress
        self.tasks = plan.export_tasks()
        self.pool = self.results = None
        self.relayed = threading.Event()
        if plan.jobs <= 1 or len(self.tasks) == 1:
            return
        import multiprocessing

        jobs = min(plan.jobs, len(self.tasks))
        progress.note(f"{len(self.tasks)} export tasks started in {jobs} processes (they run while this step does)")
        context = multiprocessing.get_context("spawn")
        notes = context.SimpleQueue()  # the workers' notes, shown as they come (a task runs for minutes)
        self.pool = context.Pool(jobs, initializer=_export_worker_init,
                                 initargs=(plan, tmp, task_threads(self.tasks, jobs, usable_cpus()), os.getpid(), notes))
        self.relay = threading.Thread(target=_relay_notes, args=(notes, progress, self.relayed), daemon=True)
        self.relay.start()
        longest_first = sorted(self.tasks, key=lambda task: "aoti" not in task[2])
        self.results = self.pool.imap_unordered(_export_worker_run, longest_first)

    def wait(self) -> tuple[list[EngineRecord], dict[int, dict]]:
        results: list[ExportTaskResult] = []
        finished = False
        try:
            if self.pool is None:
                models: dict[int, object] = {}
                for bucket, kind, formats in self.tasks:
                    if bucket not in models:
                        models.clear()  # one bucket's model at a time
                        models[bucket] = self.plan.model(bucket)
                    results.append(export_task(self.plan, bucket, kind, formats, self.tmp, self.progress.note,
                                               models[bucket]))
            else:
                results.extend(self.results)
            finished = True
        finally:
            self.close(finished)
        order = {task: i for i, task in enumerate(self.tasks)}
        results.sort(key=lambda r: order[(r.bucket, r.kind, r.formats)])
        timings: dict[int, dict] = {}
        for r in results:
            timings.setdefault(r.bucket, {}).update(r.timings)
        return [e for r in results for e in r.engines], timings

    def close(self, finished: bool = False) -> None:
        """Ends the processes: let them exit (`finished`: every task done), or kill them. An exiting worker
        runs its own cleanup; a killed one leaves what it registered (tqdm's multiprocessing lock, made in
        torch.export) to the resource tracker, which warns about it at the build's exit."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()
        self.relayed.set()
        self.relay.join(timeout=2.0)  # a worker killed inside a put leaves a message that never completes


def _relay_notes(notes, progress: Progress, relayed: threading.Event) -> None:
    """The workers' notes onto the build's progress until `relayed` is set and none is left."""
    while True:
        if not notes.empty():
            progress.note(notes.get())
        elif relayed.wait(0.1) and notes.empty():
            return


_WORKER: dict = {}


def _export_worker_init(plan: Plan, tmp: str, threads: dict[bool, int], build_pid: int, notes) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the build process handles Ctrl-C and ends the pool
    _die_with_parent(build_pid)
    os.dup2(2, 1)  # stdout is the build's (clean with --json): third-party prints go to stderr
    _WORKER.update(plan=plan, tmp=tmp, threads=threads, notes=notes)


def _die_with_parent(build_pid: int) -> None:
    """A killed build (SIGKILL: no cleanup runs) takes its export workers with it (Linux), instead of
    leaving them to finish minutes of work into a folder nobody will use."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends them with the build
        return
    if os.getppid() != build_pid:  # the build died before prctl took effect
        os._exit(1)


def _export_worker_run(task: tuple[int, str, tuple[str, ...]]) -> ExportTaskResult:
    import torch
    import torch._inductor.config

    bucket, kind, formats = task
    plan = _WORKER["plan"]
    threads = _WORKER["threads"]["aoti" in formats]
    torch.set_num_threads(threads)
    torch._inductor.config.compile_threads = threads
    try:
        return export_task(plan, bucket, kind, formats, _WORKER["tmp"], _WORKER["notes"].put, plan.model(bucket))
    except Exception as err:
        # What reaches the build must pickle (an exception holding frames, e.g. torch.export's, does not:
        # the pool would report only "cannot pickle 'frame' object"): the traceback goes to stderr here.
        import traceback

        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(f"export of the {kind} engine ({', '.join(formats)}) for context {bucket} failed: "
                           f"{type(err).__name__}: {first} "
                           "(the worker's traceback is above)") from None


def export_task(plan: Plan, bucket: int, kind: str, formats: tuple[str, ...], tmp: str, note, model) -> ExportTaskResult:
    """The engines of one kind at context `bucket` in `formats` (a group of plan.formats), written under `tmp`.

    One torch.export per routing: the .pt2 of a GPU build takes the Triton kernels the passes pick
    (AOTInductor compiles them in); ONNX is always the plain code (standard ONNX ops only) computing
    in float32 (ONNX_COMPUTE_DTYPE: a bf16 model is exported as its float32 twin). On the CPU both
    routings are the same and one export serves every format. TensorRT (prefill only) is built from
    the ONNX file."""
    timings: dict[str, float] = {}
    with known_export_warnings_silenced():
        if kind == "prefill":
            engines = _export_prefill_engines(plan, model, bucket, formats, tmp, note, timings)
        else:
            engines = _export_state_engine(plan, model, bucket, kind, formats, tmp, note, timings)
    return ExportTaskResult(bucket, kind, formats, engines, timings)


def engine_prefix(kind: str) -> str:
    """The model's FQN prefix in the exported module of an engine of `kind`: engines.py's wrappers hold
    it as `model`; the prefill engine is the model itself."""
    from .engines import MODEL_PREFIX

    return "" if kind == "prefill" else MODEL_PREFIX


def _store(plan: Plan, tmp: str, fmt: str) -> WeightStore:
    """The shared weights of format `fmt` under the engine root `tmp`, which each task adds its engines'
    tensors to (shared_weights.py): one engine per context bucket and engine kind."""
    return WeightStore(tmp, fmt, engines=len(plan.buckets) * len(EXPORT_KINDS))


def _source(model, dtype: str):
    return model if dtype == model.config.dtype else float32_twin(model, cuda=False)


def _export_prefill_engines(plan: Plan, model, bucket: int, formats: tuple[str, ...], tmp: str, note,
                            timings: dict) -> list[EngineRecord]:
    from . import export as E

    routing = {"aoti": (plan.target, model.config.dtype), "onnx": ("cpu", ONNX_COMPUTE_DTYPE)}
    programs: dict[tuple, E.ExportResult] = {}

    def program(fmt: str) -> E.ExportResult:
        gpu, dtype = key = routing[fmt]
        if key not in programs:
            t0 = time.perf_counter()
            result = programs[key] = E.export_prefill(_source(model, dtype), gpu=gpu, passes=plan.passes)
            took = round(time.perf_counter() - t0, 2)
            kernels = ", ".join(f"{k} x{v['calls']}" for k, v in result.kernels.items()) or "plain code"
            note(f"context {format_context(bucket)}: torch.export of prefill for {fmt} {took:.1f} s "
                 f"(S in {list(result.seq_range)}, B in {list(result.batch_range)}; {dtype}; {kernels}"
                 + (f"; {result.note}" if result.note else "") + ")")
            timings[f"torch.export[{fmt}]"] = took
        return programs[key]

    def record(fmt: str, files: list[str], result: E.ExportResult, verified: Verification) -> EngineRecord:
        return EngineRecord(format=fmt, bucket=bucket, files=tuple(files), seq_range=tuple(result.seq_range),
                            batch_range=tuple(result.batch_range), dynamic=result.dynamic,
                            compute_dtype=routing.get(fmt, (None, ONNX_COMPUTE_DTYPE))[1],
                            kernels=dict(result.kernels) if fmt != "tensorrt" else {}, verified=verified)

    engines: list[EngineRecord] = []
    onnx_rel = onnx_result = None
    for fmt in formats if "tensorrt" not in formats or "onnx" in formats else [*formats, "onnx"]:
        if fmt == "tensorrt":
            continue
        result = program(fmt)
        t0 = time.perf_counter()
        os.makedirs(os.path.join(tmp, fmt), exist_ok=True)
        if fmt == "aoti":
            rel = f"aoti/prefill-{bucket}.pt2"
            E.export_aoti(result, os.path.join(tmp, rel), with_constants=False)
            _store(plan, tmp, fmt).add(rel, aoti_tensors(result.program), engine_prefix("prefill"))
            files = [rel]
        else:
            rel = f"onnx/prefill-{bucket}.onnx"
            example = E.example_tokens(model.config, result.batch_range[1], max(result.seq_range[0], min(64, result.seq_range[1])))
            E.export_onnx(result, os.path.join(tmp, rel), example, weights=_store(plan, tmp, fmt), engine=rel,
                          prefix=engine_prefix("prefill"))
            files = [rel]  # its data: the format's shared weights file (shared_weights.py)
            onnx_rel, onnx_result = rel, result
        took = time.perf_counter() - t0
        timings[fmt] = round(took, 2)
        note(f"context {format_context(bucket)}: {fmt} -> {files[0]} ({took:.1f} s)")
        engines.append(record(fmt, files, result, Verification("pending")))
    if "tensorrt" in formats:
        t0 = time.perf_counter()
        os.makedirs(os.path.join(tmp, "tensorrt"), exist_ok=True)
        rel = f"tensorrt/prefill-{bucket}.engine"
        E.export_tensorrt(os.path.join(tmp, onnx_rel), os.path.join(tmp, rel), onnx_result.seq_range,
                          onnx_result.batch_range)
        timings["tensorrt"] = round(time.perf_counter() - t0, 2)
        note(f"context {format_context(bucket)}: tensorrt -> {rel} ({time.perf_counter() - t0:.1f} s)")
        engines.append(record("tensorrt", [rel], onnx_result, Verification(
            "unverified", error="unverified by our tests (no TensorRT on the project's machines)")))
    return engines


def _export_state_engine(plan: Plan, model, bucket: int, kind: str, formats: tuple[str, ...], tmp: str, note,
                         timings: dict) -> list[EngineRecord]:
    """The prefill-cache or decode engine of one bucket (engines.py), every format but TensorRT.
    AOTInductor on a GPU updates the cache in place; ONNX returns it (ONNX has no in-place update), and
    on the CPU the AOTInductor package shares ONNX's program (one export per engine)."""
    from . import engines as S
    from . import export as E

    out = []
    programs: dict[tuple, S.EngineExport] = {}
    for fmt in [f for f in formats if f in ("aoti", "onnx")]:
        gpu, dtype = (plan.target, model.config.dtype) if fmt == "aoti" else ("cpu", ONNX_COMPUTE_DTYPE)
        in_place = fmt == "aoti" and plan.cuda
        key = (gpu, dtype, in_place)
        if key not in programs:
            t0 = time.perf_counter()
            programs[key] = S.export_engine(_source(model, dtype), kind, plan.max_batch, functional=not in_place,
                                            gpu=gpu, passes=plan.passes)
            timings[f"torch.export[{kind}, {fmt}]"] = took = round(time.perf_counter() - t0, 2)
            note(f"context {format_context(bucket)}: torch.export of {kind} for {fmt} {took:.1f} s")
        exported = programs[key]
        t0 = time.perf_counter()
        os.makedirs(os.path.join(tmp, fmt), exist_ok=True)
        if fmt == "aoti":
            files = [f"aoti/{kind}-{bucket}.pt2"]
            E.export_aoti(exported.result, os.path.join(tmp, files[0]), with_constants=False)
            _store(plan, tmp, fmt).add(files[0], aoti_tensors(exported.result.program), engine_prefix(kind))
        else:
            files = [f"onnx/{kind}-{bucket}.onnx"]  # its data: the format's shared weights file (shared_weights.py)
            E.export_onnx(exported.result, os.path.join(tmp, files[0]), exported.example, exported.input_names,
                          exported.output_names, weights=_store(plan, tmp, fmt), engine=files[0],
                          prefix=engine_prefix(kind))
        timings[f"{fmt}[{kind}]"] = took = round(time.perf_counter() - t0, 2)
        note(f"context {format_context(bucket)}: {fmt} -> {files[0]} ({took:.1f} s)")
        result = exported.result
        out.append(EngineRecord(format=fmt, bucket=bucket, files=tuple(files), seq_range=tuple(result.seq_range),
                                batch_range=tuple(result.batch_range), dynamic=result.dynamic, compute_dtype=dtype,
                                kernels=dict(result.kernels), verified=Verification("pending"), kind=kind,
                                cache_io="in-place" if in_place else "returned"))
    return out


def verify_engines(engines: list[EngineRecord], outcome: dict, progress: Progress) -> list[EngineRecord]:
    """`engines` with the verify worker's verdict (`outcome`, verify.run_verify_worker) on each pending one."""
    where = outcome.get("where", "fresh process")
    by_key = {(r["format"], r["bucket"], r.get("kind", "prefill")): r for r in outcome.get("results", [])}
    done = []
    for e in engines:
        if e.verified.status == "pending":
            failed = outcome.get("worker_error") or outcome.get("check_error")  # the worker, or the folder it refused
            e = dataclasses.replace(e, verified=Verification.from_worker(by_key.get((e.format, e.bucket, e.kind)), where,
                                                                         failed))
            v = e.verified
            progress.note(f"{e.format} {e.kind} context {format_context(e.bucket)}: {v.status}"
                          + (f", short prompt rel RMS {v.rel_rms:.2e} (tolerance {v.tolerance:.0e}), all token "
                             f"sets <= {v.max_rel_rms:.2e} (flip bound {v.flip_bound:.0e})"
                             if v.rel_rms is not None else "")
                          + (f" ({v.error})" if v.error else ""))
        done.append(e)
    return done
