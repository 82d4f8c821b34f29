"""bench/compile_report.py: the occupancy arithmetic and the ptxas log parsing, and one offline sm_90a
compile (no GPU: the kernels compiled, not interpreted, in a subprocess with TRITON_INTERPRET=0) of the
prefill and the FP8 decode kernel at the tiny preset's shapes, split_d 1 and 2 (and the decode kernel's
dequant="chunks" variant)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import compile_report  # noqa: E402

PTXAS_LOG = """ptxas info    : Compiling entry function '_sparse_attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _sparse_attn_fwd_kernel
    216 bytes stack frame, 216 bytes spill stores, 212 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 216 bytes cumulative stack size, 0 bytes smem
"""


def test_ctas_per_sm_and_ptxas_log():
    assert compile_report.parse_ptxas(PTXAS_LOG) == (255, 216, 212)
    assert compile_report.parse_ptxas(PTXAS_LOG.replace(PTXAS_LOG.splitlines()[2], "    0 bytes stack frame")) == (255, 0, 0)
    # 255 registers x 8 warps = the whole register file (8192 a warp after the 256-register unit)
    assert compile_report.ctas_per_sm(255, 8, 192 * 1024) == (1, "registers")
    assert compile_report.ctas_per_sm(168, 8, 112 * 1024) == (1, "registers")        # 43008 of 65536
    assert compile_report.ctas_per_sm(128, 8, 64 * 1024) == (2, "registers")
    assert compile_report.ctas_per_sm(255, 4, 88 * 1024) == (2, "registers")
    assert compile_report.ctas_per_sm(96, 4, 100 * 1024) == (2, "shared memory")     # 228 KB / 101 KB
    assert compile_report.ctas_per_sm(100, 4, 256 * 1024) == (0, "shared memory")    # over 227 KB: no launch
    assert compile_report.ctas_per_sm(24, 4, 0) == (16, "warps")                     # 64 warps a SM


def test_offline_sm90_compile(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    base = "block_h=16,block_k=16,num_warps=4,num_stages=1"
    for kernel in ("sparse_attention", "sparse_attention_cached"):
        configs = [base, f"{base},split_d=2"] + ([f"{base},split_d=2,dequant=chunks"] if "cached" in kernel else [])
        out = tmp_path / f"{kernel}.csv"
        subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--kernel", kernel, "--preset", "tiny",
                        "--context", "256", "--configs", ";".join(configs), "--csv", str(out)],
                       check=True, env=env, capture_output=True, timeout=300)
        rows = list(csv.DictReader(open(out)))
        fields = [dict(item.split("=") for item in r["config"].split(",")) for r in rows]
        expected = [("1", "tile"), ("2", "tile"), ("2", "chunks")][:len(configs)]
        assert [(f["split_d"], f["dequant"]) for f in fields] == expected
        whole, split = rows[:2]
        assert 0 < int(whole["regs"]) <= 255 and int(whole["warps"]) == 4 and int(whole["smem"]) > 0
        n_whole, n_split = (int(r["grid"].split("x")[0]) for r in rows[:2])
        assert n_split == 2 * n_whole                       # the launcher's grid: two column parts a program
        assert [r["function"] for r in rows[2:]] == ["_sparse_attn_fp8_chunks_kernel"] * (len(rows) - 2)
        assert all(r["grid"] == split["grid"] for r in rows[2:])          # dequant changes the kernel, not the grid


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LDS.128 R4, [R3] ;
        /*0040*/                   LOP3.LUT R8, R4, 0x80008000, RZ, 0xc0, !PT ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0080*/                   FMUL R4, R4, R5 ;
        /*0090*/                   FMUL R6, R6, R5 ;
        /*00a0*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*00b0*/              @!P2 BRA `(.L_x_2) ;
        /*00c0*/                   EXIT ;
"""


def test_main_loop_is_the_first_backward_branch_with_an_mma():
    # .L_x_0 has no MMA, the forward branch to .L_x_2 is not a loop, the longer .L_x_2 loop comes after
    assert compile_report.main_loop(SASS) == ["LDS", "LOP3", "HMMA", "BRA"]
    assert compile_report.main_loop(SASS.replace("HMMA.16816.F32.BF16", "FFMA")) == []


def test_main_loop_markers():
    """hc_pre's few-token sweep is FFMAs: with FFMA among the markers its loop is found."""
    assert compile_report.main_loop(SASS.replace("HMMA.16816.F32.BF16", "FFMA"), markers=("FFMA",)) == [
        "LDS", "LOP3", "FFMA", "BRA"]


