"""The wheel: `pip wheel --no-deps .` packs every module of the four source folders and no junk.

model/, kernels/ and tuning/ install as dsv4_compile.model, dsv4_compile.kernels and dsv4_compile.tuning
(setup.py finds their packages). The wheel is built from a copy of the checkout into which junk was
planted (bytecode, plots, a study database, notes), so that the test fails if discovery drops a kernel
folder or if package data grows past the presets and the tuned tables.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel: about 15 s

REPO = Path(__file__).resolve().parents[2]
# source folder -> its package path inside the wheel
FOLDERS = {"dsv4_compile": "dsv4_compile", "model": "dsv4_compile/model", "kernels": "dsv4_compile/kernels",
           "tuning": "dsv4_compile/tuning"}
# The only files besides modules: the model presets and the tuned tables.
DATA = ("dsv4_compile/model/presets/*.yaml", "dsv4_compile/tuning/tables/*.yaml")
JUNK = ("kernels/sparse_attention/__pycache__/sparse_attention.cpython-311.pyc", "kernels/NOTES.md",
        "tuning/studies.db", "tuning/tables/H100/extra-history.png", "model/presets/scratch.txt",
        "dsv4_compile/passes/__pycache__/manager.cpython-311.pyc")
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "artifacts", "__pycache__",
                                     ".pytest_cache", "*.whl")


def _sources() -> set[str]:
    """Every module of the checkout, as its path inside the wheel."""
    return {f"{FOLDERS[folder]}/{path.relative_to(REPO / folder).as_posix()}"
            for folder in FOLDERS for path in (REPO / folder).rglob("*.py") if "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> list[str]:
    """The file names in a wheel built from a copy of the checkout with junk planted in it."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    for junk in JUNK:
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (built,) = (tmp / "dist").glob("dsv4_compile-*.whl")
    with zipfile.ZipFile(built) as archive:
        return archive.namelist()


def test_every_kernel_folder_is_packed(wheel):
    ops = sorted(p.parent.name for p in (REPO / "kernels").glob("*/*.py") if p.parent.name != "__pycache__")
    assert {"sparse_attention", "sparse_attention_cached", "compress_kv", "indexer_topk"} <= set(ops)
    for op in ops:
        assert f"dsv4_compile/kernels/{op}/__init__.py" in wheel, f"kernels/{op}/ is not a package in the wheel"


def test_every_module_and_nothing_else(wheel):
    files = {name for name in wheel if ".dist-info/" not in name}
    missing = sorted(_sources() - files)
    assert not missing, f"modules missing from the wheel: {missing}"
    data = sorted(files - _sources())
    stray = [name for name in data if not any(Path(name).match(pattern) for pattern in DATA)]
    assert not stray, f"files in the wheel that are neither modules nor package data: {stray}"
    # the presets and every tuned table of the checkout are there
    expected_data = {f"dsv4_compile/model/presets/{p.name}" for p in (REPO / "model/presets").glob("*.yaml")}
    expected_data |= {f"dsv4_compile/tuning/tables/{p.name}" for p in (REPO / "tuning/tables").glob("*.yaml")}
    assert expected_data and expected_data <= set(data), sorted(expected_data - set(data))
