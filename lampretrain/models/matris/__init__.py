"""MatRIS: invariant attention over atom and bond-pair graphs (arXiv 2603.02002).

Registers the released sizes ``matris-10m`` (10 blocks) and ``matris-4m`` (4 blocks).
"""

from __future__ import annotations

from .. import register
from .config import MATRIS_4M, MATRIS_10M, MatRISConfig
from .model import MatRIS

__all__ = ["MatRIS", "MatRISConfig", "MATRIS_10M", "MATRIS_4M"]


# model configs saved before the smooth default (format 1) are the published MatRIS
PUBLISHED = {"smooth": False}


@register("matris-10m", MATRIS_10M.with_overrides, PUBLISHED)
def matris_10m(**overrides) -> MatRIS:
    return MatRIS(MATRIS_10M.with_overrides(**overrides))


@register("matris-4m", MATRIS_4M.with_overrides, PUBLISHED)
def matris_4m(**overrides) -> MatRIS:
    return MatRIS(MATRIS_4M.with_overrides(**overrides))


from . import official  # noqa: E402,F401 - registers the official checkpoint format (needs the sizes above)
