"""WebDataset shards: POSIX tar files streamed sequentially (shared filesystems, object stores).

A shard is a ustar archive whose members are ``<key>.frame.msgpack``, one per
frame, holding :func:`~lampretrain.store.codec.encode_frame` bytes. ``key`` is
given by the caller (the prep layer uses a zero-padded record number unique in
the store) and may not contain ``.`` or ``/`` (webdataset splits the member name
at the first dot of its basename).

The writer uses :mod:`tarfile` with every header field fixed (mtime 0, uid/gid 0,
empty user/group names, mode 0o644, members in write order), so the same records
give the same bytes. Writes are atomic (``<path>.tmp-<pid>`` renamed on a clean
close).

Training reads shards with :class:`ShardStream`: the records a plan asks for, in its order, each shard front to
back; local paths are opened as seekable files (records before the first one asked for are skipped by seeking
over them), any other URL through webdataset's ``gopen`` (``pipe:``, ``http(s)``, ``gs``, ``file:``, ...: read as
a stream, skipped records are read and dropped). :func:`iter_wds_frames` is the plain webdataset pipeline (our own
decoder only: webdataset's automatic decoders, which include pickle, are never installed), used by the loader
benchmark. ``webdataset`` imports torch when imported, so it is imported inside functions only: the prep side
writes shards without torch. :class:`WdsShardReader` reads one shard with plain :mod:`tarfile` for verification.
"""

from __future__ import annotations

import io
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from ..errors import UserError
from ..frames import Frame
from .codec import CodecError, decode_frame, encode_frame
from .lmdb_shards import temp_path

SUFFIX = "frame.msgpack"
# Leading "_" is refused: webdataset skips members named like "__meta__".
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$")


def row_key(row: int) -> str:
    """The member key of store row ``row`` in the store's tar shards (prep names every record by its row)."""
    return f"{row:09d}"


class WdsShardWriter:
    """Writes one deterministic tar shard atomically; use as a context manager.

    >>> with WdsShardWriter("shard-00000.tar") as w:
    ...     w.write("%010d" % 0, frame)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = temp_path(self.path)
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._keys: set[str] = set()

    def __enter__(self) -> "WdsShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def __len__(self) -> int:
        return len(self._keys)

    def write(self, key: str, frame: Frame) -> None:
        """Append ``frame`` as member ``<key>.frame.msgpack``."""
        self.write_bytes(key, encode_frame(frame))

    def write_bytes(self, key: str, record: bytes) -> None:
        """Append an already encoded record as member ``<key>.frame.msgpack``."""
        if self._tar is None:
            raise RuntimeError(f"{self.path}: writer is not open (use it as a context manager)")
        if not _KEY.match(key):
            raise ValueError(
                f"{self.path}: key {key!r} must be 1-80 characters of [A-Za-z0-9_-], not starting with '_' or '-'")
        if key in self._keys:
            raise ValueError(f"{self.path}: duplicate key {key!r}")
        self._keys.add(key)
        info = tarfile.TarInfo(f"{key}.{SUFFIX}")
        info.size = len(record)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        self._tar.addfile(info, io.BytesIO(record))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._tar.close()
                self._file.flush()
                os.fsync(self._file.fileno())
        except BaseException:
            self._abort()
            raise
        if exc_type is not None:
            self._abort()
            return
        self._file.close()
        os.replace(self._tmp, self.path)

    def _abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class WdsShardReader:
    """Iterates ``(key, Frame)`` over one tar shard with plain :mod:`tarfile` (no webdataset)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __iter__(self) -> Iterator[tuple[str, Frame]]:
        with tarfile.open(self.path, mode="r|*") as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if not member.isreg() or suffix != SUFFIX:
                    raise ValueError(f"{self.path}: unexpected member {member.name!r} (expected <key>.{SUFFIX})")
                data = tar.extractfile(member).read()
                yield key, decode_frame(data, f"{self.path}#{key}")


def shards_for(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int,
               seed: int | None = None, epoch: int = 0) -> list[str]:
    """The shards one (rank, worker) reads: shard-per-rank, then shard-per-worker.

    With ``seed`` the shard order is first shuffled by ``(seed, epoch)`` (the same on
    every rank), so ranks see different shards each epoch while the union stays the
    full list. Ranks receive ``len(urls) // world_size`` or one more shard; balancing
    frames across ranks is the sampler's job.
    """
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
    order = list(urls)
    if seed is not None:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world_size][worker::num_workers]


def iter_wds_frames(
    urls: Sequence[str | os.PathLike],
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    worker: int | None = None,
    num_workers: int | None = None,
) -> Iterator[Frame]:
    """Frames from WebDataset shards through the webdataset pipeline, split per rank and worker.

    ``rank``/``world_size`` and ``worker``/``num_workers`` default to what
    ``webdataset.utils.pytorch_worker_info`` reports (torch.distributed, the
    DataLoader worker, or the RANK/WORLD_SIZE/WORKER/NUM_WORKERS variables).
    With ``shuffle_buffer > 0`` shard order and frames are shuffled, reproducibly
    for ``(seed, epoch, rank, worker)``; with 0 shards and frames come in order.
    A (rank, worker) left without a shard yields nothing.
    ``urls`` are opened by webdataset's ``gopen`` (so ``pipe:`` URLs run commands:
    take them from trusted configuration only).
    """
    import webdataset as wds

    info = wds.utils.pytorch_worker_info()
    rank = info[0] if rank is None else rank
    world_size = info[1] if world_size is None else world_size
    worker = info[2] if worker is None else worker
    num_workers = info[3] if num_workers is None else num_workers
    shuffled = shuffle_buffer > 0
    mine = shards_for([os.fspath(u) for u in urls], rank, world_size, worker, num_workers,
                      seed if shuffled else None, epoch)
    if not mine:  # more ranks × workers than shards: this one has nothing to read
        return iter(())
    stages: list = [wds.SimpleShardList(mine), wds.tarfile_to_samples()]
    if shuffled:
        rng = random.Random(f"{seed}:{epoch}:{rank}:{worker}")
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng))
    stages.append(wds.map(_sample_frame))
    return iter(wds.DataPipeline(*stages))


