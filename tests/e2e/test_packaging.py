"""The installed import name: one package `optimem` whose subpackages are the repository's folders."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tree_packages() -> set[str]:
    found = {"optimem"}
    for top in ("estimators", "harness"):
        found |= {"optimem." + ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / top).rglob("__init__.py")}
    return found


def test_pyproject_lists_every_package_of_the_tree():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"optimem": "."}
    assert set(setuptools["packages"]) == _tree_packages()


def test_one_import_name_from_any_directory(tmp_path):
    """`from optimem import estimate` works outside the repository; no top-level `harness`/`estimators`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util as u, optimem; from optimem import estimate, MemoryCallback; "
            "print(u.find_spec('harness') is None, u.find_spec('estimators') is None, callable(estimate))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["True", "True", "True"]


@pytest.mark.slow
def test_a_regular_wheel_holds_only_optimem(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("optimem-*.whl"))).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"optimem"}
    assert "optimem/estimators/configs/tiny-llama.json" in names and "optimem/estimators/gpus.json" in names
    assert "optimem/harness/cli.py" in names and "optimem/__init__.py" in names
