"""A built wheel carries what `demo`, `launch` and `bench` read, and finds it without a checkout.

The wheel is built from a copy of the working tree (what git tracks or would track), unpacked into a
directory of its own and imported from another working directory with only that directory on the path.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lampretrain import resources

REPO = Path(__file__).resolve().parent.parent


def test_setup_ships_exactly_the_resources_the_package_reads():
    tree = ast.parse((REPO / "setup.py").read_text())
    shipped = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "SHIPPED" for t in node.targets))
    assert ast.literal_eval(shipped) == resources.SHIPPED


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split()
    src = tmp / "src"
    for name in listed:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("lampretrain-*.whl")
    site = tmp / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def _run_installed(site: Path, cwd: Path, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    # -I would also drop site-packages (torch, ase): -P keeps them but not the working directory
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=cwd, env=env, check=True, capture_output=True,
                         text=True)
    return out.stdout.strip()


def test_the_installed_package_finds_its_resources_anywhere(installed, tmp_path):
    code = "\n".join([
        "from pathlib import Path",
        "import lampretrain, lampretrain.resources as r",
        "from lampretrain.prep.spec import load_spec",
        "from lampretrain.launch.templates import template_path",
        "from lampretrain.bench.common import default_results_path",
        "spec = load_spec(r.path('data_prep/demo.yaml'), base=r.root())",
        "missing = [s.path for s in spec.sources if not Path(s.path).exists()]",
        "assert not missing, missing",
        "assert r.path('recipes/demo-matris.yaml').is_file() and r.path('recipes/demo-dpa4.yaml').is_file()",
        "assert template_path('slurm/torchrun.sbatch').is_file()",
        "print(lampretrain.__file__, r.root(), default_results_path().parent, sep='|')",
    ])
    package, root, results = _run_installed(installed, tmp_path, code).split("|")
    assert Path(package).is_relative_to(installed), "imported the checkout, not the wheel"
    assert Path(root) == installed / "lampretrain" / "_resources"
    assert Path(results) == tmp_path / "benchmarks" / "results"  # results land where the user is


def test_the_wheel_holds_no_stale_or_foreign_files(installed):
    names = {p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.is_file()}
    assert not [n for n in names if n.startswith("lampretrain/") and "__pycache__" in n]
    tracked = {p.relative_to(REPO / "lampretrain").as_posix() for p in (REPO / "lampretrain").rglob("*.py")}
    shipped = {n.removeprefix("lampretrain/") for n in names if n.startswith("lampretrain/") and n.endswith(".py")
               and "/_resources/" not in n}
    assert shipped <= tracked
