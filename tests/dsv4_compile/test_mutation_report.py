"""bench/mutation_report.py: torch's Triton mutation analysis, run offline on every kernel launch (no GPU),
counts no op input as written, except the threshold indexer's known ones (see the report); never the
packed index cache of indexer_topk_cached (a model buffer: export would copy it every decode step); and
every launch builds as torch 2.11's analysis builds it (integer arguments as constants)."""
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
# The fused threshold indexer stores at addresses computed from its scores (the candidate slots): the
# scores come from @triton.jit helpers that load q, the head weights and the keys, so the analysis
# counts those as written (bench/results/H200/mutation_report.md): computed for the indexer just before
# it, they are not shared like the positions (which must never be counted).
KNOWN = {"_indexer_topk_kernel": {"p_q", "p_w", "p_k", "p_kf"}}
# indexer_topk_cached's p_k is the KV cache's index part: its kernels load it in their own body.
CACHE = {"p_k", "p_kf"}


def test_no_kernel_counts_an_op_input_as_written_beyond_the_known():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / "mutation_report.py")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "`" in line]
    kernels = {cells[1].strip().strip("`") for cells in rows}
    assert {"_indexer_topk_kernel", "_indexer_scores_kernel", "_sparse_attn_fwd_kernel", "_sparse_attn_fp8_chunks_kernel",
            "_sparse_attn_combine_kernel", "_hc_mixes_split_kernel", "_hc_pre_kernel",
            "_gate_up_kernel", "_down_kernel", "_fp8_linear_kernel", "_quantize_kernel", "_float32_linear_kernel",
            "_pool_kernel", "_epilogue_kernel", "_fp8_quantize_kernel", "_fp4_quantize_kernel", "_ns_sym_kernel",
            "_ns_gemm_kernel"} <= kernels, kernels
    assert {"indexer_topk_cached (threshold, fp4)", "indexer_topk_cached (radix, fp8)"} <= {c[0].strip() for c in rows}
    assert "moe_experts (MXFP4)" in {c[0].strip() for c in rows}
    for op, kernel, inputs, _, built in rows:
        # torch 2.11 builds the TTIR with integer arguments as constants: a kernel that fails so counts as
        # writing every argument there (CI's torch 2.13 would not show it)
        assert built.strip() == "ok", \
            f"{op.strip()}: {kernel.strip()} does not build as torch 2.11's analysis builds it: {built}"
        kernel = kernel.strip().strip("`")
        counted = {n.strip() for n in inputs.split(",")} - {"-"}
        known = KNOWN.get(kernel, set()) - (CACHE if op.strip().startswith("indexer_topk_cached") else set())
        assert counted <= known, f"{op.strip()}: {kernel} counts op inputs {sorted(counted)} as written"
