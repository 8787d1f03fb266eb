"""Model files from anywhere, read without running code.

A ``MultiTaskModel.save`` / ``PropertyModel.save`` file is a ``torch.save`` archive of
plain data (config dicts) and tensors. It is read only through torch's ``weights_only``
unpickler, which admits tensors, containers and numbers and refuses every other global
(``os.system``, ``__reduce__`` payloads, arbitrary classes). A refused, truncated or
foreign file is one :class:`ModelFileError` line naming the file.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from .errors import UserError, one_line


class ModelFileError(UserError, ValueError):
    """A model file that is unreadable, hostile or not of the expected kind; names the file."""


def read_model_file(path: str | os.PathLike, keys: tuple[str, ...], map_location: Any = "cpu") -> dict[str, Any]:
    """The mapping ``torch.save`` wrote to ``path``, which must hold ``keys``."""
    try:
        with warnings.catch_warnings():  # torch warns of the refused global before raising; the error says it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except Exception as err:  # noqa: BLE001 - whatever torch raised for a hostile or damaged file
        reason = one_line(str(err)).split(" Check the documentation")[0]  # drop torch's paragraph of advice
        raise ModelFileError(f"{path}: refused, not a plain tensor file ({reason[:300]})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: not a model file (holds a {type(data).__name__}, not a dict)")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ModelFileError(f"{path}: not a lampretrain model file (no '{missing[0]}')")
    return data
