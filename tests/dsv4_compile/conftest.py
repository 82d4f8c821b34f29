import json
import os
import re
import subprocess
import sys
import threading

import pytest

# An engine's graph file, or the temporary it is written atomically as; the rest of a format's folder
# holds weights (the shared file, its index, and before shared_weights.WeightStore every engine's sidecar).
ENGINE_GRAPH = re.compile(r".*\.(onnx|pt2)(\.\d+\.tmp)?")
DISK_PEAK = "export_disk_peak.json"  # beside artifacts/: {format: largest bytes of weights on disk}


def _weight_bytes(partial_folders) -> dict[str, int]:
    """Bytes of weight files per format folder (aoti/, onnx/) of the build folders being written."""
    total: dict[str, int] = {}
    for folder in partial_folders:
        for fmt in ("aoti", "onnx"):
            try:
                entries = list(os.scandir(os.path.join(folder, fmt)))
            except FileNotFoundError:  # not made yet, or the build folder was renamed into place
                continue
            for entry in entries:
                if not ENGINE_GRAPH.fullmatch(entry.name):
                    try:
                        total[fmt] = total.get(fmt, 0) + entry.stat().st_size
                    except FileNotFoundError:  # replaced or removed between the listing and the stat
                        pass
    return total


def _sample_disk_peak(artifacts, proc: subprocess.Popen, peak: dict[str, int]) -> None:
    """Every 20 ms while `proc` runs: the largest weight bytes seen per format in artifacts/'s partial build."""
    while proc.poll() is None:
        partial = [os.path.join(artifacts, d) for d in (os.listdir(artifacts) if os.path.isdir(artifacts) else [])
                   if ".partial-" in d]
        for fmt, size in _weight_bytes(partial).items():
            peak[fmt] = max(peak.get(fmt, 0), size)
        threading.Event().wait(0.02)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(build folder, completed process) of `python -m dsv4_compile build` run with no arguments: the
    one real CPU build (tiny, context 512, aoti + onnx, max_batch 2) the build and generate tests share."""
    # Under pytest-xdist every worker has its own session: the tests that use this fixture are one
    # xdist group (--dist loadgroup), so one worker builds. A second build means the grouping broke.
    claim = tmp_path_factory.getbasetemp().parent / "built-by"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is not None:
        try:
            with open(claim, "x") as f:
                f.write(worker)
        except FileExistsError:
            pytest.fail(f"the `built` fixture was requested in xdist worker {worker} after {claim.read_text()!r}: the "
                        f"tests that use it must be one xdist group run with --dist loadgroup (README's test command)")
    cwd = tmp_path_factory.mktemp("build")
    # the build's disk use is sampled while it writes (test_build.py: one copy of the weights per format)
    popen = subprocess.Popen([sys.executable, "-m", "dsv4_compile", "build"], cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    peak: dict[str, int] = {}
    sampler = threading.Thread(target=_sample_disk_peak, args=(cwd / "artifacts", popen, peak), daemon=True)
    sampler.start()
    try:
        stdout, stderr = popen.communicate(timeout=3600)
    finally:
        popen.kill()
        popen.wait()
    sampler.join()
    (cwd / DISK_PEAK).write_text(json.dumps(peak))
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    assert proc.returncode == 0, f"build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    folders = sorted((cwd / "artifacts").iterdir())
    assert len(folders) == 1, folders
    return folders[0], proc


@pytest.fixture(scope="session")
def export_disk_peak(built) -> dict[str, int]:
    """{format: the most bytes of weights its folder held on disk at once while `built` was written}."""
    return json.loads((built[0].parent.parent / DISK_PEAK).read_text())