def _sample_frame(sample: dict) -> Frame:
    """Our decoder for one webdataset sample (bytes in, Frame out; nothing else is decoded)."""
    where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
    if SUFFIX not in sample:
        extra = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"{where}: sample has no .{SUFFIX} member (members: {extra})")
    return decode_frame(sample[SUFFIX], where)



class ShardError(UserError, OSError):
    """A tar shard that cannot be opened or read, or does not hold what the store index says; names the shard."""


def _local_path(url: str) -> str | None:
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return None


class _TarCursor:
    """One shard open for reading front to back; :meth:`take` returns the record of a store row at or after the
    last one taken."""

    def __init__(self, url: str, fix: str):
        self.url, self.fix = url, fix
        self.last = -1  # the last row taken
        path = _local_path(url)
        try:
            if path is not None:
                self._raw = open(path, "rb")
                self.tar = tarfile.open(fileobj=self._raw, mode="r:")  # seekable: skipping a record is a seek
            else:
                from webdataset.gopen import gopen

                self._raw = gopen(url, "rb")
                self.tar = tarfile.open(fileobj=self._raw, mode="r|")
        except FileNotFoundError:
            raise ShardError(f"{url}: WebDataset shard not found; {fix}") from None
        except (OSError, tarfile.TarError, ValueError) as err:
            self.close(quiet=True)
            raise ShardError(f"{url}: cannot read this WebDataset shard ({_why(err)}); {fix}") from None

    def take(self, row: int) -> bytes:
        want = row_key(row)
        while True:
            try:
                member = self.tar.next()
                self.tar.members.clear()  # tarfile keeps every header it reads: a shard of 10^5 records otherwise
                if member is None:
                    raise ShardError(f"{self.url}: record {want} is not in this shard (it ends after record "
                                     f"{row_key(self.last) if self.last >= 0 else 'none'}): shard and store index "
                                     f"differ; {self.fix}")
                key, _, suffix = member.name.partition(".")
                if not member.isreg() or suffix != SUFFIX or not key.isdigit():
                    raise ShardError(f"{self.url}: unexpected member {member.name!r} (expected <row>.{SUFFIX}); "
                                     f"{self.fix}")
                if int(key) > row:
                    raise ShardError(f"{self.url}: record {want} is not in this shard (found {key} where it should "
                                     f"be): shard and store index differ; {self.fix}")
                if int(key) == row:
                    data = self.tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    self.last = row
                    return data
            except ShardError:
                raise
            except (OSError, tarfile.TarError, EOFError, ValueError) as err:
                raise ShardError(f"{self.url}: corrupt or truncated WebDataset shard near record {want} "
                                 f"({_why(err)}); {self.fix}") from None

    def close(self, quiet: bool = False) -> None:
        raw = getattr(self, "_raw", None)
        if raw is None:
            return
        self._raw = None
        try:
            raw.close()  # a gopen pipe checks its command's exit status here
        except OSError as err:
            if not quiet:
                raise ShardError(f"{self.url}: reading this WebDataset shard failed ({_why(err)}); {self.fix}") from None


def _why(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class ShardStream:
    """Records of a split's tar shards, read in the order asked: consecutive requests for later rows of the same
    shard continue its open stream; anything else opens the shard (again) and skips to the row.

    ``urls[k]`` is shard k of the split; ``fix`` is what the error lines tell the user to do.
    """

    def __init__(self, urls: Sequence[str], fix: str = "re-run `lampretrain prep --overwrite` to rewrite the store"):
        self.urls, self.fix = [os.fspath(u) for u in urls], fix
        self._cursor: tuple[int, _TarCursor] | None = None

    def records(self, shards: np.ndarray, rows: np.ndarray) -> list[bytes]:
        """The record bytes of store rows ``rows`` (in shards ``shards``), in that order."""
        out = []
        for shard, row in zip(np.asarray(shards).tolist(), np.asarray(rows).tolist()):
            if self._cursor is None or self._cursor[0] != shard or self._cursor[1].last >= row:
                self.close()
                if not 0 <= shard < len(self.urls):
                    raise ShardError(f"store row {row} is in shard {shard} but the split has {len(self.urls)} "
                                     f"WebDataset shards; {self.fix}")
                self._cursor = (shard, _TarCursor(self.urls[shard], self.fix))
            out.append(self._cursor[1].take(row))
        return out

    def frames(self, shards: np.ndarray, rows: np.ndarray) -> list[Frame]:
        """The decoded frames of store rows ``rows``, in that order (a bad record is a :class:`ShardError`)."""
        out = []
        for shard, row, data in zip(np.asarray(shards).tolist(), np.asarray(rows).tolist(),
                                    self.records(shards, rows)):
            where = f"{self.urls[shard]}#{row_key(row)}"
            try:
                out.append(decode_frame(data, where))
            except CodecError as err:
                raise ShardError(f"{err} (a corrupt record); {self.fix}") from None
        return out

    def close(self) -> None:
        if self._cursor is not None:
            cursor, self._cursor = self._cursor[1], None
            cursor.close()
