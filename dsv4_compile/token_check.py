"""Verification by tokens: an engine pair (prefill-cache + decode) against the eager model's
`prefill` + `decode`, the way a user would notice a fault.

The model simulates FP8 (KV entries) and FP4 (indexer), so a reordered float sum moves a value across
a rounding boundary now and then; one flipped code moves the logits by 1e-5 to 1e-2 and, being
cached, every later step of that sequence (verify.py's docstring has the measurements). The checks:

(a) teacher forcing: eager's greedy continuation of ragged prompts (one batch) is fed to both; the
    engine's logits at every step are compared with eager's. The short prompt (4 tokens, the
    rarest flips) must stay within the format's tight tolerance (verify.TOLERANCES) over its prefill
    and its first `TIGHT_STEPS` decode steps; a flip there is retried on a fresh token set (up to
    verify.SHORT_ATTEMPTS), and a real fault (wrong op, weights, cache layout, position) fails every
    attempt at 3e-3 or more. Every step of every sequence must stay within verify.FLIP_BOUND.
(b) greedy generation of `GENERATE_TOKENS` tokens by `generate` on both, one ragged batch: the
    tokens agree up to each sequence's first difference, and that difference is accepted only at a
    near tie: eager's top-2 logit gap at that step is no more than twice the engine's largest logit
    error there under teacher forcing (the histories are identical up to it, so (a) measured exactly
    that step, and (a) bounds that error). A difference anywhere else is the generation loop's
    fault (positions, cache, sampling), not rounding. The report says how many tokens matched.
(c) decode after prefill equals the prefill of the longer prompt (the engines' two paths agree
    with each other): their gap is at most eager's own gap (at least `PATH_TOLERANCE`) plus twice the
    format's tolerance, the triangle inequality over (a)'s bound on each path. The short prompt and
    its first greedy token: the prefill and decode step (a) holds to the tolerance.
(d) the engine's largest batch, where it exceeds (a)'s: ragged prompts in every row, teacher-forced
    over `TIGHT_STEPS` decode steps, every step of every sequence within verify.FLIP_BOUND. A fault
    that shows only past some batch size (a launch sized for fewer rows: an H100 decode engine of
    session 23 computed a third of its MoE assignments at B 64, garbage in the other rows) passes (a).
"""
from __future__ import annotations

import random

import torch

from .distributed import everywhere
from .metrics import rel_rms

TIGHT_STEPS = 2
GENERATE_TOKENS = 32
# Prefill and decode reach the same cached values through different GEMM shapes (a batch of rows vs
# one row): fp32 summation order only, but the FP8/FP4 roundings downstream amplify it; the model's
# own prefill-vs-decode test holds it to 1e-3 (observed 1e-4). The floor of (c)'s eager gap: an
# engine's sums flip other roundings than eager's. In bf16 each path also rounds its own way (5.2e-3
# between an H100 mini engine's two paths): the format's tolerance covers that, twice.
PATH_TOLERANCE = 1e-3


# The longer prompts: past two HCA blocks (128 tokens) and many CSA blocks, short enough for a GPU
# build's ONNX engine on the CPU (its long prompts are the logits engine's "full" case, verify.py).
LONGEST_PROMPT = 300


