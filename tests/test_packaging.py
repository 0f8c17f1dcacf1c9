"""The wheel carries every module: the package-dir mapping silently drops unlisted subpackages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> its import path inside the wheel (DESIGN.md section 2)
MAPPING = {"moe_runtime": "moe_runtime", "kernels": "moe_runtime/kernels", "cluster": "moe_runtime/cluster"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )
    (path,) = out.glob("moe_runtime-*.whl")
    return zipfile.ZipFile(path)


def test_every_source_file_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    expected = {
        f"{target}/{path.relative_to(ROOT / src).as_posix()}"
        for src, target in MAPPING.items()
        for path in (ROOT / src).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected, "no sources found"
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel (add the subpackage to pyproject.toml): {missing}"


def test_data_files_are_in_the_wheel(wheel):
    names = set(wheel.namelist())
    assets = ROOT / "moe_runtime" / "presets" / "assets"
    expected = {f"moe_runtime/presets/assets/{p.relative_to(assets).as_posix()}" for p in assets.rglob("*") if p.is_file()}
    assert expected and not expected - names, sorted(expected - names)


def test_native_kernel_sources_are_in_the_wheel(wheel):
    """kernels/cpu compiles its C++ sources and headers at first use, so the wheel must carry them."""
    names = set(wheel.namelist())
    folder = ROOT / "kernels" / "cpu"
    expected = {f"moe_runtime/kernels/cpu/{p.name}" for p in [*folder.glob("*.cpp"), *folder.glob("*.h")]}
    assert any(n.endswith(".h") for n in expected) and not expected - names, sorted(expected - names)


def test_no_generic_top_level_names(wheel):
    top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"moe_runtime"}


def test_console_script(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "moe-runtime = moe_runtime.cli:main" in wheel.read(entry).decode()
