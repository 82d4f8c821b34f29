"""`python -m dsv4_compile inspect PATH`: what a checkpoint folder is, from its headers and config.json
alone (no tensor data is read): layout, shards, the config in short, tensor count, bytes and dtypes,
which layers are hash-routed, and whether it carries MTP weights."""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from ..model.config import ConfigError, ModelConfig
from ..model.release_config import read_release_file, release_fields
from .files import CheckpointError, discover
from .names import canonical

RATIO_NAMES = {0: "window", 4: "CSA", 128: "HCA"}


def describe(path: str | Path, config_path: str | Path | None = None) -> dict:
    """The summary as a dict (see the module docstring). CheckpointError / ConfigError when unreadable."""
    files = discover(path)
    dtypes: Counter = Counter()
    nbytes: Counter = Counter()
    stored = set()
    for name, entries in files.tensors.items():
        stored.add(canonical(name))
        for e in entries:
            dtypes[e.dtype] += 1
            nbytes[e.dtype] += e.nbytes
    hash_tables = sorted(int(m.group(1)) for n in stored if (m := re.fullmatch(r"layers\.(\d+)\.ffn\.gate\.tid2eid", n)))
    summary = {
        "path": str(files.path), "layout": files.layout, "shards": len(files.shards), "model_parallel": files.mp,
        "tensors": len(files.tensors), "bytes": sum(nbytes.values()),
        "dtypes": {k: {"tensors": dtypes[k], "bytes": nbytes[k]} for k in sorted(dtypes)},
        "hash_routed_layers": hash_tables, "mtp_weights": any(n.startswith("mtp.") for n in stored),
    }
    source = Path(config_path) if config_path else files.path / "config.json"
    if config_path or source.is_file():
        data, name = read_release_file(source)
        fields = release_fields(data)
        c = ModelConfig.from_dict(fields.values, name=name)
        kinds = Counter(RATIO_NAMES[r] for r in c.compress_ratios)
        summary["config"] = {
            "name": c.name, "layers": c.n_layers, "dim": c.dim, "heads": f"{c.n_heads} x {c.head_dim}",
            "attention": dict(kinds), "experts": f"{c.n_routed_experts} routed + {c.n_shared_experts} shared, top-{c.n_activated_experts}",
            "hash_layers": c.n_hash_layers, "mtp_layers": c.n_mtp_layers, "vocab": c.vocab_size, "max_seq_len": c.max_seq_len,
            "weight_format": fields.weight_format, "expert_format": fields.expert_format, "scale_format": fields.scale_format,
            "ignored_keys": list(fields.ignored),
        }
    return summary


def format_summary(s: dict, debug: bool = False) -> str:
    gib = s["bytes"] / 2 ** 30
    lines = [f"{s['path']}: {s['layout']} layout, {s['shards']} shard(s)"
             + (f", {s['model_parallel']} model-parallel ranks" if s["model_parallel"] > 1 else ""),
             f"tensors: {s['tensors']}, {s['bytes']:,} bytes ({gib:.2f} GiB)",
             "dtypes: " + ", ".join(f"{k} {v['tensors']} ({v['bytes'] / 2 ** 30:.2f} GiB)" for k, v in s["dtypes"].items()),
             f"hash-routed layers (tid2eid): {', '.join(map(str, s['hash_routed_layers'])) or 'none'}",
             f"MTP weights: {'yes' if s['mtp_weights'] else 'no (MTP will be off)'}"]
    c = s.get("config")
    if c is None:
        lines.append("config: no config.json (pass --config the release's config.json)")
    else:
        attention = ", ".join(f"{v} {k}" for k, v in c["attention"].items())
        lines.append(f"config {c['name']}: {c['layers']} layers ({attention}), dim {c['dim']}, heads {c['heads']}, "
                     f"{c['experts']}, {c['hash_layers']} hash layers, {c['mtp_layers']} MTP, vocab {c['vocab']}, "
                     f"max_seq_len {c['max_seq_len']}")
        lines.append(f"weights: linears {c['weight_format']}, experts {c['expert_format']}, scales {c['scale_format']}")
        if debug:
            lines.append(f"config.json keys ignored (no effect on the math): {', '.join(c['ignored_keys']) or 'none'}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="checkpoint folder (Hugging Face or inference layout)")
    parser.add_argument("--config", default=None, metavar="FILE", help="config.json to use (default: PATH/config.json)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ..arguments import UsageError

    try:
        summary = describe(args.path, args.config)
    except (CheckpointError, ConfigError) as err:
        raise UsageError(str(err)) from None
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary, args.debug))
    return 0
