"""Checkpoints of other codes: the published formats a family reads (``lampretrain import``) and writes
(``lampretrain export --format``).

A family package registers each format it speaks with :func:`register_format`: ``read`` turns a file of
that format into a :class:`~lampretrain.models.multitask.MultiTaskModel` (one head per dataset the source
was trained on, its element references, the source's settings recorded), ``write`` hands a model of this
family back in that format. Nothing outside the family package knows a format's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..files import atomic_write, atomic_write_json, file_sha256

MODEL_FILE = "model.pt"  # what an imported checkpoint directory holds, loaded by inference.loading
RECORD_FILE = "import.json"  # where it came from: format, file, sha256, the source's own settings


class ForeignFormatError(UserError, ValueError):
    """A file that is not of the format it was given as, or a model that format cannot hold; names the file."""


@dataclass
class Imported:
    """What :attr:`ForeignFormat.read` returns."""

    model: Any  # MultiTaskModel, eval mode, float32 unless the source was float64
    source: dict[str, Any] = field(default_factory=dict)  # the source's own config and names, JSON-able


@dataclass(frozen=True)
class ForeignFormat:
    name: str  # as the CLI spells it: ``lampretrain import NAME SRC``
    description: str  # one line for --help
    read: Callable[[Path], Imported]
    # (model, path, dataset): write ``model``'s head ``dataset`` (None: its only one) to ``path``
    write: Callable[[Any, Path, str | None], None]
    # published checkpoints by release name: (file name, download URL); found in CACHE or ``extra_cache``
    releases: dict[str, tuple[str, str]] = field(default_factory=dict)
    extra_cache: str | None = None  # where the source code's own loader caches them (e.g. ~/.cache/matris)


_FORMATS: dict[str, ForeignFormat] = {}
CACHE = "~/.cache/lampretrain/published"  # LAMPRETRAIN_PUBLISHED overrides; filled by the user, never downloaded into


def register_format(fmt: ForeignFormat) -> ForeignFormat:
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, ForeignFormat]:
    """Every registered format by name (imports the families, which register theirs)."""
    from . import available

    available()
    return dict(sorted(_FORMATS.items()))


def get_format(name: str) -> ForeignFormat:
    known = formats()
    if name not in known:
        raise ForeignFormatError(f"unknown checkpoint format '{name}'; known: {', '.join(known)}")
    return known[name]


def cache_dirs(fmt: ForeignFormat) -> list[Path]:
    import os

    dirs = [Path(os.environ.get("LAMPRETRAIN_PUBLISHED", CACHE)).expanduser()]
    return dirs + ([Path(fmt.extra_cache).expanduser()] if fmt.extra_cache else [])


def source_file(fmt: ForeignFormat, src: str | Path) -> Path:
    """``src`` itself when it is a file; a release name (``matris_10m_oam``) → its file in the cache. Nothing is
    downloaded: a release not in the cache is a one-line error with its URL and where to put it."""
    path = Path(src).expanduser()
    if path.is_file():
        return path
    release = fmt.releases.get(str(src).lower())
    if release is None:
        known = f"; or a release name: {', '.join(fmt.releases)}" if fmt.releases else ""
        raise ForeignFormatError(f"{src}: no such file (a {fmt.name} checkpoint file{known})")
    file, url = release
    dirs = cache_dirs(fmt)
    for folder in dirs:
        if (folder / file).is_file():
            return folder / file
    raise ForeignFormatError(f"{src}: release not downloaded; fetch {url} into {dirs[0]}/ "
                             f"(e.g. curl -L --create-dirs -o {dirs[0]}/{file} {url}), then run again")


def import_checkpoint(name: str, src: str | Path, out: str | Path) -> Path:
    """Read ``src`` (a file or a release name) as format ``name`` and write the lampretrain checkpoint directory
    ``out`` (``model.pt`` + ``import.json``), which ``Calculator``, ``evaluate``, ``export`` and ``finetune`` load."""
    fmt = get_format(name)
    src, out = source_file(fmt, src), Path(out)
    imported = fmt.read(src)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / MODEL_FILE, imported.model.save)
    record = {"format": name, "file": str(src.resolve()), "sha256": file_sha256(src), **imported.source}
    atomic_write_json(out / RECORD_FILE, record)
    return out

