import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(build folder, completed process) of `python -m dsv4_compile build` run with no arguments: the
    one real CPU build (tiny, context 512, aoti + onnx, max_batch 2) the build and generate tests share."""
    cwd = tmp_path_factory.mktemp("build")
    proc = subprocess.run([sys.executable, "-m", "dsv4_compile", "build"], cwd=cwd, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, f"build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    folders = sorted((cwd / "artifacts").iterdir())
    assert len(folders) == 1, folders
    return folders[0], proc
