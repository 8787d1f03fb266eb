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


for _name in SIZES:
    register(_name, partial(configure, SIZES[_name]))(_builder(_name))

__all__ = ["DPA4", "DPA4Config", "SIZES", "configure"]
