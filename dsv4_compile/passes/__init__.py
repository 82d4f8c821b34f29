"""Graph passes: substitute `torch.ops.dsv4.*` nodes for kernels or plain code inside torch.compile.

- registry.py: `Substitution` (what replaces which op, where, with which config), `register`, the
  `ConfigSource` hook for tuned tables.
- selection.py: discovery of the built-in substitutions, `select("all" | "none" | "a,b" | [...])`.
- manager.py: `PassManager`, the post-grad `CustomGraphPass` that applies them, with a uuid().
- report.py: `SubstitutionReport`, the JSON-serialisable record of every dsv4 node's fate.
- decompose.py: the built-in "decompose.<op>" substitutions and `decomposition_table()`, their plain code.
- kernel_substitutions/: one module per op family registering "<op>.triton" (kernels/<op>/).

Export takes the same choices per call: `PassManager.decomposition_table()` for run_decompositions.

`dsv4_compile.compile(model, gpu=..., passes=...)` wires these into torch.compile.
"""
from .registry import ConfigSource, Substitution, Target, no_tables, register, unregister
from .selection import PassSelectionError, accepted_names, select, substitutions
from .report import NodeRecord, SubstitutionReport


def __getattr__(name: str):
    # PassManager subclasses Inductor's CustomGraphPass: importing torch._inductor costs seconds, so
    # `import dsv4_compile` (the CLI, the loader) does not pay for it until a compile needs it.
    if name == "PassManager":
        from .manager import PassManager

        return PassManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def decomposition_table(loops: bool = False):
    """{torch.ops.dsv4.<op>.default: plain function}: for ExportedProgram.run_decompositions (loops: the
    CPU engines' Sinkhorn rounds as one while_loop node, decompose.decomposition_table)."""
    from .decompose import decomposition_table as table

    return table(loops=loops)


__all__ = ["ConfigSource", "NodeRecord", "PassManager", "PassSelectionError", "Substitution", "SubstitutionReport",
           "Target", "accepted_names", "decomposition_table", "no_tables", "register", "select", "substitutions",
           "unregister"]