def test_offline_sm90_compile_of_hc_pre_few_tokens(tmp_path):
    """hc_pre at one decode token (tiny preset): the default's mixes sweep pads the token to 16 rows on tf32x3
    tensor cores; block_t 1 sums fp32 FMAs, no MMA, in fewer loop instructions and registers
    (bench/results/H100/session32_hc_pre_few_tokens_offline.md)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "hc.csv"
    subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--kernel", "hc_pre", "--preset", "tiny",
                    "--batch", "1", "--gpu", "H100", "--configs", ";block_t=1,dot_precision=ieee", "--csv", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    rows = list(csv.DictReader(open(out)))
    assert [r["function"] for r in rows] == ["_hc_mixes_split_kernel", "_hc_pre_kernel"] * 2
    tf32x3, fma = rows[0], rows[2]
    assert "TF32" in tf32x3["mma"] and fma["mma"] == "" and "FFMA" in fma["opcodes"], (tf32x3, fma)
    assert 0 < int(fma["loop_instr"]) < int(tf32x3["loop_instr"]) and int(fma["regs"]) < int(tf32x3["regs"])


def test_offline_sm90_compile_of_the_fp8_gemv(tmp_path):
    """fp8_linear at one decode row (V4-Flash's wo_b: N 4096, K 8192): the default there, the CUDA-core
    GEMV, whose loop is FFMAs on the weight tile's own layout (one program per 8 rows of W, no split-K),
    and the swapped FP8 tile it replaced (QGMMA; bench/results/H100/session34_fp8_gemv_offline.md)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "fp8.csv"
    tile_config = "gemm=triton,swap_ab=yes,block_m=16,block_n=128,block_k=128,split_k=8"
    subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--kernel", "fp8_linear", "--preset", "flash",
                    "--batch", "1", "--gpu", "H100", "--configs", f";{tile_config}", "--csv", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    gemv, tile = list(csv.DictReader(open(out)))
    assert (gemv["function"], tile["function"]) == ("_fp8_gemv_kernel", "_fp8_linear_kernel")
    assert "E4M3" in tile["mma"] and gemv["mma"] == "" and "FFMA" in gemv["opcodes"], (tile, gemv)
    assert gemv["grid"] == "512" and float(gemv["instr_per_weight"]) > 0, gemv     # 4096 rows of W / 8


def test_offline_sm90_compile_of_the_moe_kernels(tmp_path):
    """The MXFP4 gate/up and down kernels at the tiny preset (decode, 4 tokens), the H200 decode default
    (K split in two: the split path's SwiGLU pass between them), and the routing layout's one program
    before them: all compile, the GEMMs with a main loop, decode a weight in under 8 SASS
    instructions of the loop (the nibble-per-fp16 decode took ~11, bench/results/H200/moe_mxfp4_offline.md;
    the word decode ~6.2), and copy every tile, the packed weights' included, 16 bytes a thread at a time
    (with a row stride Triton knew only as a multiple of 2 the words came 8 bytes at a time: more
    registers, bench/results/H100/session40_moe_word_alignment_offline.md)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "moe.csv"
    subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--kernel", "moe_experts", "--preset", "tiny",
                    "--batch", "4", "--weight-format", "mxfp4", "--csv", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    rows = list(csv.DictReader(open(out)))
    assert [r["function"] for r in rows] == ["_expert_blocks_kernel", "_gate_up_kernel", "_swiglu_splits_kernel",
                                             "_down_kernel"]
    for r in (rows[0], rows[2]):           # the one-program routing layout and the SwiGLU pass: compile, no spills
        assert 0 < int(r["regs"]) <= 255 and int(r["spill_stores"]) == 0, r
    for r in (rows[1], rows[3]):
        assert int(r["loop_instr"]) > 0 and int(r["spill_stores"]) == 0, r
        assert 0 < float(r["instr_per_weight"]) < 8, r
        assert r["loop_copies"].startswith("128-bit x ") and "," not in r["loop_copies"], r


def test_offline_sm90_compile_of_the_moe_w8a8_kernels(tmp_path):
    """W8A8 (--act fp8: the moe_experts_fp8_w8a8 op) at V4-Flash's prefill (T 4096, the H200 prefill
    default's 128 x 128 tiles over 8 warps, K tiles of 128): both kernels' main loops multiply on FP8
    wgmma (QGMMA ... E4M3.E4M3) without spills and convert no weight (no F2FP); W8A16 on the same tiles
    multiplies in bf16 (HGMMA ... BF16) after converting every weight (bench/results/H200/moe_w8a8_offline.md)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    rows = []
    for act in ("fp8", "x"):
        out = tmp_path / f"moe_{act}.csv"
        subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--kernel", "moe_experts", "--batch", "4096",
                        "--weight-format", "fp8", "--act", act, "--configs", "block_k=128,down_block_k=128",
                        "--csv", str(out)], check=True, env=env, capture_output=True, timeout=300)
        rows += list(csv.DictReader(open(out)))
    assert [r["function"] for r in rows] == ["_gate_up_kernel", "_down_kernel"] * 2
    for r in rows[:2]:
        assert r["mma"].startswith("QGMMA.64x128x32.F32.E4M3.E4M3 x ") and int(r["spill_stores"]) == 0, r
        assert "F2FP" not in r["opcodes"], r
    for r in rows[2:]:
        assert r["mma"].startswith("HGMMA.64x128x16.F32.BF16 x ") and "F2FP" in r["opcodes"], r


def test_offline_sm90_compile_of_the_w4a8_swapped_route(tmp_path):
    """W4A8 on w4a8_mma "fp8_swap" at a V4-Flash decode batch (T 64): both launches multiply on FP8 wgmma with
    the 64 weight rows as the first operand and the 16-row block of tokens as the second (QGMMA.64x16x32
    ... E4M3.E4M3), without spills and without converting the weights to another float type (no F2FP:
    e2m1 is placed into e4m3 bits) (bench/results/H100/session32_moe_fp8_swap_offline.md)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "swap.csv"
    subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--kernel", "moe_experts", "--batch", "64",
                    "--gpu", "H100", "--weight-format", "mxfp4", "--act", "fp8", "--configs", "w4a8_mma=fp8_swap",
                    "--csv", str(out)], check=True, env=env, capture_output=True, timeout=300)
    rows = [r for r in csv.DictReader(open(out)) if r["function"] in ("_gate_up_kernel", "_down_kernel")]
    assert [r["function"] for r in rows] == ["_gate_up_kernel", "_down_kernel"]
    for r in rows:
        assert r["mma"].startswith("QGMMA.64x16x32.F32.E4M3.E4M3 x ") and int(r["spill_stores"]) == 0, r
        assert "F2FP" not in r["opcodes"], r
