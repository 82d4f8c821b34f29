import os
import subprocess
import sys

import pytest


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
    proc = subprocess.run([sys.executable, "-m", "dsv4_compile", "build"], cwd=cwd, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, f"build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    folders = sorted((cwd / "artifacts").iterdir())
    assert len(folders) == 1, folders
    return folders[0], proc
