"""The repository's layout: run from its root (as README's `python -m ...` commands are), no folder of ours shadows an
installed package, and the wheel holds the product only."""
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"runtime", "kernels", "quant", "export", "bench", "testing"}


def _from_root(*args: str) -> str:
    """Run `python ARGS` in the repository root, which `-c` and `-m` put first on sys.path."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_top_level_folders_are_not_regular_packages():
    """A top-level folder with an __init__.py would be imported instead of an installed package of its name."""
    regular = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert regular == ["_wanrt"], regular  # the `wanrt` package itself, under a name nothing else can use


def test_installed_kernels_package_wins_over_our_folder():
    """transformers imports a PyPI package called `kernels`; our kernels/ folder must not stand in for it."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("no installed `kernels` package (transformers >= 5 brings it)")
    out = _from_root("-c", "import kernels, wanrt.kernels.attention as a, transformers; "
                     "print(kernels.__file__); print(a.__file__)")
    installed, ours = out.splitlines()
    assert Path(installed).resolve().parent != ROOT / "kernels", installed
    assert Path(ours).resolve() == ROOT / "kernels" / "attention.py"


def test_python_m_wanrt_from_the_root():
    assert _from_root("-m", "wanrt.cli", "--help").startswith("usage: wanrt")


@pytest.mark.slow
def test_wheel_ships_the_product_only(tmp_path):
    # From a copy: setuptools builds in the source tree, and a build/ folder left there would hold stale files
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", "results"))
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("wanrt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[1] for n in names if n.startswith("wanrt/") and n.count("/") > 1}
    assert packages == SHIPPED, packages
    assert not [n for n in names if n.split("/")[0] in ("experiments", "training", "tests")]
    assert "wanrt/runtime/demo_model/config.json" in names
    assert "wanrt/cli.py" in names