def _prompts(vocab: int, bucket: int, batch: int, rng: random.Random, steps: int) -> list[list[int]]:
    """Ragged prompts: a short one (4 tokens) first, then longer ones, all leaving room for `steps`."""
    longest = max(5, min(LONGEST_PROMPT, bucket - steps - 1))
    lengths = [4] + [rng.randint(5, longest) for _ in range(batch - 1)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def teacher_forced(steps, prompts: list[list[int]], forced: list[list[int]]) -> list[torch.Tensor]:
    """Logits [T + 1, V] per sequence: the prefill's, then one per forced token."""
    batch = len(prompts)
    seq = max(2, max(len(p) for p in prompts))
    bucket = next(b for b in sorted(steps.buckets) if b >= max(len(p) + len(f) for p, f in zip(prompts, forced)))
    cache = steps.new_cache(batch, bucket)
    tokens = torch.zeros(batch, seq, dtype=torch.int64)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    logits = [steps.prefill(tokens, lengths, cache).float().cpu()]
    for t in range(len(forced[0])):
        step = torch.tensor([[f[t]] for f in forced])
        logits.append(steps.decode(step, lengths + t, cache).float().cpu())
    return list(torch.stack(logits, 1))


def check_engine_pair(engine_steps, eager_steps, bucket: int, tol: float, flip_bound: float, seed: int,
                      attempts: int = 3, tokens: int = GENERATE_TOKENS) -> dict:
    """(a), (b), (c) above for one bucket of one format, `tokens` generated per prompt; returns the
    result (`ok`, `error`, numbers)."""
    rng = random.Random(seed)
    vocab = eager_steps.config.vocab_size
    batch = min(3, engine_steps.max_batch, eager_steps.max_batch)
    steps = min(tokens, bucket // 4)
    for attempt in range(attempts):
        prompts = _prompts(vocab, bucket, batch, rng, steps)
        greedy = eager_steps.generate(prompts, steps)                       # eager's continuation
        ref = teacher_forced(eager_steps, prompts, greedy)
        out = teacher_forced(engine_steps, prompts, greedy)
        errors = [[rel_rms(r[t], o[t]) for t in range(len(r))] for r, o in zip(ref, out)]
        short = max(errors[0][:TIGHT_STEPS + 1])
        if everywhere(short <= tol):  # every rank of a parallel build retries alike: its engine calls are collectives
            break
    worst = max(max(e) for e in errors)
    # (b): free-running greedy generation through the engine's own loop
    generated = engine_steps.generate(prompts, steps)
    matched, legit = [], True
    for i, (g, e) in enumerate(zip(generated, greedy)):
        k = next((t for t in range(min(len(g), len(e))) if g[t] != e[t]), min(len(g), len(e)))
        matched.append(k)
        if k < len(e):
            top2 = ref[i][k].topk(2).values
            gap = float(top2[0] - top2[1])
            err = float((ref[i][k] - out[i][k]).abs().max())
            legit &= gap <= 2 * err
    # (c): the engine's decode after its prefill vs its prefill of the longer prompt, bounded by eager's
    path = decode_vs_prefill(engine_steps, prompts[0], greedy[0][0], bucket)
    path_bound = max(PATH_TOLERANCE, decode_vs_prefill(eager_steps, prompts[0], greedy[0][0], bucket)) + 2 * tol
    # (d): every row of the largest batch
    full = min(engine_steps.max_batch, eager_steps.max_batch)
    full_worst = None
    if full > batch:
        wide = _prompts(vocab, bucket, full, rng, TIGHT_STEPS)
        forced = eager_steps.generate(wide, TIGHT_STEPS)
        full_worst = max(rel_rms(r[t], o[t]) for r, o in zip(teacher_forced(eager_steps, wide, forced),
                                                             teacher_forced(engine_steps, wide, forced))
                         for t in range(len(r)))
    error = (f"short prompt: teacher-forced rel RMS {short:.2e} > {tol:.0e} over its prefill and first "
             f"{TIGHT_STEPS} decode steps" if short > tol
             else f"teacher-forced rel RMS {worst:.2e} > {flip_bound:.0e} (beyond quantization flips)" if worst > flip_bound
             else "greedy generation differs from eager where eager's top-2 logits are not a near tie" if not legit
             else f"decode after prefill vs prefill of the longer prompt: rel RMS {path:.2e} > {path_bound:.1e}"
             if path > path_bound
             else f"at the largest batch ({full}): teacher-forced rel RMS {full_worst:.2e} > {flip_bound:.0e}"
             if full_worst is not None and full_worst > flip_bound else None)
    return {"ok": error is None, "error": error, "rel_rms": short, "tolerance": tol, "max_rel_rms": worst,
            "flip_bound": flip_bound, "attempts": attempt + 1,
            "prompts": [len(p) for p in prompts], "steps": steps,
            "tokens_matched": sum(matched), "tokens_compared": sum(len(e) for e in greedy),
            "decode_vs_prefill_rel_rms": path, "decode_vs_prefill_bound": path_bound,
            "full_batch": full if full_worst is not None else None, "full_batch_max_rel_rms": full_worst}


def decode_vs_prefill(steps, prompt: list[int], token: int, bucket: int) -> float:
    """Relative RMS between `steps`' logits [1, V] of `token` decoded after the prefill of `prompt` and
    of the prefill of `prompt + [token]` (batch 1, fresh caches)."""
    cache = steps.new_cache(1, bucket)
    steps.prefill(torch.tensor([prompt]), torch.tensor([len(prompt)]), cache)
    decoded = steps.decode(torch.tensor([[token]]), torch.tensor([len(prompt)]), cache).float().cpu()
    longer = prompt + [token]
    cache = steps.new_cache(1, bucket)
    prefilled = steps.prefill(torch.tensor([longer]), torch.tensor([len(longer)]), cache).float().cpu()
    return rel_rms(prefilled, decoded)
