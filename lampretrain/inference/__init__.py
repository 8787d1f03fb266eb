"""Using trained models: the ASE calculator (export and evaluation follow)."""

from .calculator import Calculator

__all__ = ["Calculator"]
