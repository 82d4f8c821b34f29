"""Load time and peak host memory of `dsv4_compile.from_pretrained` on a synthetic V4-Flash-shaped
checkpoint slice (the flash-slice preset: 4 layers + MTP, all 256 experts, as shipped: FP8 linears,
MXFP4 experts), onto the GPU, weights="as-shipped". The checkpoint is written first (random codes,
write_random_checkpoint) and loaded in a fresh process, whose peak RSS (ru_maxrss) is reported beside
the checkpoint's size and its largest shard. The shards sit in the page cache after writing: a warm
load (a cold one adds the disk's read time).

    python bench/bench_checkpoint_load.py [--dir /tmp/flash_slice] [--layers 4]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, environment, out_dir  # noqa: E402

CHILD = """
import json, resource, sys, time, torch, dsv4_compile
t = time.perf_counter()
m = dsv4_compile.from_pretrained(sys.argv[1], device=sys.argv[2], weights="as-shipped")
if sys.argv[2] == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"load_s": time.perf_counter() - t, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "gpu_gb": torch.cuda.memory_allocated() / 2**30 if sys.argv[2] == "cuda" else 0.0,
                  "fp8_linears": m.checkpoint.fp8_linears, "params_g": sum(p.numel() for p in m.state_dict().values()) / 1e9}))
"""


def main(argv=None) -> int:
    import dsv4_compile as d
    from dsv4_compile.checkpoint.write import write_random_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/dsv4_flash_slice_ckpt")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    cfg = d.ModelConfig.from_preset("flash-slice")
    if DEVICE != "cuda":  # smoke test of the script on a CPU machine
        cfg = d.ModelConfig.from_preset("tiny").replace(dim=128, q_lora_rank=128)
    elif args.layers != cfg.n_layers:
        cfg = cfg.replace(n_layers=args.layers, compress_ratios=cfg.compress_ratios[:args.layers],
                          n_hash_layers=min(cfg.n_hash_layers, args.layers))
    t = time.perf_counter()
    path = write_random_checkpoint(cfg, args.dir, shard_bytes=4 << 30 if DEVICE == "cuda" else 1 << 20)
    write_s = time.perf_counter() - t
    shards = sorted(path.glob("*.safetensors"))
    sizes = [f.stat().st_size for f in shards]
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), DEVICE], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:])
        return 1
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(checkpoint_gb=sum(sizes) / 2**30, largest_shard_gb=max(sizes) / 2**30, shards=len(shards),
                  write_s=write_s, layers=cfg.n_layers, experts=cfg.n_routed_experts)
    env = environment()
    print(json.dumps(result, indent=2))
    with open(os.path.join(out_dir(), "checkpoint_load.md"), "w") as f:
        f.write("# from_pretrained load of a synthetic V4-Flash slice (as shipped), one run\n\n"
                + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n"
                + "\n".join(f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in result.items())
                + f"\n\nmodel: flash-slice ({cfg.n_layers} layers + {cfg.n_mtp_layers} MTP, {cfg.n_routed_experts} experts),"
                  f" weights as-shipped onto {DEVICE}; peak RSS of the loading process (ru_maxrss, page cache not"
                  f" counted unless mapped and touched).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
