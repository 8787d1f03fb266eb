"""The shard record: a :class:`~lampretrain.frames.Frame` as msgpack bytes, never a pickle.

A record is a msgpack map with an explicit ``schema`` name and integer ``version``,
followed by the Frame fields in a fixed order. Arrays are msgpack ext type
:data:`ARRAY_EXT` whose payload is a fixed header and the raw little-endian buffer::

    dtype (3 ASCII bytes, e.g. b"<f8") | ndim (uint8) | ndim × uint32 LE dims | data

Only the dtypes in :data:`ARRAY_DTYPES` can be written or read, so a record can
never describe an object array or anything else that would run code on load:
a shard from an untrusted source is safe to decode. Decoding validates the
schema, the version, every field's type and dtype, and the shapes against the
number of atoms, and raises :class:`CodecError` naming the record and field.

Encoding is deterministic (fields in a fixed order, ``info`` keys sorted,
floats always 64-bit), so the same Frame always gives the same bytes.
``info`` holds plain values only: str, int, float, bool, None, lists and
str-keyed dicts of those, and numeric numpy arrays. NumPy scalars come back as
the Python scalar of equal value, tuples as lists, and info arrays of a
narrower numeric dtype (int16, float16, ...) in the smallest whitelisted dtype
that holds them exactly.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np

from ..frames import Frame, FrameError

SCHEMA = "lampretrain.frame"
VERSION = 1
# Which lampretrain release first wrote each record version: named in errors so a
# user holding a newer shard knows what to upgrade to.
WRITTEN_SINCE = {1: "lampretrain 0.1.0"}

ARRAY_EXT = 1
ARRAY_DTYPES = {name: np.dtype(name.decode("ascii")) for name in (b"<f8", b"<f4", b"<i8", b"<i4", b"|u1", b"|b1")}

# Frame arrays have one canonical dtype each; info arrays keep theirs (widened losslessly).
_FIELD_DTYPES = {
    "positions": "<f8",
    "numbers": "<i8",
    "cell": "<f8",
    "pbc": "|b1",
    "forces": "<f8",
    "stress": "<f8",
    "magmoms": "<f8",
}
_ARRAY_FIELDS = ("positions", "numbers", "cell", "pbc", "forces", "stress", "magmoms")
_FLOAT_FIELDS = ("energy", "charge", "spin")
_STR_FIELDS = ("dataset", "level_of_theory", "source")
_KEYS = ("schema", "version", *_ARRAY_FIELDS, *_FLOAT_FIELDS, *_STR_FIELDS, "info")
_OPTIONAL = frozenset({"cell", "forces", "stress", "magmoms", "energy", "charge", "spin"})


class CodecError(FrameError):
    """A record that cannot be encoded or decoded; ``source`` names the record, ``field`` the field."""


def encode_frame(frame: Frame) -> bytes:
    """The record bytes of ``frame`` (deterministic: equal frames give equal bytes)."""
    src = frame.source or None
    record: dict[str, Any] = {"schema": SCHEMA, "version": VERSION}
    for name in _ARRAY_FIELDS:
        value = getattr(frame, name)
        record[name] = None if value is None else _array_ext(np.asarray(value, dtype=_FIELD_DTYPES[name]))
    for name in _FLOAT_FIELDS:
        value = getattr(frame, name)
        record[name] = None if value is None else float(value)
    for name in _STR_FIELDS:
        record[name] = str(getattr(frame, name))
    if not isinstance(frame.info, dict):
        raise CodecError(f"expected a dict, got {type(frame.info).__name__}", "info", src)
    record["info"] = _plain_dict(frame.info, "info", src)
    try:
        return msgpack.packb(record, use_bin_type=True, use_single_float=False, strict_types=False)
    except (OverflowError, ValueError, TypeError) as exc:
        raise CodecError(f"cannot encode: {exc}", None, src) from exc


def decode_frame(data: bytes | bytearray | memoryview, source_hint: str = "") -> Frame:
    """The Frame in one record; ``source_hint`` (e.g. ``"shard-00003.lmdb#00000042"``) names it in errors."""
    where = source_hint or None
    try:
        record = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            timestamp=0,
            ext_hook=_array_from_ext,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CodecError(f"not a readable record (truncated or corrupt): {exc}", None, where) from exc
    if not isinstance(record, dict):
        raise CodecError(f"expected a msgpack map, got {type(record).__name__}", None, where)
    _check_schema(record, where)
    unknown = sorted(set(record) - set(_KEYS))
    missing = [k for k in _KEYS if k not in record]
    if unknown or missing:
        raise CodecError(f"record keys differ from schema version {VERSION}: missing {missing}, unknown {unknown}",
                         None, where)
    fields: dict[str, Any] = {}
    for name in _ARRAY_FIELDS:
        value = record[name]
        if value is None and name in _OPTIONAL:
            fields[name] = None
            continue
        if isinstance(value, _Refused):
            raise CodecError(value.reason, name, where)
        if not isinstance(value, np.ndarray):
            raise CodecError(f"expected a {_FIELD_DTYPES[name]} array, got {type(value).__name__}", name, where)
        if value.dtype.str != _FIELD_DTYPES[name]:
            raise CodecError(f"expected a {_FIELD_DTYPES[name]} array, got {value.dtype.str}", name, where)
        fields[name] = value
    for name in _FLOAT_FIELDS:
        value = record[name]
        if value is not None and not isinstance(value, float):
            raise CodecError(f"expected a float or nil, got {type(value).__name__}", name, where)
        fields[name] = value
    for name in _STR_FIELDS:
        if not isinstance(record[name], str):
            raise CodecError(f"expected a string, got {type(record[name]).__name__}", name, where)
        fields[name] = record[name]
    if not isinstance(record["info"], dict):
        raise CodecError(f"expected a map, got {type(record['info']).__name__}", "info", where)
    fields["info"] = _from_plain(record["info"], "info", where)
    _check_shapes(fields, where)
    return Frame(**fields)


def _array_ext(array: np.ndarray) -> msgpack.ExtType:
    """An ndarray of a whitelisted dtype as ext :data:`ARRAY_EXT` (header + raw buffer)."""
    array = np.ascontiguousarray(array)
    header = array.dtype.str.encode("ascii") + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape)
    return msgpack.ExtType(ARRAY_EXT, header + array.tobytes())


class _Refused:
    """An ext value :func:`_array_from_ext` would not build; the caller raises, naming the field."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _array_from_ext(code: int, payload: bytes) -> np.ndarray | _Refused:
    """Inverse of :func:`_array_ext` (msgpack's ext hook): refuses other ext codes and dtypes off the whitelist."""
    if code != ARRAY_EXT:
        return _Refused(f"unknown msgpack ext type {code} (only arrays, type {ARRAY_EXT}, are allowed)")
    dtype = ARRAY_DTYPES.get(payload[:3])
    if dtype is None:
        allowed = ", ".join(sorted(name.decode() for name in ARRAY_DTYPES))
        return _Refused(f"array dtype {payload[:3]!r} is not allowed (allowed: {allowed})")
    ndim = payload[3] if len(payload) > 3 else 0
    start = 4 + 4 * ndim
    if len(payload) < start:
        return _Refused(f"array header truncated ({len(payload)} bytes)")
    shape = struct.unpack_from(f"<{ndim}I", payload, 4)
    expected = dtype.itemsize * math.prod(shape)
    if len(payload) - start != expected:
        held = len(payload) - start
        return _Refused(f"array of shape {shape} {dtype.str} needs {expected} bytes, record holds {held}")
    return np.frombuffer(payload, dtype=dtype, offset=start).reshape(shape).copy()


