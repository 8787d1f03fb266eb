"""LMDB shards: one file per shard, random access by record number.

Layout of a shard (``subdir=False``, a single file): record ``k`` (0-based) under
the ASCII key ``b"%08d" % k`` holding :func:`~lampretrain.store.codec.encode_frame`
bytes, and ``b"__len__"`` holding the record count in ASCII. The count is written
last, so a shard without it is incomplete.

Determinism: LMDB files are byte-identical for the same records only when pages
are zero-filled before use (``meminit=True``; with ``meminit=False`` the unused
tail of each page carries uninitialised heap memory, which also leaks process
memory into the file) and the write history is the same (the map size and the
free pages left by each committed transaction are part of the file). The writer
therefore commits after a fixed number of records and grows the map by a fixed
rule, so the bytes depend only on the records (and the OS page size, which LMDB
uses as its page size: shards are byte-identical between machines of the same
page size, e.g. all x86-64 Linux). A compacting copy
(``env.copy(compact=True)``) was measured to save only the few free pages
(< 1 %), so it is not done.

Writes are atomic: the shard is written to ``<path>.tmp-<pid>`` and renamed to
``path`` on a clean close; on error the temp file is removed. A temp file left by
a killed process is never read as a shard; :func:`remove_temp_files` clears them.
"""

from __future__ import annotations

import bisect
import os
import threading
from pathlib import Path
from typing import Iterator, Sequence

import lmdb

from ..frames import Frame
from .codec import decode_frame, encode_frame

LEN_KEY = b"__len__"
MAX_RECORDS = 10**8  # keys are 8 ASCII digits
_INITIAL_MAP_SIZE = 1 << 26  # 64 MiB, doubled when full; the reader maps only what the file holds
_COMMIT_EVERY = 512  # records per write transaction: fixed so the file bytes are reproducible


def record_key(k: int) -> bytes:
    """The LMDB key of record ``k`` of a shard."""
    return b"%08d" % k


