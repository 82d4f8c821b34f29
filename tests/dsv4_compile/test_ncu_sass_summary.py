"""bench/ncu_sass_summary.py on a source page in ncu's CSV form (`--page source --csv --print-source sass`):
memory opcodes counted with their widths, shared-memory wavefronts against ideal, the stall ranking."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import ncu_sass_summary  # noqa: E402

PAGE = '''"Kernel Name","_sparse_attn_fwd_kernel",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","L1 Wavefronts Shared","L1 Wavefronts Shared Ideal"
"0x10","      LDS.U8 R1, [R2+0x14020]","1,200","20,480","327,680","20,480"
"0x20","      LDGSTS.E.64 [R3], desc[UR4][R6.64]","300","10,240","0","0"
"0x30","      LDGDEPBAR","10","10,240","0","0"
"0x40","  @P5 LDG.E.U8 R7, desc[UR60][R8.64+0x4]","500","5,120","0","0"
"0x50","      STS.128 [R2+0x1c00], R48","90","8,192","8,192","8,192"
"0x60","      WARPGROUP.DEPBAR.LE gsb0, 0x0","2,000","10,240","0","0"
'''


def test_summary_counts_widths_conflicts_and_stalls(tmp_path):
    path = tmp_path / "sass.csv"
    path.write_text(PAGE)
    kernel, lines = ncu_sass_summary.read_source_page(str(path))
    assert kernel == "_sparse_attn_fwd_kernel" and len(lines) == 6
    text = "\n".join(ncu_sass_summary.summary(str(path), top=4))
    # widths kept; LDGSTS is not an LDG, LDGDEPBAR is no memory instruction
    assert "| LDS.U8 | 20,480 |" in text and "| LDGSTS.E.64 | 10,240 |" in text and "| LDG.E.U8 | 5,120 |" in text
    assert "LDGDEPBAR |" not in text and "| LDG |" not in text
    # (327,680 + 8,192) wavefronts against (20,480 + 8,192) ideal
    assert "ideal 28,672 (11.71x" in text
    stalls = [line for line in text.splitlines() if line.startswith("| `")]
    assert [s.split("`")[1] for s in stalls] == ["WARPGROUP.DEPBAR.LE gsb0, 0x0", "LDS.U8 R1, [R2+0x14020]",
                                                "@P5 LDG.E.U8 R7, desc[UR60][R8.64+0x4]",
                                                "LDGSTS.E.64 [R3], desc[UR4][R6.64]"]
    assert stalls[0].endswith("| 48.8% | - |") and stalls[1].endswith("| 29.3% | 327,680 / 20,480 |")
