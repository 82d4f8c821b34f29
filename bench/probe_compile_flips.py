"""Compiled vs eager logits of the tiny model on this CPU, per position, with the FP8/FP4 activation
simulation on and off and with the passes on and off: tells a rounding-flip cascade (large only with
the simulation on, from the first flipped position on) from a precision fault (large either way).

    python bench/probe_compile_flips.py                                   # this CPU's vector ISA
    ATEN_CPU_CAPABILITY=avx2 SIMDLEN=256 python bench/probe_compile_flips.py   # forced to AVX2
    python bench/probe_compile_flips.py --cuda                            # the GPU's kernels

Results: bench/results/cpu/compile_flips.md.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())  # a post-grad pass runs only on a cache miss

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
from torch._inductor import cpu_vec_isa  # noqa: E402

import dsv4_compile  # noqa: E402
from dsv4_compile import ModelConfig, Transformer  # noqa: E402
from dsv4_compile.metrics import rel_rms  # noqa: E402

FP32_NOISE = 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="the model and the Triton kernels on the GPU")
    args = parser.parse_args()
    if os.environ.get("SIMDLEN"):
        torch._inductor.config.cpp.simdlen = int(os.environ["SIMDLEN"])
    print(f"torch {torch.__version__}, Inductor vec ISA {cpu_vec_isa.pick_vec_isa()}, "
          f"ATen capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    for simulate in (True, False):
        for passes in ("all", "none"):
            torch._dynamo.reset()
            config = ModelConfig.from_preset("tiny").replace(simulate_quantization=simulate)
            model = Transformer(config, seed=0).eval()
            model = model.cuda() if args.cuda else model
            tokens = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
            tokens = tokens.to(model.embed.weight.device)
            start = time.time()
            compiled = dsv4_compile.compile(model, gpu="auto" if args.cuda else "cpu", passes=passes)
            with torch.no_grad():
                ref, out = model(tokens, all_logits=True), compiled(tokens, all_logits=True)
            per_position = [rel_rms(ref[0, i], out[0, i]) for i in range(ref.shape[1])]   # [S]
            first = next((i for i, err in enumerate(per_position) if err > FP32_NOISE), None)
            print(f"simulate_quantization={simulate} passes={passes}: logits {rel_rms(ref, out):.3e}, "
                  f"worst position {max(per_position):.3e}, first position above {FP32_NOISE:g}: {first} "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
