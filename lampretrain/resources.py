"""Files the commands read that are not code: prep specs, recipes, cluster templates, the bundled real DFT data.

In a checkout (or an editable install) they are the repository's own ``data_prep/``, ``recipes/``,
``cluster/`` and ``tests/data/real/``. A wheel carries copies of the same directories, in the same
layout, under ``lampretrain/_resources/`` (``setup.py`` copies them when the package is built), so
``lampretrain demo``, ``launch`` and ``bench`` run from an installed package in any directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# what a wheel carries: repository-relative directories, copied as they are
SHIPPED = ("data_prep", "recipes", "cluster", "tests/data/real")


def root() -> Path:
    """The directory the paths of :data:`SHIPPED` (and the demo spec's source paths) are relative to."""
    installed = PACKAGE / "_resources"
    if installed.is_dir():
        return installed
    checkout = PACKAGE.parent
    if (checkout / "data_prep").is_dir():
        return checkout
    raise FileNotFoundError(f"{PACKAGE}: neither a wheel's _resources/ nor a checkout beside it; reinstall lampretrain")


def path(relative: str) -> Path:
    """``relative`` (e.g. ``recipes/demo-matris.yaml``) under :func:`root`."""
    return root() / relative
