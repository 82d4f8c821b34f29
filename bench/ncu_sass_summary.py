"""Summary of an Nsight Compute source page (SASS lines with their counters) as markdown: executed
memory instructions by opcode (with widths: LDG.E.U8 vs LDG.E.64 tells a byte gather from a vector
one), shared-memory wavefronts against ncu's ideal (bank conflicts), and the lines with the most
warp-stall samples.

    ncu -i report.ncu-rep --page source --csv --print-source sass > sass.csv
    python bench/ncu_sass_summary.py sass.csv [more.csv ...] [--top 12]
"""
from __future__ import annotations

import argparse
import collections
import csv
import re
import sys

MEMORY_OPCODE = re.compile(r"\b((?:LDGSTS|LDSM|LDG|STG|LDS|STS|LDL|STL|UTMALDG)(?:\.[A-Z0-9]+)*)\b")
STALLS = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
SHARED, SHARED_IDEAL = "L1 Wavefronts Shared", "L1 Wavefronts Shared Ideal"


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_source_page(path: str) -> tuple[str, list[dict]]:
    """(kernel name, one dict per SASS line) of `ncu --page source --csv --print-source sass` output."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header_at = next(i for i, r in enumerate(rows) if "Source" in r and "Address" in r)
    kernel = next((r[1] for r in rows[:header_at] if r and r[0] == "Kernel Name"), "?")
    header = rows[header_at]
    return kernel, [dict(zip(header, r)) for r in rows[header_at + 1:] if len(r) == len(header)]


def summary(path: str, top: int = 12) -> list[str]:
    kernel, lines = read_source_page(path)
    executed = collections.Counter()
    for line in lines:
        m = MEMORY_OPCODE.search(line["Source"])
        if m:
            executed[m.group(1)] += _number(line.get(EXECUTED, "0"))
    samples = sum(_number(line.get(STALLS, "0")) for line in lines) or 1.0
    shared = sum(_number(line.get(SHARED, "0")) for line in lines)
    ideal = sum(_number(line.get(SHARED_IDEAL, "0")) for line in lines)
    out = [f"### {kernel} ({path})", "",
           f"Shared-memory wavefronts {shared:,.0f}, ideal {ideal:,.0f} "
           f"({shared / ideal if ideal else float('nan'):.2f}x: bank conflicts past 1x).", "",
           "| memory opcode | executed (warp instructions) |", "|---|---|"]
    out += [f"| {op} | {n:,.0f} |" for op, n in executed.most_common(top)]
    out += ["", "| SASS line | stall samples | shared wavefronts / ideal |", "|---|---|---|"]
    for line in sorted(lines, key=lambda r: -_number(r.get(STALLS, "0")))[:top]:
        sh, sh_ideal = _number(line.get(SHARED, "0")), _number(line.get(SHARED_IDEAL, "0"))
        ratio = f"{sh:,.0f} / {sh_ideal:,.0f}" if sh else "-"
        out.append(f"| `{' '.join(line['Source'].split())}` | {_number(line[STALLS]) / samples:.1%} | {ratio} |")
    return out + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="CSV files of ncu's source page")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    args = parser.parse_args(argv)
    for path in args.paths:
        print("\n".join(summary(path, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
