"""Nothing in this repository is imported under a top-level name an installed distribution owns (DESIGN.md 2).

transformers >= 5.25 imports Hugging Face's `kernels` package; a `kernels` module of ours found first
(the repository root's kernels/ folder under `python -m pytest`, or a bench/kernels.py next to a script)
breaks every import of transformers. The folders that can stand first on sys.path are the ones checked:
pytest's `pythonpath` (pyproject.toml), bench/ (a script's own folder is sys.path[0]) and the test folders.
The repository root itself never may: `make test` runs the venv's pytest script, and tests/conftest.py
stops a `python -m pytest` run with instructions instead of letting transformers fail deep inside.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib.machinery import PathFinder
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = [ROOT / "bench", ROOT / "tests"] + sorted(
    d for d in (ROOT / "tests").rglob("*") if d.is_dir() and "__pycache__" not in d.parts
)
OWN = "moe-runtime"


def ours(origin: str | None) -> bool:
    """Whether a module spec's origin is a file of this repository (a venv inside it does not count)."""
    if origin in (None, "None", "namespace"):
        return False
    path = Path(origin).resolve()
    return path.is_relative_to(ROOT) and "site-packages" not in path.parts


def shadowed_names(folder: Path) -> list[str]:
    """Top-level names that `folder`, first on sys.path, would import from itself although an installed
    distribution other than ours owns them. Namespace-package folders (no __init__.py) are not counted:
    a regular package later on sys.path wins over them."""
    owners = packages_distributions()  # import name -> [distribution, ...]
    found = []
    for entry in folder.iterdir():
        name = entry.name.split(".")[0]
        if name not in owners or owners[name] == [OWN]:
            continue
        spec = PathFinder.find_spec(name, [str(folder)])
        if spec is not None and spec.origin not in (None, "namespace"):
            found.append(f"{name} ({entry.name} shadows {', '.join(owners[name])})")
    return sorted(set(found))


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda d: str(d.relative_to(ROOT)))
def test_folder_shadows_no_installed_distribution(folder):
    assert shadowed_names(folder) == [], "rename the module: a script or test would import it instead"


def test_pythonpath_folders_are_checked(pytestconfig):
    assert {Path(p).resolve() for p in pytestconfig.getini("pythonpath")} <= set(FOLDERS)


def test_shadow_check_sees_a_kernels_module(tmp_path):
    """The check above is not vacuous: a kernels.py in a folder is found (when HF `kernels` is installed)."""
    if "kernels" not in packages_distributions():
        pytest.skip("Hugging Face's kernels package is not installed here")
    (tmp_path / "kernels.py").write_text("")
    assert shadowed_names(tmp_path) == [f"kernels (kernels.py shadows {', '.join(packages_distributions()['kernels'])})"]


def test_this_process_imports_the_installed_kernels():
    """In the suite's own process (started from the repository root), `kernels` is not ours."""
    spec = importlib.util.find_spec("kernels")
    assert not ours(None if spec is None else spec.origin), spec.origin
    assert str(ROOT) not in [str(Path(p).resolve()) for p in sys.path if p], "the repository root is on sys.path"


@pytest.mark.parametrize("folder", ["bench", "tests"])
def test_scripts_in_folder_import_the_installed_kernels(folder):
    """A script run from bench/ or tests/ (its folder first on sys.path) gets the installed `kernels`."""
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT / folder, capture_output=True, text=True, check=True)
    assert not ours(out.stdout.strip()), out.stdout
