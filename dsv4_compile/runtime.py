"""Generation over the prefill-into-cache and decode-step engines: caches, sampling, the decode loop.

    engine = dsv4_compile.load("artifacts/tiny-cpu-...")               # its EngineSteps: engine.steps
    cache = engine.new_cache(batch=2)                                   # one context bucket's cache
    logits = engine.prefill(tokens, lengths, cache)                     # [B, S] right-padded -> [B, V]
    logits = engine.decode(next_tokens, positions, cache)               # [B, 1] at positions [B] -> [B, V]
    engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)             # -> new tokens per prompt

`generate` runs the prompts as one right-padded batch: one prefill, then one decode step per new token
for every sequence at its own position (more prompts than the build's max_batch: batches of max_batch
in order, each in the smallest context bucket that holds it). Greedy at temperature 0; otherwise
softmax(logits / T) restricted to the top_k tokens (0: all) and the smallest set holding top_p of the
probability, sampled from one generator seeded with `seed` (the same seed, prompts and build give the
same tokens).
A sequence stops after a stop token (included in its output) or its budget of new tokens.

The loop keeps its state on the device (next tokens, positions, finished flags, the output), so a
step launches work without waiting for it; the host looks at the finished flags once every
`SYNC_EVERY` steps to stop early. On a GPU the decode step of an AOTInductor engine runs as a CUDA
graph, captured once per batch size bucket (1, 2, 4, ... max_batch) on that bucket's pooled cache:
a batch of 3 prompts runs in the bucket of 4 with one idle sequence.

`EagerSteps` gives the eager model the same interface (verification, tests, benchmarks).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Sequence

import torch

from .libstdcxx import load_aoti_package

SYNC_EVERY = 8


# ---- caches -----------------------------------------------------------------------------------------

class Cache:
    """The KV cache of `batch` sequences for one context bucket of one build: the model's KVCache
    buffers in `KVCache.named_tensors` order (`tensors`). `owner` names the build it belongs to."""

    def __init__(self, tensors: list[torch.Tensor], bucket: int, owner: str):
        self.tensors, self.bucket, self.owner = list(tensors), bucket, owner
        self.batch = tensors[0].shape[0]
        self.graphs: dict[int, "_GraphedDecode"] = {}

    def __repr__(self) -> str:
        size = sum(t.numel() * t.element_size() for t in self.tensors)
        return f"Cache(batch={self.batch}, bucket={self.bucket}, {size / 1e6:.1f} MB on {self.tensors[0].device})"


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch: the batch sizes decode graphs are captured for."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


# ---- the step interface ------------------------------------------------------------------------------

class Steps:
    """What generation needs: config, buckets, max_batch, device, owner; new_cache / prefill / decode.
    Subclasses implement `_new_tensors`, `_prefill` and `_decode`; the checks are here."""

    config = None
    buckets: list[int] = []
    max_batch: int = 1
    device = torch.device("cpu")
    owner = ""
    graphs = False  # decode steps as CUDA graphs

    # -- public
    def new_cache(self, batch: int, bucket: int | None = None) -> Cache:
        """An empty cache for `batch` sequences in context `bucket` (default: the largest)."""
        if not isinstance(batch, int) or not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch!r}: accepted 1 to max_batch {self.max_batch}")
        bucket = max(self.buckets) if bucket is None else bucket
        if bucket not in self.buckets:
            raise ValueError(f"bucket {bucket!r}: not one of this build's context buckets {self.buckets}")
        from .engines import cache_layout

        tensors = [t for _, t in cache_layout(self.config, batch, bucket, device=self.device).named_tensors()]
        return Cache(tensors, bucket, self.owner)

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: Cache) -> torch.Tensor:
        """tokens [B, S] (right-padded), lengths [B] -> logits [B, V] float32 of each last real token;
        fills `cache` (B = cache.batch) so that sequence b decodes from position lengths[b]."""
        self._check_cache(cache)
        tokens = self._check_tokens(tokens, "tokens")
        if tokens.shape[0] != cache.batch or not 2 <= tokens.shape[1] <= cache.bucket:
            raise ValueError(f"tokens {list(tokens.shape)}: expected [B={cache.batch}, S] with S in [2, {cache.bucket}] "
                             f"for this cache (pad a 1-token prompt to S = 2)")
        lengths = self._check_ints(lengths, "lengths", cache.batch, 1, tokens.shape[1])
        return self._prefill(tokens.to(self.device), lengths.to(self.device), cache)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache) -> torch.Tensor:
        """tokens [B, 1] at positions [B] -> logits [B, V] float32; writes the tokens into `cache`."""
        self._check_cache(cache)
        tokens = self._check_tokens(tokens, "tokens")
        if tuple(tokens.shape) != (cache.batch, 1):
            raise ValueError(f"tokens {list(tokens.shape)}: expected [B={cache.batch}, 1] for this cache")
        positions = self._check_ints(positions, "positions", cache.batch, 0, cache.bucket - 1)
        return self._step(tokens.to(self.device), positions.to(self.device), cache)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_tokens: Sequence[int] = (), timings: dict | None = None) -> list[list[int]]:
        """New tokens for each prompt (ragged; batches of max_batch); see the module docstring. `timings`: a
        dict that receives the seconds of the prefills and of the decode steps (synchronising after each)."""
        return generate(self, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop_tokens=stop_tokens, timings=timings)

    # -- checks (host values only: no device synchronisation)
    def _check_cache(self, cache) -> None:
        if not isinstance(cache, Cache):
            raise ValueError(f"cache: expected a Cache from new_cache(), got {type(cache).__name__}")
        if cache.owner != self.owner:
            raise ValueError(f"cache: made by another build ({cache.owner[:12]}...), this one is {self.owner[:12]}...; "
                             f"make it with this engine's new_cache()")

    def _check_tokens(self, tokens, name: str) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: expected a 2-d int64 tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}"
                             f"{' ' + str(tokens.dtype) if isinstance(tokens, torch.Tensor) else ''}")
        if tokens.device.type == "cpu" and tokens.numel():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"{name}: ids must be in [0, {self.config.vocab_size}), got [{low}, {high}]")
        return tokens.to(torch.int64)

    @staticmethod
    def _check_ints(values, name: str, batch: int, low: int, high: int) -> torch.Tensor:
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (batch,) or values.is_floating_point():
            raise ValueError(f"{name}: expected an integer tensor [{batch}], got "
                             f"{list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
        if values.device.type == "cpu":
            bad = [int(v) for v in values if not low <= int(v) <= high]
            if bad:
                raise ValueError(f"{name}: {bad[0]} out of range; accepted [{low}, {high}] for this cache")
        return values.to(torch.int64)

    def _step(self, tokens, positions, cache) -> torch.Tensor:
        if self.graphs:
            graph = cache.graphs.get(cache.batch)
            if graph is None:
                graph = cache.graphs[cache.batch] = _GraphedDecode(self, cache)
            return graph(tokens, positions)
        return self._decode(tokens, positions, cache)

    # -- implemented by subclasses
    def _prefill(self, tokens, lengths, cache: Cache) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, tokens, positions, cache: Cache) -> torch.Tensor:
        raise NotImplementedError


class EagerSteps(Steps):
    """The eager model (built with max_seq_len = its one bucket) behind the Steps interface."""

    def __init__(self, model, max_batch: int, graphs: bool = False):
        from .model import KVCache

        self.model, self.config = model, model.config
        self.buckets, self.max_batch = [model.config.max_seq_len], max_batch
        self.device = next(iter(model.parameters())).device
        self.owner = f"eager-{model.config.config_hash()}"
        self.graphs = graphs and self.device.type == "cuda"
        self._layout = KVCache(model.config, 1, device="meta")

    def _prefill(self, tokens, lengths, cache):
        with torch.no_grad():
            return self.model.prefill(tokens, self._layout.with_tensors(cache.tensors), lengths=lengths).float()

    def _decode(self, tokens, positions, cache):
        with torch.no_grad():
            return self.model.decode(tokens, positions, self._layout.with_tensors(cache.tensors)).float()


class _GraphedDecode:
    """One decode step of `cache` (its batch) captured as a CUDA graph: static token and position
    inputs, the cache's own tensors updated in place, a static logits output."""

    def __init__(self, steps: Steps, cache: Cache):
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.int64, device=steps.device)
        self.positions = torch.zeros(cache.batch, dtype=torch.int64, device=steps.device)
        saved = [t.clone() for t in cache.tensors]  # warm-up and capture run the step for real
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                steps._decode(self.tokens, self.positions, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = steps._decode(self.tokens, self.positions, cache)
        for t, s in zip(cache.tensors, saved):
            t.copy_(s)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.logits


# ---- the loaded engines' steps ------------------------------------------------------------------------

class EngineSteps(Steps):
    """The prefill-cache and decode engines of one format of a build (loader.Engine holds one)."""

    def __init__(self, path: str, manifest, fmt: str, config, records: list, weights=None):
        """manifest: the build's `manifest.Manifest`; records: its `EngineRecord`s of kind
        prefill-cache and decode in format `fmt`; weights: the build's shared_weights.AotiWeights
        (AOTInductor packages compiled without their constants), else None."""
        self.path, self.manifest, self.format, self.config = path, manifest, fmt, config
        self.weights = weights
        self.records = {(e.kind, e.bucket): e for e in records}
        self.buckets = sorted({e.bucket for e in records})
        self.max_batch = int(manifest.max_batch or max(e.batch_range[1] for e in records))
        cuda = manifest.device.get("kind") == "cuda"
        self.device = torch.device("cuda" if cuda and fmt == "aoti" else "cpu")
        self.graphs = cuda and fmt == "aoti" and all(e.cache_io == "in-place" for e in records)
        self.owner = build_identity(manifest.files)
        self._runners: dict[tuple[str, int], object] = {}

    def runner(self, kind: str, bucket: int):
        key = (kind, bucket)
        if key not in self._runners:
            record = self.records.get(key)
            if record is None:
                raise ValueError(f"no {kind} engine for context {bucket} in this build")
            path = os.path.join(self.path, record.files[0])
            if self.format == "aoti":
                self._runners[key] = _AotiStateRunner(path, record.cache_io == "in-place", self.device.type == "cuda",
                                                      self.weights)
            else:
                self._runners[key] = _OnnxStateRunner(path)
        return self._runners[key]

    def _prefill(self, tokens, lengths, cache):
        return self.runner("prefill-cache", cache.bucket)(tokens, lengths, cache)

    def _decode(self, tokens, positions, cache):
        return self.runner("decode", cache.bucket)(tokens, positions, cache)


def build_identity(files: dict) -> str:
    """A build's identity: the sha256 of its file table (the manifest's `files`: every file's checksum)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


class _AotiStateRunner:
    def __init__(self, path: str, in_place: bool, cuda: bool, weights=None):
        # one Steps drives its runners from one thread, and its decode step is captured as a CUDA graph
        self.package = load_aoti_package(path, cuda, single_threaded=True, weights=weights)
        self.in_place = in_place

    def __call__(self, first: torch.Tensor, second: torch.Tensor, cache: Cache) -> torch.Tensor:
        out = self.package(first, second, *cache.tensors)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        if not self.in_place:
            cache.tensors = out[1:]
        return out[0]


class _OnnxStateRunner:
    def __init__(self, path: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, first: torch.Tensor, second: torch.Tensor, cache: Cache) -> torch.Tensor:
        values = [first, second, *cache.tensors]
        out = self.session.run(None, {name: v.cpu().numpy() for name, v in zip(self.inputs, values)})
        cache.tensors = [torch.from_numpy(o) for o in out[1:]]
        return torch.from_numpy(out[0])


# ---- generation ------------------------------------------------------------------------------------------

def _check_prompts(steps: Steps, prompts, max_new_tokens) -> tuple[list[list[int]], list[int]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompt {i}: expected a non-empty list of token ids (int), got {str(prompt)[:60]}")
        bad = [t for t in prompt if not 0 <= t < steps.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} out of the vocabulary [0, {steps.config.vocab_size})")
        out.append(list(prompt))
    budgets = [max_new_tokens] * len(out) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(out) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in budgets):
        raise ValueError(f"max_new_tokens {max_new_tokens!r}: expected an integer >= 1 (or one per prompt)")
    return out, budgets


def plan_batch(steps: Steps, prompts, max_new_tokens) -> tuple[list[list[int]], list[int], int]:
    """Checked prompts, per-prompt budgets and the smallest context bucket that holds every prompt
    and its new tokens (the last new token is sampled, never fed: len + budget - 1 positions)."""
    prompts, budgets = _check_prompts(steps, prompts, max_new_tokens)
    return prompts, budgets, _bucket_for(steps, prompts, budgets)


def _bucket_for(steps: Steps, prompts: list[list[int]], budgets: list[int]) -> int:
    """plan_batch's bucket of checked prompts (ValueError, naming the longest, where none holds them)."""
    need = max(len(p) + b - 1 for p, b in zip(prompts, budgets))
    bucket = next((b for b in sorted(steps.buckets) if b >= max(need, 2)), None)
    if bucket is None:
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]) + budgets[i])
        raise ValueError(f"prompt {longest} of {len(prompts[longest])} tokens + {budgets[longest]} new tokens needs a "
                         f"context of {need} tokens; this build's context buckets: {steps.buckets}")
    return bucket


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature {temperature!r}: accepted a number >= 0 (0 = greedy)")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k {top_k!r}: accepted an integer >= 0 (0 = no limit)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p!r}: accepted a number in (0, 1]")


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B] int64 (argmax at temperature 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p
        drop = probs.cumsum(-1) - probs >= top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).view(-1)


