"""Using trained models: the ASE calculator, evaluation with plots, stability check, export."""

from .calculator import Calculator
from .loading import load_model

__all__ = ["Calculator", "load_model"]
