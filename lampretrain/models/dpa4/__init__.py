"""DPA4 (arXiv 2606.02419, paper-era): EMFA SO(2) convolution with an exact Lebedev-grid FFN.

``lampretrain.models.build("dpa4-air", lmax=2, ...)`` builds a named size with keyword overrides.
"""

from __future__ import annotations

from functools import partial

from .. import register
from .config import SIZES, DPA4Config, configure
from .model import DPA4


def _builder(name: str):
    def build(**overrides) -> DPA4:
        return DPA4(configure(SIZES[name], **overrides))

    build.__doc__ = f"DPA4 at the paper's {name} size (random weights)."
    return build


# what model configs saved before the published (deepmd-kit) ε became the defaults implied
SAVED_BEFORE = {3: {"rms_eps": 1e-5, "null_eps": 0.0}}

for _name in SIZES:
    register(_name, partial(configure, SIZES[_name]), SAVED_BEFORE)(_builder(_name))

__all__ = ["DPA4", "DPA4Config", "SIZES", "configure"]

from . import deepmd  # noqa: E402,F401 - registers the deepmd-kit checkpoint format (needs the sizes above)
