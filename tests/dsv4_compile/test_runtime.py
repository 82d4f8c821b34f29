"""The generation runtime (dsv4_compile/runtime.py) over the eager model: ragged batches, greedy and
seeded sampling, stop tokens and budgets, the checks on bad input; on a GPU the CUDA-graphed decode.
The exported engines run the same loop (tests/dsv4_compile/test_generate.py)."""
from __future__ import annotations

import pytest
import torch

from dsv4_compile import KVCache, ModelConfig, Transformer
from dsv4_compile.runtime import EagerSteps, batch_buckets, sample
from helpers import assert_close

BUCKET = 128


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.load("tiny").replace(max_seq_len=BUCKET), seed=0).eval()


@pytest.fixture(scope="module")
def steps(model):
    return EagerSteps(model, max_batch=4)


def _prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _greedy_alone(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of one prompt by the plain model, batch 1, no padding."""
    cache = KVCache(model.config, 1)
    with torch.no_grad():
        logits = model.prefill(torch.tensor([prompt]), cache)
        out = []
        for i in range(n):
            out.append(int(logits.argmax(-1)))
            logits = model.decode(torch.tensor([[out[-1]]]), torch.tensor([len(prompt) + i]), cache)
    return out


def test_generate_ragged_batch_equals_each_prompt_alone(model, steps):
    """Right-padded prompts of 1, 37 and 9 tokens in one batch: each continues exactly as alone
    (the padding never reaches a real position; the cache keeps each sequence's own last tokens)."""
    prompts = _prompts(0, (1, 37, 9))
    got = steps.generate(prompts, 12)
    assert got == [_greedy_alone(model, p, 12) for p in prompts]


def test_prefill_with_lengths_gives_each_last_real_token(model, steps):
    prompts = _prompts(1, (5, 20))
    cache = steps.new_cache(2)
    tokens = torch.zeros(2, 20, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    logits = steps.prefill(tokens, torch.tensor([5, 20]), cache)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            assert_close(f"prompt {i}", model(torch.tensor([p])), logits[i:i + 1])


def test_sampling_is_reproducible_with_a_seed(steps):
    prompts = _prompts(2, (3, 11))
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.9)
    a = steps.generate(prompts, 16, seed=7, **kwargs)
    assert a == steps.generate(prompts, 16, seed=7, **kwargs)
    assert a != steps.generate(prompts, 16, seed=8, **kwargs)
    assert a != steps.generate(prompts, 16)  # greedy


def test_stop_tokens_and_budgets_per_sequence(steps):
    prompts = _prompts(3, (4, 6))
    free = steps.generate(prompts, 10)
    stop = free[0][3]
    cut = steps.generate(prompts, 10, stop_tokens=[stop])
    for row, full in zip(cut, free):
        n = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:n]
    assert [len(r) for r in steps.generate(prompts, [2, 5])] == [2, 5]


def test_sample_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, 2, 1.0, gen).tolist()) == {0, 1}
    # probabilities 0.64, 0.24, 0.09, ...: top_p 0.7 keeps the first two (0.64 < 0.7)
    assert set(sample(logits, 1.0, 0, 0.7, gen).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, 0, 0.5, gen).tolist()) == {0}
    assert sample(logits, 0.0, 0, 1.0, None).eq(0).all()


@pytest.mark.parametrize("call, message", [
    (lambda s: s.generate([[1] * 120], 10), "needs a context of 129 tokens"),
    (lambda s: s.generate([[1]] * 5, 2), "max_batch is 4"),
    (lambda s: s.generate([[1, 256]], 2), "token id 256 out of the vocabulary"),
    (lambda s: s.generate([[]], 2), "prompt 0: expected a non-empty list"),
    (lambda s: s.generate([[1]], 0), "max_new_tokens 0"),
    (lambda s: s.generate([[1]], 2, temperature=-1.0), "temperature -1.0"),
    (lambda s: s.generate([[1]], 2, top_p=0.0), "top_p 0.0"),
    (lambda s: s.new_cache(5), "batch 5: accepted 1 to max_batch 4"),
    (lambda s: s.decode(torch.tensor([[1]]), torch.tensor([BUCKET]), s.new_cache(1)), f"positions: {BUCKET} out of range"),
    (lambda s: s.decode(torch.tensor([[300]]), torch.tensor([0]), s.new_cache(1)), r"ids must be in \[0, 256\)"),
    (lambda s: s.prefill(torch.ones(1, BUCKET + 1, dtype=torch.long), torch.tensor([3]), s.new_cache(1)), "S in"),
    (lambda s: s.prefill(torch.ones(1, 4, dtype=torch.long), torch.tensor([5]), s.new_cache(1)), "lengths: 5 out of range"),
])
def test_bad_input_is_one_line_value_error(steps, call, message):
    with pytest.raises(ValueError, match=message) as err:
        call(steps)
    assert "\n" not in str(err.value)


def test_cache_of_another_build_is_refused(model, steps):
    other = EagerSteps(Transformer(ModelConfig.load("tiny").replace(max_seq_len=BUCKET, route_scale=2.0), seed=0), 4)
    with pytest.raises(ValueError, match="made by another build"):
        steps.decode(torch.tensor([[1]]), torch.tensor([0]), other.new_cache(1))


def test_batch_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6]


@pytest.mark.gpu
def test_cuda_graphed_decode_equals_eager_decode():
    """The decode step replayed as a CUDA graph (per batch bucket) gives eager's logits and tokens."""
    with torch.device("cuda"):
        model = Transformer(ModelConfig.load("tiny").replace(max_seq_len=BUCKET), seed=0).eval()
    eager, graphed = EagerSteps(model, 4), EagerSteps(model, 4, graphs=True)
    assert graphed.graphs and not eager.graphs
    prompts = _prompts(4, (3, 40, 17))
    assert graphed.generate(prompts, 20) == eager.generate(prompts, 20)
    caches = [s.new_cache(3) for s in (eager, graphed)]
    tokens = torch.tensor([[5], [6], [7]])
    for s, c in zip((eager, graphed), caches):
        s.prefill(torch.ones(3, 8, dtype=torch.long), torch.tensor([8, 4, 2]), c)
    for t in range(5):
        ref = eager.decode(tokens + t, torch.tensor([8, 4, 2]) + t, caches[0])
        out = graphed.decode(tokens + t, torch.tensor([8, 4, 2]) + t, caches[1])
        assert_close(f"graphed step {t}", ref, out.clone())
