"""The substitution report: what the pass manager did to every `torch.ops.dsv4.*` node it saw.

Plain dataclasses; `to_dict()` is JSON-serialisable (the build manifest embeds it). Format:

    {
      "format": 1,
      "gpu": "cpu",
      "enabled": ["decompose.fp8_quantize", ...],     # substitutions that were switched on
      "uuid": "3f2a...",                                # the pass manager's uuid() (cache identity)
      "graphs": 2,                                      # graphs covered (compiled now or restored)
      "restored_graphs": 0,                             # of which restored from the report cache
      "unrecorded_graphs": 0,                           # served by the FX graph cache, no record found:
                                                        #   the report is incomplete when this is > 0
      "ops": {
        "dsv4.fp8_quantize": {
          "replaced": 2, "left_alone": 1,
          "replacements": [{"substitution": "decompose.fp8_quantize", "version": "1",
                            "config": {}, "count": 2}],
          "left": [{"graph": 0, "node": "fp8_quantize_1", "args": "f32[2, 7, 64], 64, True",
                    "reason": "..."}]
        }, ...
      },
      "nodes": [ {"graph": 0, "node": "fp8_quantize", "op": "dsv4.fp8_quantize",
                  "args": "f32[2, 7, 64], 64, True", "substitution": "decompose.fp8_quantize",
                  "version": "1", "config": {}, "reason": null, "via": null}, ... ]
    }

`via` names the substitution whose replacement introduced the node (a dsv4 op called inside another
op's replacement, e.g. fp8_quantize inside decompose.compress_kv); null for the model's own nodes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_FORMAT = 1


@dataclass
class NodeRecord:
    """One dsv4 node: replaced (substitution and config set) or left alone (reason set)."""

    graph: int                     # index of the graph among those the manager processed
    node: str                      # the FX node's name in that graph
    op: str                        # "dsv4.sparse_attention"
    args: str                      # argument summary: "f32[1, 9, 4, 64], ..., 0.125"
    substitution: str | None = None
    version: str | None = None
    config: dict[str, Any] | None = None
    reason: str | None = None
    via: str | None = None

    @property
    def replaced(self) -> bool:
        return self.substitution is not None


@dataclass
class SubstitutionReport:
    gpu: str
    enabled: list[str]
    uuid: str = ""
    graphs: int = 0
    restored_graphs: int = 0
    unrecorded_graphs: int = 0
    nodes: list[NodeRecord] = field(default_factory=list)

    # ---- queries ------------------------------------------------------------------------------

    def replaced(self, op: str | None = None, substitution: str | None = None) -> int:
        """Count of replaced nodes, optionally for one op ("dsv4.x") and/or one substitution."""
        return sum(1 for r in self.nodes if r.replaced and op in (None, r.op) and substitution in (None, r.substitution))

    def left_alone(self, op: str | None = None) -> list[NodeRecord]:
        return [r for r in self.nodes if not r.replaced and op in (None, r.op)]

    @property
    def complete(self) -> bool:
        """False when some graph came from the FX graph cache without a saved record."""
        return self.unrecorded_graphs == 0

    # ---- serialisation ------------------------------------------------------------------------

    def ops(self) -> dict[str, dict[str, Any]]:
        """Per-op summary: replaced / left-alone counts, replacements grouped by (name, config)."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.nodes:
            entry = out.setdefault(r.op, {"replaced": 0, "left_alone": 0, "replacements": [], "left": []})
            if r.replaced:
                entry["replaced"] += 1
                for rep in entry["replacements"]:
                    if (rep["substitution"], rep["version"], rep["config"]) == (r.substitution, r.version, r.config):
                        rep["count"] += 1
                        break
                else:
                    entry["replacements"].append({"substitution": r.substitution, "version": r.version,
                                                  "config": r.config, "count": 1})
            else:
                entry["left_alone"] += 1
                entry["left"].append({"graph": r.graph, "node": r.node, "args": r.args, "reason": r.reason})
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "gpu": self.gpu, "enabled": list(self.enabled), "uuid": self.uuid,
                "graphs": self.graphs, "restored_graphs": self.restored_graphs,
                "unrecorded_graphs": self.unrecorded_graphs, "ops": self.ops(),
                "nodes": [asdict(r) for r in self.nodes]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    def table(self) -> str:
        """A short human-readable table: one line per op, then one line per left-alone reason."""
        lines = [f"{'op':<32} {'replaced':>8} {'left':>5}  by"]
        for op, e in self.ops().items():
            by = ", ".join(f"{rep['substitution']} x{rep['count']}" for rep in e["replacements"]) or "-"
            lines.append(f"{op:<32} {e['replaced']:>8} {e['left_alone']:>5}  {by}")
            for reason in sorted({item["reason"] for item in e["left"]}):
                lines.append(f"{'':<32} left alone: {reason}")
        if self.unrecorded_graphs:
            lines.append(f"({self.unrecorded_graphs} graph(s) came from the FX graph cache without a record: incomplete)")
        return "\n".join(lines)