def _widened(array: np.ndarray, where: str, src: str | None) -> np.ndarray:
    """An info array in the smallest whitelisted little-endian dtype that holds its values exactly."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "b":
        return array.astype("|b1")
    if kind == "u" and size == 1:
        return array.astype("|u1")
    if kind in "iu" and (size < 4 or (kind == "i" and size == 4) or (kind == "u" and size == 2)):
        return array.astype("<i4")
    if kind in "iu" and size <= 8:
        if kind == "u" and size == 8 and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise CodecError("uint64 values beyond the int64 range cannot be stored", where, src)
        return array.astype("<i8")
    if kind == "f" and size <= 4:
        return array.astype("<f4")
    if kind == "f" and size == 8:
        return array.astype("<f8")
    raise CodecError(f"array dtype {array.dtype} cannot be stored (numeric bool/int/float up to 64 bits only)",
                     where, src)


def _plain(value: Any, where: str, src: str | None) -> Any:
    """``value`` as msgpack-ready plain data; anything that is not plain raises naming its key."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, np.ndarray):
        return _array_ext(_widened(value, where, src))
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return _plain_dict(value, where, src)
    raise CodecError(
        f"{type(value).__name__} cannot be stored (allowed: str, int, float, bool, None, list, dict, numeric arrays)",
        where, src)


def _plain_dict(mapping: dict, where: str, src: str | None) -> dict[str, Any]:
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise CodecError(f"keys must be strings, got {bad[0]!r}", where, src)
    return {k: _plain(mapping[k], f"{where}[{k!r}]", src) for k in sorted(mapping)}


def _from_plain(value: Any, where: str, src: str | None) -> Any:
    """A decoded ``info`` value with its arrays rebuilt; refuses anything :func:`_plain` would not write."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, _Refused):
        raise CodecError(value.reason, where, src)
    if isinstance(value, list):
        return [_from_plain(v, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _from_plain(v, f"{where}[{k!r}]", src) for k, v in value.items()}
    raise CodecError(f"unexpected {type(value).__name__} in record", where, src)


def _check_schema(record: dict, where: str | None) -> None:
    schema, version = record.get("schema"), record.get("version")
    if schema != SCHEMA:
        raise CodecError(f"not a lampretrain frame record (schema {schema!r}, expected {SCHEMA!r})", "schema", where)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CodecError(f"record version must be an integer, got {version!r}", "version", where)
    if version > VERSION:
        raise CodecError(
            f"record schema version {version} is newer than this lampretrain reads (version {VERSION}, "
            f"written by {WRITTEN_SINCE[VERSION]} and later); upgrade lampretrain to read it", "version", where)
    if version not in WRITTEN_SINCE:
        readable = ", ".join(f"{v} ({who})" for v, who in WRITTEN_SINCE.items())
        raise CodecError(f"unknown record schema version {version}; this lampretrain reads versions {readable}",
                         "version", where)


def _check_shapes(fields: dict[str, Any], where: str | None) -> None:
    numbers = fields["numbers"]
    if numbers.ndim != 1:
        raise CodecError(f"expected shape (N,), got {numbers.shape}", "numbers", where)
    n = numbers.shape[0]
    expected = {"positions": (n, 3), "cell": (3, 3), "pbc": (3,), "forces": (n, 3), "stress": (3, 3),
                "magmoms": (n,)}
    for name, shape in expected.items():
        value = fields[name]
        if value is not None and value.shape != shape:
            raise CodecError(f"expected shape {shape} for {n} atoms, got {value.shape}", name, where)
