"""Which substitutions exist and which are enabled: discovery of the built-in ones (the decompositions
and every `kernel_substitutions/<op>.py`, each registering itself with the registry on import) and
the `passes` selection ("all" | "none" | "a,b" | [...]). Above the registry, which imports none of
them: the modules discovered here import the registry, never the reverse.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Sequence

from .registry import Substitution, registered

_discovered = False


class PassSelectionError(ValueError):
    """A bad `passes` value. Message: one line naming the bad value and the accepted names."""


def discover() -> None:
    """Import the built-in decompositions and every `dsv4_compile.passes.kernel_substitutions.<op>` module
    (each registers its substitutions on import). Runs once; later calls do nothing.

    Kernel modules are imported only here, at compile time, because importing Triton kernels fixes
    TRITON_INTERPRET for the process (DESIGN.md, Traps).
    """
    global _discovered
    if _discovered:
        return
    _discovered = True
    from . import decompose  # noqa: F401  (registers decompose.*)
    from . import kernel_substitutions as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def substitutions() -> dict[str, Substitution]:
    """Every registered substitution by name (after discovery), sorted by name."""
    discover()
    return dict(sorted(registered().items()))


def accepted_names() -> list[str]:
    """What `passes` accepts: all, none, each family, each full name."""
    subs = substitutions()
    families = sorted({s.family for s in subs.values()} - set(subs))
    return ["all", "none", *families, *subs]


def select(passes: str | Sequence[str] | None) -> list[Substitution]:
    """'all' | 'none' | 'a,b' | ['a', 'b'] -> the enabled substitutions, sorted by name.

    Each token is a full name or a family. Unknown tokens raise PassSelectionError (one line).
    """
    subs = substitutions()
    if passes is None:
        return []
    tokens = [t.strip() for t in passes.split(",")] if isinstance(passes, str) else [str(t).strip() for t in passes]
    tokens = [t for t in tokens if t]
    if tokens == ["none"] or not tokens:
        return []
    if tokens == ["all"]:
        return list(subs.values())
    chosen: dict[str, Substitution] = {}
    for token in tokens:
        hits = [s for s in subs.values() if token in (s.name, s.family)]
        if not hits:
            bad = "'all' and 'none' cannot be combined with other names" if token in ("all", "none") \
                else f"unknown pass {token!r}"
            raise PassSelectionError(f"{bad} in passes={passes!r}; accepted: {', '.join(accepted_names())}")
        chosen.update((s.name, s) for s in hits)
    return [chosen[name] for name in sorted(chosen)]
