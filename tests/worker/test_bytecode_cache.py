"""Python's bytecode kept with the compile cache where the image ships none (bytecode_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conveyor import bytecode_cache

ROOT = Path(__file__).resolve().parents[2]


def make_package(where: Path, name: str = "shipless") -> Path:
    package = where / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "sub.py").write_text("VALUE = 2\n")
    return package


def run_python(code: str, site: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")
    }
    environ.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT / "worker")]), **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True, check=True
    )


def pycs(under: Path) -> set[str]:
    return {p.name.split(".")[0] for p in under.rglob("*.pyc")}


def test_an_image_without_bytecode_keeps_it_in_the_cache_for_itself_and_its_children(tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    package = make_package(site)
    # as the GPU machine runs: PYTHONDONTWRITEBYTECODE and a package installed without __pycache__
    code = f"""
        import subprocess, sys
        from pathlib import Path
        from conveyor import bytecode_cache
        directory = bytecode_cache.enable(Path({str(cache)!r}), probe="shipless")
        print(directory)
        import shipless
        subprocess.run([sys.executable, "-c", "import shipless.sub"], check=True)
    """
    out = run_python(code, site, PYTHONDONTWRITEBYTECODE="1")
    directory = Path(out.stdout.strip())
    assert directory.parent == cache / "python"
    assert directory.name.startswith(sys.implementation.cache_tag)
    # this process's import and its child's (which inherited PYTHONPYCACHEPREFIX) are kept there
    assert pycs(directory) >= {"__init__", "sub"}
    assert not (package / "__pycache__").exists()  # the image's own directories stay as they were
    # the next process finds the same directory and the bytecode in it
    again = run_python(code, site, PYTHONDONTWRITEBYTECODE="1")
    assert Path(again.stdout.strip()) == directory


def test_an_image_with_bytecode_is_left_alone(tmp_path: Path) -> None:
    site = tmp_path / "site"
    make_package(site)
    run_python("import shipless", site)  # Python writes the bytecode beside the source
    code = f"""
        import os, sys
        from pathlib import Path
        from conveyor import bytecode_cache
        print(bytecode_cache.enable(Path({str(tmp_path / "cache")!r}), probe="shipless"))
        print(sys.pycache_prefix, os.environ.get("PYTHONPYCACHEPREFIX"))
    """
    assert run_python(code, site).stdout.split() == ["None", "None", "None"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "env", [{"CONVEYOR_BYTECODE_CACHE": "0"}, {"PYTHONPYCACHEPREFIX": "/somewhere/the/user/chose"}]
)
def test_turned_off_or_a_prefix_chosen_already(tmp_path: Path, env: dict[str, str]) -> None:
    site = tmp_path / "site"
    make_package(site)
    code = f"""
        from pathlib import Path
        from conveyor import bytecode_cache
        print(bytecode_cache.enable(Path({str(tmp_path / "cache")!r}), probe="shipless"))
    """
    assert run_python(code, site, PYTHONDONTWRITEBYTECODE="1", **env).stdout.strip() == "None"
    assert not (tmp_path / "cache").exists()


def test_a_cache_that_cannot_be_made_costs_the_compile_not_the_run(tmp_path: Path) -> None:
    site = tmp_path / "site"
    make_package(site)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    code = f"""
        import sys
        from pathlib import Path
        from conveyor import bytecode_cache
        print(bytecode_cache.enable(Path({str(blocked)!r}), probe="shipless"), sys.pycache_prefix)
        import shipless
    """
    assert run_python(code, site, PYTHONDONTWRITEBYTECODE="1").stdout.split() == ["None", "None"]


def test_the_key_follows_the_installed_distributions(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    (one / "torch-2.11.0.dist-info").mkdir(parents=True)
    (two / "torch-2.12.0.dist-info").mkdir(parents=True)
    assert bytecode_cache.key([str(one)]) == bytecode_cache.key([str(one), "", str(tmp_path / "gone")])
    assert bytecode_cache.key([str(one)]) != bytecode_cache.key([str(two)])
    assert bytecode_cache.key([str(one)]).startswith(sys.implementation.cache_tag + "-")


def test_not_installed_or_not_source_is_not_shipped_without_bytecode() -> None:
    assert not bytecode_cache.shipped_without_bytecode("no_such_package_anywhere")
    assert not bytecode_cache.shipped_without_bytecode("sys")  # built in: nothing to compile