def generate(steps: Steps, prompts, max_new_tokens, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop_tokens: Sequence[int] = (), timings: dict | None = None) -> list[list[int]]:
    """Every input checked before any engine runs; then the prompts in batches of steps.max_batch, in
    order, one sampling generator across them (a seed gives the same tokens for the same prompts)."""
    prompts, budgets, _ = plan_batch(steps, prompts, max_new_tokens)
    _check_sampling(temperature, top_k, top_p)
    stops = list(stop_tokens)
    if not all(isinstance(t, int) and 0 <= t < steps.config.vocab_size for t in stops):
        raise ValueError(f"stop_tokens {stops!r}: token ids in [0, {steps.config.vocab_size})")
    generator = None
    if temperature > 0:
        generator = torch.Generator(steps.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    result = []
    for first in range(0, len(prompts), steps.max_batch):
        part = slice(first, first + steps.max_batch)
        result += _generate_batch(steps, prompts[part], budgets[part], temperature, top_k, top_p, generator, stops,
                                  timings)
    return result


def _generate_batch(steps: Steps, prompts: list[list[int]], budgets: list[int], temperature: float, top_k: int,
                    top_p: float, generator: torch.Generator | None, stops: list[int],
                    timings: dict | None) -> list[list[int]]:
    """generate's one batch (at most max_batch checked prompts) in the smallest bucket that holds it."""
    bucket = _bucket_for(steps, prompts, budgets)
    n = len(prompts)
    batch = next(b for b in batch_buckets(steps.max_batch) if b >= n) if steps.graphs else n
    cache = _pooled_cache(steps, batch, bucket)
    device = steps.device
    seq = max(2, max(len(p) for p in prompts))
    tokens = torch.zeros(batch, seq, dtype=torch.int64)
    lengths = torch.ones(batch, dtype=torch.int64)  # idle rows: one token
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
        lengths[i] = len(p)
    budget = torch.tensor(budgets + [1] * (batch - n), device=device)
    stop = torch.tensor(stops, dtype=torch.int64, device=device)
    most = max(budgets)
    out = torch.zeros(batch, most, dtype=torch.int64, device=device)
    clock = _Clock(device if timings is not None else None)
    logits = steps._prefill(tokens.to(device), lengths.to(device), cache)
    clock.lap(timings, "prefill_s")
    positions = lengths.to(device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for i in range(most):
        nxt = torch.where(finished, 0, sample(logits, temperature, top_k, top_p, generator))
        out[:, i] = nxt
        finished = finished | (budget <= i + 1) | torch.isin(nxt, stop)
        if i + 1 == most or ((i + 1) % SYNC_EVERY == 0 and bool(finished.all())):
            break
        # finished rows keep decoding a dummy token at a position inside the cache (their output is
        # masked): the step's shape stays that of the captured graph
        logits = steps._step(nxt.view(batch, 1), positions.clamp(max=bucket - 1), cache)
        positions = positions + 1
    clock.lap(timings, "decode_s")
    produced = out.cpu().tolist()
    result = []
    for i in range(n):
        row = produced[i][:budgets[i]]
        cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


class _Clock:
    """Wall time between laps added to timings[key], the device synchronised first; does nothing without
    a device."""

    def __init__(self, device):
        self.device, self.t0 = device, time.perf_counter()

    def lap(self, timings: dict | None, key: str) -> None:
        if self.device is None or timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        timings[key] = timings.get(key, 0.0) + now - self.t0
        self.t0 = now


def _pooled_cache(steps: Steps, batch: int, bucket: int) -> Cache:
    """generate's cache for (batch, bucket), kept on the steps object so that its decode graph is
    captured once. A prefill leaves nothing of a previous use visible (see Attention._fill_cache)."""
    pool = steps.__dict__.setdefault("_pool", {})
    if (batch, bucket) not in pool:
        pool[batch, bucket] = steps.new_cache(batch, bucket)
    return pool[batch, bucket]
