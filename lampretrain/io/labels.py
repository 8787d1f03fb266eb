"""Where a reader finds each label, and the check that nothing label-like is left behind unsaid.

``keys`` maps a label to the name it has in the source, as MACE's ``--energy_key/--forces_key/
--stress_key/--virials_key``: per-atom labels (forces, magmoms) are looked up in the per-atom
arrays (ASE ``atoms.arrays``), the others in the per-frame values (``atoms.info``; an entry's
``data``).  Mapped values are taken in lampretrain units, stress with ASE's sign; a virial is in eV
and becomes σ = −W / V (:func:`lampretrain.frames.virial_to_stress`).  A label nobody mapped keeps
the reader's default (for ASE formats the calculator's results), else one of :data:`ALIASES` is
taken when present (auto-detection, named in ``Frame.label_keys``).

Whatever still looks like a label — a per-atom (N, 3) float array, or a name like force(s), grad,
virial(s), stress, energy, magmom, dft_*, ref_* — is reported once per file as a
:class:`~lampretrain.io.errors.ReadWarning` naming the keys and the spec line that would map them;
``ignore`` names keys to leave out without a word.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from lampretrain.errors import UserError
from lampretrain.frames import Frame, virial_to_stress
from lampretrain.io.errors import ErrorHandler, ReadError, ReadWarning, warn

LABELS = ("energy", "forces", "stress", "virial", "magmoms", "charge", "spin")
PER_ATOM = frozenset({"forces", "magmoms"})
# Names fitting codes commonly use, tried in order when a label has neither a mapping nor a default.
ALIASES: dict[str, tuple[str, ...]] = {
    "forces": ("forces", "force"),
    "stress": ("stress",),
    "virial": ("virial", "virials"),
    "magmoms": ("magmoms", "magmom"),
}
_LABEL_NAME = re.compile(r"force|grad|virial|stress|energ|magmom|^dft_|^ref_", re.IGNORECASE)
# Names that say which label a key would be (the first match wins); gradients are −forces, so none.
_SUGGEST = (("grad", None), ("virial", "virial"), ("stress", "stress"), ("force", "forces"),
            ("magmom", "magmoms"), ("energ", "energy"))


def check_keys(keys: Mapping[str, str] | None, ignore: Iterable[str] | None) -> tuple[dict[str, str], frozenset[str]]:
    """``keys`` and ``ignore`` as given to a reader, validated; an unknown label is one line naming the known ones."""
    keys = dict(keys or {})
    unknown = sorted(set(keys) - set(LABELS))
    if unknown:
        raise UserError(f"keys: unknown label {unknown[0]!r}; labels: {', '.join(LABELS)}")
    if "stress" in keys and "virial" in keys:
        raise UserError("keys: map either stress or virial, not both (they are one label)")
    return {k: v for k, v in keys.items() if v}, frozenset(ignore or ())


def _suggested(name: str, value: Any) -> str | None:
    for part, label in _SUGGEST:
        if part in name.lower():
            return label
    return "forces" if np.ndim(value) == 2 else None


class LabelMap:
    """One file's key mapping and its once-per-file warnings."""

    def __init__(self, path: object, keys: Mapping[str, str] | None, ignore: Iterable[str] | None,
                 on_error: ErrorHandler, convert: Mapping[str, Callable[[Any], Any]] | None = None):
        """``convert``: label → function from the source's units to lampretrain's (default: none needed)."""
        self.path = path
        self.keys, self.ignore = check_keys(keys, ignore)
        self.convert = dict(convert or {})
        self.on_error = on_error
        self._warned: set[str] = set()

    def apply(self, frame: Frame, index: object, per_atom: Mapping[str, Any], per_frame: Mapping[str, Any],
              where: tuple[str, str], taken: Iterable[str] = ()) -> set[str]:
        """Set ``frame``'s mapped and auto-detected labels; returns the keys used.

        ``where`` names the two mappings in ``Frame.label_keys`` (``("arrays", "info")`` for ASE);
        ``taken`` are keys the reader consumed itself.  Raises ReadError for a value that cannot be used.
        """
        used = set(taken)
        for label, key in self.keys.items():
            source = per_atom if label in PER_ATOM else per_frame
            if key not in source:
                self._missing(label, key, index, source)
                continue
            self._set(frame, label, source[key], f"{where[label not in PER_ATOM]}.{key}", index)
            used.add(key)
        for label, names in ALIASES.items():
            filled = frame.stress is not None if label == "virial" else getattr(frame, label) is not None
            if label in self.keys or filled or ("stress" in self.keys and label == "virial"):
                continue
            source = per_atom if label in PER_ATOM else per_frame
            name = next((n for n in names if n in source and n not in self.ignore), None)
            if name is not None:
                self._set(frame, label, source[name], f"{where[label not in PER_ATOM]}.{name}", index)
                used.add(name)
        self.check_unmapped(frame, index, [(where[0], per_atom), (where[1], per_frame)], used)
        return used

    def _set(self, frame: Frame, label: str, value: Any, origin: str, index: object) -> None:
        key = origin.split(".", 1)[1]
        if label == "virial" and frame.cell is None:
            raise ReadError(f"'{key}' holds a virial but the frame has no cell (a molecule): a virial needs a volume; "
                            f"leave it out with ignore: [{key}]", self.path, index, key)
        try:
            if label in self.convert:
                value = self.convert[label](value)
            if label == "virial":
                frame.stress = virial_to_stress(value, frame.cell)
            elif label in ("energy", "charge", "spin"):
                setattr(frame, label, float(np.asarray(value, dtype=np.float64).reshape(())))
            else:
                array = np.asarray(value, dtype=np.float64)
                setattr(frame, label, array.reshape(3, 3) if label == "stress" and array.shape == (9,) else array)
        except (TypeError, ValueError) as exc:
            raise ReadError(f"'{key}' cannot be the {label}: {exc}", self.path, index, key) from None
        frame.label_keys["stress" if label == "virial" else label] = origin
        frame.info.pop(key, None)

    def _missing(self, label: str, key: str, index: object, source: Mapping[str, Any]) -> None:
        if f"missing:{label}" in self._warned:
            return
        self._warned.add(f"missing:{label}")
        message = (f"keys.{label} = {key!r} is not in this record (it has {sorted(source)}), so it has no {label}; "
                   f"check the name in keys")
        warn(self.on_error, ReadWarning(message, self.path, index, "keys", keys=[key]))

    def check_unmapped(self, frame: Frame, index: object, sources: list[tuple[str, Mapping[str, Any]]],
                       used: Iterable[str]) -> None:
        """Warn, once per key and file, about label-like entries of ``sources`` not in ``used`` or ``ignore``."""
        skip = set(used) | self.ignore | self._warned
        found: list[tuple[str, str, Any]] = []
        for where, mapping in sources:
            for name, value in mapping.items():
                if name in skip:
                    continue
                skip.add(name)  # an entry's data is both its per-atom and per-frame mapping
                array = value if isinstance(value, np.ndarray) else None
                per_atom_vectors = array is not None and array.dtype.kind == "f" and array.shape == (frame.natoms, 3)
                if per_atom_vectors or _LABEL_NAME.search(name):
                    found.append((where, name, value))
        if not found:
            return
        self._warned.update(name for _, name, _ in found)
        names = [name for _, name, _ in found]
        mapping: dict[str, str] = {}
        for _, name, value in found:
            label = _suggested(name, value)
            if label is not None:
                mapping.setdefault(label, name)
        listed = ", ".join(f"{where} {name!r}" for where, name, _ in found)
        fix = f"map it with keys: {{{', '.join(f'{k}: {v}' for k, v in mapping.items())}}} or " if mapping else ""
        message = f"label-like data not read: {listed}; {fix}silence it with ignore: [{', '.join(names)}]"
        warn(self.on_error, ReadWarning(message, self.path, index, keys=names))
