"""KV-cache accounting from the real cache layout, and the `kv-cache` command.

Every byte counted here is the size of a buffer of `model.kv_cache.KVCache`, built on the meta
device (nothing is allocated) with max_seq_len = the context length. Nothing is re-derived from a
formula: the layout lives in `model/kv_layout.py` and the buffers in `model/kv_cache.py`.

Context lengths follow the one rule of `model/context.py` (multiples of 128 up to 1m, as for `build`
and `tune`); any other is refused (exit 2).

Seed figures (DESIGN.md section 2): the seed article's V4-Pro and V3.2 KV-cache sizes, labelled MB,
shown only for the V4-Pro cache shape at batch 1 and at the contexts the article gives. The V3.2
column is reproduced exactly by 61 layers x 772 B per token (512 FP8 + 64 BF16 rope dims + a 132 B
FP8 indexer key) in MiB, so the article's "MB" are MiB and the ratio ours/seed uses our MiB.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from .arguments import add_config_argument, contexts_arg, positive_int_arg
from .model.config import INDEXER_CACHE_FORMATS, ModelConfig
from .model.context import check_context, format_context
from .model.kv_cache import KVCache
from .model.kv_layout import FP8_BLOCK

MB, MIB = 10**6, 2**20
KINDS = ("window", "csa", "hca")  # keys of KVCache.nbytes_by_kind: layer types
KIND_LABELS = {"window": "window-only", "csa": "CSA", "hca": "HCA"}
PARTS = ("window", "compressed", "indexer", "compressor_state")
PART_LABELS = {"window": "window ring", "compressed": "compressed entries", "indexer": "indexer keys",
               "compressor_state": "compressor state"}
_RATIO_KIND = {0: "window", 4: "csa", 128: "hca"}

# The seed article's figures (DESIGN.md section 2), labelled "MB" there; tokens -> size.
SEED_V4_PRO = {8192: 55, 32768: 159, 131072: 576, 1048576: 4464}
SEED_V3_2 = {8192: 368, 32768: 1472, 131072: 5887, 1048576: 47092}
# The fields that fix the cache's shape: a config equal to V4-Pro on these has V4-Pro's cache.
_CACHE_FIELDS = ("head_dim", "rope_head_dim", "window_size", "compress_ratios", "n_mtp_layers", "index_head_dim")


def has_seed_shape(config: ModelConfig) -> bool:
    pro = ModelConfig.from_preset("pro")
    return all(getattr(config, f) == getattr(pro, f) for f in _CACHE_FIELDS)


@dataclass(frozen=True)
class ContextReport:
    """Bytes of one cache (all layers, `batch` sequences) for one context length."""

    config_name: str
    tokens: int                        # max_seq_len of the cache
    batch: int
    indexer_format: str
    window: int                        # raw tokens per layer's window ring
    entry_bytes: int                   # one main entry (window and compressed alike)
    payload_bytes: int                 # its FP8 + BF16 values alone (no scale bytes, no pad)
    index_entry_bytes: int             # one indexer key
    layers: dict[str, int]             # layer type -> count (MTP blocks count as window-only)
    parts: dict[str, dict[str, int]]   # layer type -> part -> bytes
    seed_v4_pro: int | None = None
    seed_v3_2: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(sum(p.values()) for p in self.parts.values())

    def kind_bytes(self, kind: str) -> int:
        return sum(self.parts[kind].values())

    def part_bytes(self, part: str) -> int:
        return sum(p[part] for p in self.parts.values())

    @property
    def compressed_entries(self) -> int:
        """Compressed entries of all layers and sequences (from the buffers' bytes)."""
        return self.part_bytes("compressed") // self.entry_bytes

    @property
    def ratio_to_seed(self) -> float | None:
        return None if self.seed_v4_pro is None else self.total_bytes / MIB / self.seed_v4_pro

    def reconciliation(self) -> list[tuple[str, int]]:
        """Steps from the seed's apparent accounting to ours; the bytes sum to total_bytes."""
        n = self.compressed_entries
        return [
            (f"compressed entries x {self.payload_bytes} B (FP8 + BF16 values only)", n * self.payload_bytes),
            (f"+ scale and pad bytes ({self.entry_bytes - self.payload_bytes} B per compressed entry)",
             n * (self.entry_bytes - self.payload_bytes)),
            (f"+ window rings ({sum(self.layers.values())} layers x {self.window} tokens x {self.entry_bytes} B"
             + (f" x batch {self.batch}" if self.batch > 1 else "") + ")", self.part_bytes("window")),
            (f"+ indexer keys ({self.index_entry_bytes} B, {self.indexer_format})", self.part_bytes("indexer")),
            ("+ compressor state (fp32)", self.part_bytes("compressor_state")),
        ]

    def to_dict(self) -> dict:
        return {
            "context": format_context(self.tokens), "max_seq_len": self.tokens,
            "layers": dict(self.layers),
            "bytes": {kind: dict(parts) | {"total": self.kind_bytes(kind)} for kind, parts in self.parts.items()},
            "bytes_by_part": {part: self.part_bytes(part) for part in PARTS},
            "total_bytes": self.total_bytes, "total_MB": self.total_bytes / MB, "total_MiB": self.total_bytes / MIB,
            "seed": None if self.seed_v4_pro is None else {
                "v4_pro": self.seed_v4_pro, "v3_2": self.seed_v3_2, "unit": "MiB (labelled MB in the article)",
                "ours_MiB_over_seed": self.ratio_to_seed,
                "reconciliation_bytes": [{"step": s, "bytes": b} for s, b in self.reconciliation()],
            },
            "notes": list(self.notes),
        }


def context_report(config: ModelConfig, tokens: int, batch: int = 1, indexer_format: str | None = None) -> ContextReport:
    """Build the cache on the meta device with max_seq_len = `tokens` (a context bucket: ContextError
    otherwise) and count it."""
    notes = []
    max_seq_len = check_context(tokens)
    if max_seq_len > config.max_seq_len:
        notes.append(f"context {format_context(tokens)}: cache length {max_seq_len} exceeds the config's max_seq_len "
                     f"{config.max_seq_len} (counted anyway)")
    cache = KVCache(config, batch, max_seq_len, device="meta", indexer_format=indexer_format)
    counted = cache.nbytes_by_kind()
    layers = {kind: 0 for kind in KINDS}
    for layer in cache.layers:
        layers[_RATIO_KIND[layer.ratio]] += 1
    parts = {kind: {part: counted.get(f"{kind}.{part}", 0) for part in PARTS} for kind in KINDS if layers[kind]}
    layers = {kind: n for kind, n in layers.items() if n}
    entry_bytes = cache.layers[0].main.shape[-1]
    index_entry_bytes = next((l.index.shape[-1] for l in cache.layers if l.index is not None), 0)
    seeded = batch == 1 and tokens in SEED_V4_PRO and has_seed_shape(config)
    return ContextReport(
        config_name=config.name, tokens=max_seq_len, batch=batch,
        indexer_format=cache.indexer_format, window=config.window_size, entry_bytes=entry_bytes,
        payload_bytes=config.nope_head_dim + 2 * config.rope_head_dim, index_entry_bytes=index_entry_bytes,
        layers=layers, parts=parts,
        seed_v4_pro=SEED_V4_PRO[tokens] if seeded else None, seed_v3_2=SEED_V3_2[tokens] if seeded else None,
        notes=tuple(notes))


# ---- text and JSON ------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    """Columns right-aligned except the first `left`."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _mib(n: int) -> str:
    return f"{n / MIB:.2f}"


def format_text(config: ModelConfig, reports: list[ContextReport]) -> str:
    r0 = reports[0]
    nope, rope = config.nope_head_dim, config.rope_head_dim
    pad = r0.entry_bytes - r0.payload_bytes - nope // FP8_BLOCK
    main = [(n, KIND_LABELS[_RATIO_KIND[r]]) for r in (0, 4, 128) if (n := config.compress_ratios.count(r))]
    layer_desc = f"{config.n_layers} main ({', '.join(f'{n} {label}' for n, label in main)})"
    if config.n_mtp_layers:
        layer_desc += f" + {config.n_mtp_layers} MTP (window-only)"
    out = [
        f"KV cache, config {config.name}, batch {r0.batch}: {sum(r0.layers.values())} attention layers = {layer_desc}",
        f"main entry {r0.entry_bytes} B = {nope} FP8 + {2 * rope} BF16 rope ({rope} dims) + {nope // FP8_BLOCK} scale"
        f" + {pad} pad; "
        + (f"indexer key {r0.index_entry_bytes} B ({r0.indexer_format}); " if r0.index_entry_bytes else "no indexer; ")
        + f"window {r0.window} tokens per layer",
        "Every figure is the size of a real buffer of KVCache built on the meta device. MB = 10^6 B, MiB = 2^20 B.",
        "",
        "Bytes by layer type and part (MiB):",
    ]
    rows = []
    for r in reports:
        ctx = format_context(r.tokens)
        for kind in r.parts:
            rows.append([ctx, KIND_LABELS[kind], str(r.layers[kind]),
                         *(_mib(r.parts[kind][p]) if r.parts[kind][p] else "-" for p in PARTS), _mib(r.kind_bytes(kind))])
        rows.append([ctx, "all", str(sum(r.layers.values())), *(_mib(r.part_bytes(p)) for p in PARTS), _mib(r.total_bytes)])
    out += _table(["context", "layers", "n", *(PART_LABELS[p] for p in PARTS), "total"], rows)

    seeded = any(r.seed_v4_pro is not None for r in reports)
    out += ["", "Totals:"]
    header = ["context", "max_seq_len", "bytes", "MB", "MiB"]
    if seeded:
        header += ["seed V4-Pro", "ours/seed", "seed V3.2"]
    rows = []
    for r in reports:
        row = [format_context(r.tokens), str(r.tokens), f"{r.total_bytes:,}", f"{r.total_bytes / MB:.1f}",
               f"{r.total_bytes / MIB:.1f}"]
        if seeded:
            row += ["-", "-", "-"] if r.seed_v4_pro is None else [
                str(r.seed_v4_pro), f"{r.ratio_to_seed:.3f}", str(r.seed_v3_2)]
        rows.append(row)
    out += _table(header, rows, left=1)

    if seeded:
        out += ["", "Seed figures: the article's V4-Pro and V3.2 columns, labelled MB there. Its V3.2 column is exactly",
                "61 layers x 772 B per token (512 FP8 + 64 BF16 rope dims + 132 B FP8 indexer key) in MiB, so its MB",
                "are MiB and ours/seed divides our MiB by them.",
                "", "From the seed's apparent accounting to ours (MiB):"]
        seeded_reports = [r for r in reports if r.seed_v4_pro is not None]
        steps = [label for label, _ in seeded_reports[0].reconciliation()]
        rows = []
        for r in seeded_reports:
            values = [b for _, b in r.reconciliation()]
            rows.append([format_context(r.tokens), *(_mib(v) for v in values), _mib(r.total_bytes),
                         str(r.seed_v4_pro), f"{r.seed_v4_pro - values[0] / MIB:+.1f}"])
        short = [f"entries x {r0.payload_bytes} B", "+ scale/pad", "+ window", "+ indexer", "+ compressor", "= ours",
                 "seed", f"seed - entries x {r0.payload_bytes} B"]
        out += _table(["context", *short], rows, left=1)
        out += [f"  {label}" for label in steps]
        out += [f"The seed's figures grow like compressed entries x {r0.payload_bytes} B alone (no scale bytes, no indexer keys),",
                "but below 1m they sit a near-constant amount above that (last column), about the size of the fixed",
                "window rings + compressor state; no consistent layout reproduces all four (README, section KV cache)."]

    notes = [n for r in reports for n in r.notes]
    if notes:
        out += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(out)


def to_json(config: ModelConfig, reports: list[ContextReport]) -> dict:
    r0 = reports[0]
    return {
        "config": config.name, "batch": r0.batch, "indexer_format": r0.indexer_format,
        "entry_bytes": {"main": r0.entry_bytes, "main_payload": r0.payload_bytes, "indexer": r0.index_entry_bytes},
        "window": r0.window, "layers": dict(r0.layers), "units": {"MB": MB, "MiB": MIB},
        "contexts": [r.to_dict() for r in reports],
    }


# ---- the command ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, default="pro")
    parser.add_argument("--context", type=contexts_arg, default="8k,32k,128k,1m", metavar="LIST",
                        help="comma-separated context lengths, suffix k = 1024, m = 1048576: multiples of 128 "
                             "up to 1m (default: 8k,32k,128k,1m)")
    parser.add_argument("--batch", type=positive_int_arg, default=1, metavar="N", help="sequences (default: 1)")
    parser.add_argument("--indexer-format", choices=INDEXER_CACHE_FORMATS, default=None,
                        help="indexer key format (default: the config's indexer_cache_format)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    config = ModelConfig.load(args.config)
    reports = [context_report(config, tokens, args.batch, args.indexer_format) for tokens in args.context]
    if args.json:
        print(json.dumps(to_json(config, reports), indent=2))
    else:
        print(format_text(config, reports))
    return 0
