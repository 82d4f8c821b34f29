"""Tuned configs vs the kernel's default vs a typical @triton.autotune list vs a full grid, in one run
(issue 7's recorded comparison). The work is in tuning/compare.py (its docstring says what is measured
and how); this is the bench entry (`python -m dsv4_compile bench --ops tuning`).

    python bench/bench_tuning.py [--kernels sparse_attention,newton_schulz] [--contexts 8k,32k] [--budget 450]
    python bench/bench_tuning.py --cost standin --gpu H100 --out /tmp/cmp     # no GPU: the machinery only

Writes tuning_compare.csv, tuning_compare_configs.csv, tuning_compare.md and tuning_compare.png under
--out (default bench/results/<gpu>/).
"""
import sys

from dsv4_compile.tuning.compare import main

if __name__ == "__main__":
    sys.exit(main())
