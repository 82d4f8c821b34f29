"""The process's libstdc++ and AOTInductor packages: when loading a .pt2 here would crash, and the fix.

AOTInductor compiles a package's C++ wrapper against the system libstdc++. A Python whose process
mapped an older one first (a bundled runtime) crashes in that wrapper, and on the lent GPU image a
CUDA .pt2 load hangs or segfaults even when the mapped file is the system's unless it is in
LD_PRELOAD (bench/results/H100/BUILD.md, bench/results/H200/session7_gpu_runs.md). Every loader of a
.pt2 goes through `load_aoti_package`, which refuses with the one-line fix instead, and returns the
package as an `InferencePackage`, called under torch.inference_mode.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess

import torch

from .manifest import ArtifactError

_GLIBCXX = re.compile(rb"GLIBCXX_3\.4(?:\.(\d+))?\b")


def _glibcxx_level(path: str) -> int:
    """Highest GLIBCXX_3.4.N symbol version a libstdc++ defines (-1 if unreadable)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return -1
    return max((int(m.group(1) or 0) for m in _GLIBCXX.finditer(data)), default=-1)


def _mapped_libstdcxx() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if "libstdc++.so" in line and len(line.split(None, 5)) == 6}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def system_libstdcxx() -> str | None:
    """The libstdc++.so.6 `ldconfig -p` lists for this architecture, or None."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        for ldconfig in ("/sbin/ldconfig", "/usr/sbin/ldconfig"):
            try:
                out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
                break
            except (OSError, subprocess.SubprocessError):
                continue
        else:
            return None
    arch = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(platform.machine(), "")
    found = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("libstdc++.so.6 ") and "=>" in line:
            flags, path = line.split("(", 1)[1].split(")", 1)[0], line.rsplit("=>", 1)[1].strip()
            found.append((arch in flags, path))
    found.sort(key=lambda item: not item[0])
    return found[0][1] if found else None


def libstdcxx_problem() -> str | None:
    """None when this process's libstdc++ is the system's (or newer), else the one-line fix.

    Compares the mapped file's real path and, if different, its highest GLIBCXX version against the
    system library's. A CUDA .pt2 can crash even when the mapped library IS the system's (seen on a GPU
    machine, bench/results/H100/BUILD.md), which this file check cannot see: `cuda_preload_problem`
    covers that case.
    """
    system = system_libstdcxx()
    if system is None:
        return None
    system_real = os.path.realpath(system)
    for mapped in _mapped_libstdcxx():
        if os.path.realpath(mapped) == system_real:
            continue
        if _glibcxx_level(mapped) < _glibcxx_level(system_real):
            return (f"this process loaded an older libstdc++ ({mapped}) than the system's ({system}); loading an "
                    f"AOTInductor package would crash: start Python with LD_PRELOAD={system}")
    return None


def _preloaded(system: str) -> bool:
    real = os.path.realpath(system)
    return any(os.path.realpath(p) == real for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if p)


def cuda_preload_problem() -> str | None:
    """CUDA packages: None when the system libstdc++ is in LD_PRELOAD (or there is none), else the fix.

    A CUDA .pt2 load can hang or crash without LD_PRELOAD even when the mapped libstdc++ is the system's
    file (bench/results/H100/BUILD.md); no file check sees that, and a probe process would hang too, so
    CUDA packages are loaded only with the system libstdc++ preloaded.
    """
    system = system_libstdcxx()
    if system is None or _preloaded(system):
        return None
    return (f"loading a CUDA AOTInductor package needs the system libstdc++ preloaded (without it the lent GPU "
            f"image crashes or hangs in the package's C++ wrapper): start Python with LD_PRELOAD={system}")


def libstdcxx_preload(cuda: bool = False) -> str | None:
    """The LD_PRELOAD value a child Python process needs for .pt2 packages (None when not needed).
    CUDA builds always get the system libstdc++ preloaded (harmless, and needed on the lent GPU image)."""
    system = system_libstdcxx()
    if system is None or _preloaded(system):
        return None
    return system if (cuda or libstdcxx_problem()) else None



def child_env(cuda: bool = False) -> dict[str, str]:
    """This process's environment for a child Python that loads .pt2 packages: `libstdcxx_preload` put
    in front of any LD_PRELOAD already set."""
    env = dict(os.environ)
    preload = libstdcxx_preload(cuda=cuda)
    if preload:
        env["LD_PRELOAD"] = " ".join(p for p in (preload, env.get("LD_PRELOAD", "")) if p)
    return env

def aoti_load_problem(cuda: bool) -> str | None:
    """None when this process can load a (CUDA if `cuda`) .pt2, else the one-line fix."""
    return libstdcxx_problem() or (cuda_preload_problem() if cuda else None)


class InferencePackage:
    """A loaded AOTInductor package whose every call runs under torch.inference_mode, so its outputs
    are inference tensors. Why: torch registers Python autograd kernels on the functional collectives,
    and a package calls them through the dispatcher; outside inference mode each collective hands its
    tensors to Python, and a gloo worker thread freeing such a tensor with its Work waits for the GIL
    the next engine call holds: a deadlock (docs/DESIGN.md, traps)."""

    def __init__(self, package):
        self.package = package

    def __call__(self, *args):
        with torch.inference_mode():
            return self.package(*args)


def load_aoti_package(path: str, cuda: bool, single_threaded: bool = False, weights=None) -> InferencePackage:
    """torch._inductor.aoti_load_package(path) as an InferencePackage, or ArtifactError naming the
    LD_PRELOAD to set where the load would crash this process. `single_threaded`: without the package's
    own run bookkeeping (a pool of runners behind CUDA events), which a caller driving it from one thread
    under CUDA graph capture needs: its cudaEventQuery is illegal while a stream captures and
    invalidates the capture. `weights`: the build's shared_weights.AotiWeights, for a package compiled
    without its constants (they are loaded before it can run)."""
    problem = aoti_load_problem(cuda)
    if problem:
        raise ArtifactError(problem)
    package = torch._inductor.aoti_load_package(path, run_single_threaded=single_threaded)
    if weights is not None:
        weights.load_into(package, path)
    return InferencePackage(package)
