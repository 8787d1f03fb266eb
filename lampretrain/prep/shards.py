"""Stage 3 of prep, run in parallel: write one shard of one format from the encoded part files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..files import file_sha256


@dataclass(frozen=True)
class ShardJob:
    format: str  # "lmdb" | "wds"
    path: str
    first_row: int  # store row of the shard's first record (WebDataset keys are store rows)
    pieces: tuple[tuple[str, int, int], ...]  # (part file, offset, length) per record, in shard order


def _records(pieces: tuple[tuple[str, int, int], ...]) -> Iterator[bytes]:
    handles: dict[str, object] = {}
    try:
        for part, offset, length in pieces:
            fh = handles.get(part) or handles.setdefault(part, open(part, "rb"))
            fh.seek(offset)
            yield fh.read(length)
    finally:
        for fh in handles.values():
            fh.close()


def write_shard(job: ShardJob) -> str:
    """Write the shard unless a finished one is already there (resume); returns its sha256."""
    from ..store.lmdb_shards import LmdbShardWriter
    from ..store.wds_shards import WdsShardWriter, row_key

    path = Path(job.path)
    if not path.exists():
        if job.format == "lmdb":
            with LmdbShardWriter(path) as writer:
                for data in _records(job.pieces):
                    writer.write_bytes(data)
        else:
            with WdsShardWriter(path) as writer:
                for k, data in enumerate(_records(job.pieces)):
                    writer.write_bytes(row_key(job.first_row + k), data)
    return file_sha256(path)
