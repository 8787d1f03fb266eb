"""Everything is declared in pyproject.toml; this only ships the non-code directories the commands read.

``build_py`` copies ``lampretrain.resources.SHIPPED`` (prep specs, recipes, cluster templates, the bundled
real DFT data) into the built package as ``lampretrain/_resources/``, keeping their repository layout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("data_prep", "recipes", "cluster", "tests/data/real")  # = lampretrain.resources.SHIPPED (tested)


class BuildWithResources(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        target = Path(self.build_lib) / "lampretrain" / "_resources"
        for name in SHIPPED:
            shutil.copytree(Path(name), target / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithResources})