def temp_path(path: str | os.PathLike) -> Path:
    """Where a writer in this process builds ``path`` before renaming it."""
    return Path(f"{os.fspath(path)}.tmp-{os.getpid()}")


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete shard temp files (``*.tmp-<pid>``) left in ``directory`` by killed writers; returns them.

    Only call this when no writer is running on ``directory``.
    """
    removed = sorted(p for p in Path(directory).glob("*.tmp-*") if p.suffix[len(".tmp-"):].isdigit())
    for p in removed:
        p.unlink()
    return removed


class LmdbShardWriter:
    """Writes one LMDB shard atomically; use as a context manager.

    >>> with LmdbShardWriter("shard-00000.lmdb") as w:
    ...     for frame in frames:
    ...         w.write(frame)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = temp_path(self.path)
        self._env: lmdb.Environment | None = None
        self._pending: list[bytes] = []  # records not yet committed, replayed when the map grows
        self._count = 0
        self._map_size = _INITIAL_MAP_SIZE

    def __enter__(self) -> "LmdbShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp.unlink(missing_ok=True)
        # lock=False: the temp file is private to this process, so no lock file is needed.
        self._env = lmdb.open(str(self._tmp), subdir=False, map_size=self._map_size, lock=False, meminit=True,
                              sync=False, metasync=False, readahead=False, max_dbs=0)
        return self

    def __len__(self) -> int:
        return self._count

    def write(self, frame: Frame) -> int:
        """Append ``frame``; returns its record number in the shard."""
        return self.write_bytes(encode_frame(frame))

    def write_bytes(self, record: bytes) -> int:
        """Append an already encoded record; returns its record number in the shard."""
        if self._env is None:
            raise RuntimeError(f"{self.path}: writer is not open (use it as a context manager)")
        if self._count >= MAX_RECORDS:
            raise ValueError(f"{self.path}: a shard holds at most {MAX_RECORDS} records")
        self._pending.append(bytes(record))
        self._count += 1
        if len(self._pending) >= _COMMIT_EVERY:
            self._commit()
        return self._count - 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit(final=True)
                self._env.sync(True)
        except BaseException:
            self._abort()
            raise
        if exc_type is not None:
            self._abort()
            return
        self._env.close()
        self._env = None
        os.replace(self._tmp, self.path)

    def _commit(self, final: bool = False) -> None:
        """Write the pending records (and the count when ``final``) in one transaction, growing the map if full."""
        first = self._count - len(self._pending)
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for i, record in enumerate(self._pending):
                        txn.put(record_key(first + i), record, append=True)
                    if final:
                        txn.put(LEN_KEY, b"%d" % self._count, append=True)
                break
            except lmdb.MapFullError:
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)
        self._pending.clear()

    def _abort(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        self._tmp.unlink(missing_ok=True)


class _OpenShards:
    """This process's read-only environments (one per shard file) and read transactions (one per thread).

    py-lmdb refuses to open one file twice in a process, so every reader of a shard
    shares its environment. After a fork the parent's handles are dropped, never
    used: the child opens its own (DataLoader workers each get theirs).
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self.lock = threading.Lock()
        self.envs: dict[str, tuple[lmdb.Environment, tuple[int, int]]] = {}  # path → (env, (st_dev, st_ino))
        self.txns: dict[tuple[str, int], lmdb.Transaction] = {}  # (path, thread) → read transaction

    def txn(self, path: str, check_file: bool = False) -> lmdb.Transaction:
        """A read transaction on ``path``; ``check_file`` reopens it if the file was replaced since it was opened."""
        key = (path, threading.get_ident())
        # Never look up a parent's transaction in a forked child: holding it would keep the parent's env alive.
        txn = self.txns.get(key) if self.pid == os.getpid() else None
        if txn is not None and not check_file:
            return txn
        with self.lock:
            if self.pid != os.getpid():
                self.txns.clear()
                self.envs.clear()
                self.pid = os.getpid()
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: LMDB shard not found") from None
            opened = self.envs.get(path)
            if opened is not None and opened[1] != (stat.st_dev, stat.st_ino):
                self._close(path)
                opened = None
            if opened is None:
                env = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False, meminit=False,
                                max_readers=1, max_dbs=0)
                opened = self.envs[path] = (env, (stat.st_dev, stat.st_ino))
            txn = self.txns.get(key)
            if txn is None:
                txn = self.txns[key] = opened[0].begin(buffers=True)
            return txn

    def close(self, path: str) -> None:
        with self.lock:
            if self.pid == os.getpid():
                self._close(path)

    def _close(self, path: str) -> None:
        for key in [k for k in self.txns if k[0] == path]:
            self.txns.pop(key).abort()
        opened = self.envs.pop(path, None)
        if opened is not None:
            opened[0].close()


_open_shards = _OpenShards()


class LmdbShardReader:
    """Random access to the frames of one LMDB shard: ``reader[k]``, ``len(reader)``.

    Fork-safe: the environment is opened lazily, per process, and reopened in a
    forked child (DataLoader workers), so no LMDB handle is used by two processes.
    Readers of the same file in one process share one environment. Pickling
    (spawned workers) carries only the path.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._key = os.path.abspath(self.path)
        self._len: int | None = None
        self._checked_pid: int | None = None  # the process in which this reader has validated the file

    def _txn(self) -> lmdb.Transaction:
        if self._checked_pid == os.getpid():
            return _open_shards.txn(self._key)
        txn = _open_shards.txn(self._key, check_file=True)
        self._len = self._read_len(txn)
        self._checked_pid = os.getpid()
        return txn

    def _read_len(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(LEN_KEY)
        if raw is None:
            raise ValueError(f"{self.path}: incomplete LMDB shard (no {LEN_KEY.decode()} key)")
        n = int(bytes(raw))
        entries = txn.stat()["entries"]
        if entries != n + 1:
            raise ValueError(f"{self.path}: LMDB shard says {n} records but holds {entries - 1}")
        return n

    def __len__(self) -> int:
        if self._len is None:
            self._txn()
        return self._len

    def get_bytes(self, k: int) -> bytes:
        """The encoded record ``k``."""
        return bytes(self._view(k))

    def __getitem__(self, k: int) -> Frame:
        return decode_frame(self._view(k), f"{self.path}#{k}")

    def __iter__(self) -> Iterator[Frame]:
        return (self[k] for k in range(len(self)))

    def _view(self, k: int) -> memoryview:
        txn = self._txn()
        if not 0 <= k < self._len:
            raise IndexError(f"{self.path}: record {k} out of range [0, {self._len})")
        return txn.get(record_key(k))

    def close(self) -> None:
        """Close this process's environment of the shard (other readers of it reopen on their next read)."""
        _open_shards.close(self._key)
        self._checked_pid = None

    def __enter__(self) -> "LmdbShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path, "_key": self._key, "_len": self._len, "_checked_pid": None}


class LmdbStore:
    """Many LMDB shards as one flat sequence of frames (plain Python, no torch).

    ``lengths`` (from the index) avoids opening every shard to count it.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], lengths: Sequence[int] | None = None):
        self.readers = [LmdbShardReader(p) for p in paths]
        if lengths is None:
            lengths = [len(r) for r in self.readers]
        if len(lengths) != len(self.readers):
            raise ValueError(f"{len(lengths)} lengths given for {len(self.readers)} shards")
        self._starts = [0]
        for n in lengths:
            self._starts.append(self._starts[-1] + int(n))

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, record number in that shard) of flat index ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"frame {i} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def get(self, shard: int, k: int) -> Frame:
        return self.readers[shard][k]

    def __getitem__(self, i: int) -> Frame:
        return self.get(*self.locate(i))

    def close(self) -> None:
        for r in self.readers:
            r.close()
