"""Shard formats: the record codec, LMDB shards (random access) and WebDataset tar shards (streaming)."""

from .codec import SCHEMA, VERSION, CodecError, decode_frame, encode_frame
from .lmdb_shards import LmdbShardReader, LmdbShardWriter, LmdbStore, remove_temp_files
from .wds_shards import WdsShardReader, WdsShardWriter, iter_wds_frames, shards_for

__all__ = [
    "SCHEMA",
    "VERSION",
    "CodecError",
    "LmdbShardReader",
    "LmdbShardWriter",
    "LmdbStore",
    "WdsShardReader",
    "WdsShardWriter",
    "decode_frame",
    "encode_frame",
    "iter_wds_frames",
    "remove_temp_files",
    "shards_for",
]
