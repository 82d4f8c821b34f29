"""Package discovery for the dsv4_compile namespace (the rest of the metadata is in pyproject.toml).

The folders model/, kernels/ and tuning/ live at the repository root but install as dsv4_compile.model,
dsv4_compile.kernels and dsv4_compile.tuning (PyPI has an unrelated top-level `kernels` package).
pyproject.toml cannot find packages under a renamed root, so every package below each folder (a
directory with an __init__.py) is found here: a new kernels/<op>/ is packed without listing it.
"""
from setuptools import find_packages, setup

PACKAGE_DIRS = {"dsv4_compile": "dsv4_compile", "dsv4_compile.model": "model", "dsv4_compile.kernels": "kernels",
                "dsv4_compile.tuning": "tuning"}

setup(package_dir=PACKAGE_DIRS,
      packages=[name for package, folder in PACKAGE_DIRS.items()
                for name in (package, *(f"{package}.{sub}" for sub in find_packages(folder)))])
