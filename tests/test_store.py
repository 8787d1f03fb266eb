"""Shard record codec, LMDB and WebDataset shards, on real DFT frames."""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import tarfile
from pathlib import Path

import ase.data
import ase.db
import ase.io
import msgpack
import numpy as np
import pytest

from lampretrain.frames import Frame
from lampretrain.store import (
    CodecError,
    LmdbShardReader,
    LmdbShardWriter,
    LmdbStore,
    WdsShardReader,
    WdsShardWriter,
    codec,
    decode_frame,
    encode_frame,
    iter_wds_frames,
    lmdb_shards,
    remove_temp_files,
    shards_for,
)

REAL = Path(__file__).parent / "data" / "real"


def _deepmd_frames(system: Path, dataset: str, count: int, periodic: bool) -> list[Frame]:
    """Frames of a deepmd npy system (eV, Å, eV/Å as the fixture README states), read with numpy."""
    type_map = (system / "type_map.raw").read_text().split()
    types = np.loadtxt(system / "type.raw", dtype=int, ndmin=1)
    numbers = [ase.data.atomic_numbers[type_map[t]] for t in types]
    s = system / "set.000"
    coord, energy, force = (np.load(s / f"{name}.npy")[:count] for name in ("coord", "energy", "force"))
    box = np.load(s / "box.npy")[:count] if periodic else None
    return [
        Frame(positions=coord[i].reshape(-1, 3), numbers=numbers, energy=energy[i], forces=force[i].reshape(-1, 3),
              cell=None if box is None else box[i].reshape(3, 3), pbc=periodic, dataset=dataset,
              source=f"{system.name}/set.000#{i}")
        for i in range(len(energy))
    ]


@pytest.fixture(scope="module")
def outcar_frames() -> list[Frame]:
    path = REAL / "custodian_vasp_mp" / "FeO_PBEU_relax" / "OUTCAR"
    frames = [
        Frame.from_atoms(a, dataset="mp-pbeu", level_of_theory="PBE+U", source=f"{path.name}#{i}")
        for i, a in enumerate(ase.io.read(path, ":"))
    ]
    for i, f in enumerate(frames):
        f.info = {"ionic_step": i, "incar": {"LDAU": True, "ENCUT": 520.0, "LDAUL": np.array([2, -1], np.int16)},
                  "kpts": (4, 4, 4), "note": None}
    return frames


@pytest.fixture(scope="module")
def oxide_frames() -> list[Frame]:
    with ase.db.connect(REAL / "fairchem_oxides_asedb" / "oxides.db") as db:
        return [Frame.from_atoms(row.toatoms(), dataset="oxides", source=f"oxides.db#{row.id}") for row in db.select()]


@pytest.fixture(scope="module")
def molecule_frames() -> list[Frame]:
    return _deepmd_frames(REAL / "deepmd_nopbc_cho" / "C1H4O2", "cho", 20, periodic=False)


@pytest.fixture(scope="module")
def water_frames() -> list[Frame]:
    return _deepmd_frames(REAL / "deepmd_water" / "data_0", "water", 20, periodic=True)


@pytest.fixture(scope="module")
def mixed_frames(outcar_frames, oxide_frames, molecule_frames, water_frames) -> list[Frame]:
    return outcar_frames + oxide_frames[:60] + molecule_frames + water_frames


def _same_value(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_value, a, b))
    return type(a) is type(b) and a == b


def assert_same_frame(a: Frame, b: Frame) -> None:
    """Bit-exact equality of every field; an absent label must stay absent."""
    for name in ("positions", "numbers", "cell", "pbc", "forces", "stress", "magmoms"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    for name in ("energy", "charge", "spin", "dataset", "level_of_theory", "source"):
        assert _same_value(getattr(a, name), getattr(b, name)), name
    assert _same_value(a.info, b.info)


def _normalised_info(info: dict) -> dict:
    """``info`` as the codec documents it comes back: tuples as lists, sorted keys, int16 as int32."""
    def norm(v):
        if isinstance(v, dict):
            return {k: norm(v[k]) for k in sorted(v)}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, np.ndarray) and v.dtype == np.int16:
            return v.astype(np.int32)
        return v
    return norm(info)


def _expected(frame: Frame) -> Frame:
    return Frame(**{**frame.__dict__, "info": _normalised_info(frame.info)})


# --- codec -------------------------------------------------------------------------------------------------------


def test_real_frames_carry_the_labels_the_tests_rely_on(outcar_frames, oxide_frames, molecule_frames, water_frames):
    # The round trips below are only meaningful if these fields are really present / really absent.
    f = outcar_frames[0]
    assert f.stress is not None and f.magmoms is not None and f.cell is not None and f.energy is not None
    assert len(outcar_frames) == 28 and len(oxide_frames) == 295
    assert oxide_frames[0].stress is None and oxide_frames[0].magmoms is None and oxide_frames[0].forces is not None
    assert molecule_frames[0].cell is None and not molecule_frames[0].pbc.any()
    assert water_frames[0].natoms == 192 and water_frames[0].pbc.all()
    # The values are the files' own numbers (deepmd float32 widened exactly to float64).
    water = REAL / "deepmd_water" / "data_0" / "set.000"
    assert water_frames[0].energy == float(np.load(water / "energy.npy")[0]) == -29943.90625
    assert water_frames[0].forces.ravel().tolist() == np.load(water / "force.npy")[0].astype(np.float64).tolist()


def test_codec_round_trip_is_bit_exact(mixed_frames):
    for frame in mixed_frames:
        assert_same_frame(decode_frame(encode_frame(frame)), _expected(frame))


def test_codec_keeps_none_and_optional_scalars():
    frame = Frame(positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]], numbers=[1, 1], charge=-1, spin=0.5,
                  energy=np.float32(-31.5), info={"z": np.float64(0.1), "a": np.bool_(True), "n": np.int64(7)})
    back = decode_frame(encode_frame(frame))
    assert back.cell is None and back.forces is None and back.stress is None and back.magmoms is None
    assert back.energy == -31.5 and back.charge == -1.0 and back.spin == 0.5
    assert back.info == {"a": True, "n": 7, "z": 0.1} and list(back.info) == ["a", "n", "z"]
    assert type(back.info["a"]) is bool and type(back.info["n"]) is int


def test_codec_is_deterministic(outcar_frames):
    frame = outcar_frames[3]
    shuffled = Frame(**{**frame.__dict__, "info": dict(reversed(list(frame.info.items())))})
    assert encode_frame(frame) == encode_frame(shuffled) == encode_frame(decode_frame(encode_frame(frame)))


@pytest.mark.parametrize("value, message", [
    (object(), "object cannot be stored"),
    (b"raw", "bytes cannot be stored"),
    (np.array(["a"]), "dtype <U1 cannot be stored"),
    (np.array([1 + 2j]), "dtype complex128 cannot be stored"),
    ({1: "x"}, "keys must be strings"),
])
def test_encode_rejects_non_plain_info_naming_the_key(molecule_frames, value, message):
    frame = Frame(**{**molecule_frames[0].__dict__, "info": {"ok": 1, "bad": {"inner": [0, value]}}})
    with pytest.raises(CodecError, match=message) as err:
        encode_frame(frame)
    assert "info['bad']['inner'][1]" in str(err.value) and "C1H4O2/set.000#0" in str(err.value)


def _tampered(record: bytes, **changes) -> bytes:
    fields = msgpack.unpackb(record, raw=False)
    fields.update(changes)
    return msgpack.packb(fields, use_bin_type=True)


def test_decode_rejects_other_schemas_and_versions(molecule_frames):
    record = encode_frame(molecule_frames[0])
    with pytest.raises(CodecError, match=r"shard#7: field 'version': .*version 2 is newer.*upgrade lampretrain"):
        decode_frame(_tampered(record, version=2), "shard#7")
    with pytest.raises(CodecError, match="unknown record schema version 0; this lampretrain reads versions 1"):
        decode_frame(_tampered(record, version=0))
    with pytest.raises(CodecError, match="not a lampretrain frame record"):
        decode_frame(_tampered(record, schema="ase.atoms"))
    with pytest.raises(CodecError, match=r"unknown \['extra'\]"):
        decode_frame(_tampered(record, extra=1))
    with pytest.raises(CodecError, match="expected a msgpack map"):
        decode_frame(msgpack.packb([1, 2]))


def test_decode_rejects_every_truncation(molecule_frames):
    record = encode_frame(molecule_frames[0])
    for cut in range(len(record)):
        with pytest.raises(CodecError, match="shard#3: not a readable record"):
            decode_frame(record[:cut], "shard#3")


def test_decode_rejects_dtypes_off_the_whitelist_and_smuggled_pickles(molecule_frames, tmp_path):
    record = encode_frame(molecule_frames[0])
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    smuggled = pickle.dumps(Payload())
    object_array = msgpack.ExtType(codec.ARRAY_EXT, b"|O\x00" + bytes([1]) + (2).to_bytes(4, "little") + smuggled)
    cases = {
        "object dtype": (dict(positions=object_array), r"field 'positions': array dtype b'\|O\\x00' is not allowed"),
        "float16": (dict(forces=msgpack.ExtType(codec.ARRAY_EXT, b"<f2\x01\x01\x00\x00\x00\x00\x00")),
                    r"field 'forces': array dtype b'<f2' is not allowed"),
        "pickle as bytes": (dict(positions=smuggled), "field 'positions': expected a <f8 array, got bytes"),
        "pickle in info": (dict(info={"x": msgpack.ExtType(42, smuggled)}),
                           r"field 'info\['x'\]': unknown msgpack ext"),
        "timestamp in info": (dict(info={"t": msgpack.Timestamp(1)}), r"info\['t'\]': unexpected Timestamp"),
        "wrong dtype": (dict(numbers=codec._array_ext(np.zeros(7))), "field 'numbers': expected a <i8 array, got <f8"),
        "short buffer": (dict(cell=msgpack.ExtType(codec.ARRAY_EXT, b"<f8\x02" + bytes([3, 0, 0, 0] * 2) + bytes(64))),
                         r"field 'cell': array of shape \(3, 3\) <f8 needs 72 bytes, record holds 64"),
        "shape vs natoms": (dict(forces=codec._array_ext(np.zeros((6, 3)))),
                            r"field 'forces': expected shape \(7, 3\) for 7 atoms"),
        "string energy": (dict(energy="-1.0"), "field 'energy': expected a float or nil"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(CodecError, match=message):
            decode_frame(_tampered(record, **change), "shard#0")
    with pytest.raises(CodecError):
        decode_frame(smuggled)
    assert not marker.exists()


# --- LMDB --------------------------------------------------------------------------------------------------------


def _write_lmdb(path: Path, frames: list[Frame]) -> Path:
    with LmdbShardWriter(path) as writer:
        for k, frame in enumerate(frames):
            assert writer.write(frame) == k
    return path


def test_lmdb_round_trip(tmp_path, mixed_frames):
    path = _write_lmdb(tmp_path / "shard-00000.lmdb", mixed_frames)
    assert sorted(os.listdir(tmp_path)) == ["shard-00000.lmdb"]  # no lock file, no temp file
    with LmdbShardReader(path) as reader:
        assert len(reader) == len(mixed_frames)
        for k in reversed(range(len(reader))):
            assert_same_frame(reader[k], _expected(mixed_frames[k]))
            assert reader.get_bytes(k) == encode_frame(mixed_frames[k])
        with pytest.raises(IndexError, match=f"record {len(mixed_frames)} out of range"):
            reader[len(reader)]


def _write_lmdb_in_child(path: Path, frames: list[Frame]) -> None:
    [np.zeros(4096 * i) for i in range(200)]  # a different heap history than the parent's
    _write_lmdb(path, frames)


def test_lmdb_shards_are_byte_identical(tmp_path, mixed_frames, water_frames, monkeypatch):
    # A 1 MiB initial map for > 2 MiB of records forces map growth; 64 records per transaction makes several.
    monkeypatch.setattr(lmdb_shards, "_INITIAL_MAP_SIZE", 1 << 20)
    monkeypatch.setattr(lmdb_shards, "_COMMIT_EVERY", 64)
    frames = mixed_frames + water_frames * 10
    assert sum(len(encode_frame(f)) for f in frames) > 2 << 20
    assert len(frames) > 2 * lmdb_shards._COMMIT_EVERY
    a = _write_lmdb(tmp_path / "a.lmdb", frames)
    child = multiprocessing.get_context("fork").Process(target=_write_lmdb_in_child, args=(tmp_path / "b.lmdb", frames))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert a.read_bytes() == (tmp_path / "b.lmdb").read_bytes()
    assert len(LmdbShardReader(a)) == len(frames)


def test_lmdb_write_is_atomic(tmp_path, molecule_frames):
    path = tmp_path / "shard.lmdb"
    with pytest.raises(RuntimeError, match="boom"):
        with LmdbShardWriter(path) as writer:
            writer.write(molecule_frames[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(CodecError, match="info"):
        with LmdbShardWriter(path) as writer:
            writer.write(molecule_frames[0])
            writer.write(Frame(**{**molecule_frames[1].__dict__, "info": {"x": object()}}))
    assert os.listdir(tmp_path) == []


def _killed_writer(writer_cls, path: Path, frames: list[Frame]) -> None:
    with writer_cls(path) as writer:
        for k, frame in enumerate(frames):
            writer.write(frame) if writer_cls is LmdbShardWriter else writer.write("%06d" % k, frame)
        os._exit(9)  # killed before close: no rename, no cleanup


@pytest.mark.parametrize("writer_cls", [LmdbShardWriter, WdsShardWriter])
def test_killed_writer_leaves_only_a_temp_file(tmp_path, molecule_frames, writer_cls):
    path = tmp_path / "shard-00000"
    child = multiprocessing.get_context("fork").Process(target=_killed_writer, args=(writer_cls, path, molecule_frames))
    child.start()
    child.join()
    leftovers = list(tmp_path.iterdir())
    assert not path.exists() and [p.name for p in leftovers] == [f"shard-00000.tmp-{child.pid}"]
    if writer_cls is LmdbShardWriter:
        _write_lmdb(path, molecule_frames)
        assert len(LmdbShardReader(path)) == len(molecule_frames)
    else:
        _write_wds(path, molecule_frames)
        assert len(list(WdsShardReader(path))) == len(molecule_frames)
    assert remove_temp_files(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == [path]


def test_lmdb_reader_rejects_incomplete_shards(tmp_path, molecule_frames):
    import lmdb

    path = tmp_path / "partial.lmdb"
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(lmdb_shards.record_key(0), encode_frame(molecule_frames[0]))
    env.close()
    with pytest.raises(ValueError, match="partial.lmdb: incomplete LMDB shard"):
        len(LmdbShardReader(path))
    with pytest.raises(FileNotFoundError, match="missing.lmdb"):
        LmdbShardReader(tmp_path / "missing.lmdb")[0]


def _read_in_child(reader: LmdbShardReader, keys: list[int]) -> tuple[int, int, list[bytes]]:
    records = [encode_frame(reader[k]) for k in keys]
    return os.getpid(), lmdb_shards._open_shards.pid, records


def test_lmdb_reader_reopens_in_forked_children(tmp_path, mixed_frames):
    path = _write_lmdb(tmp_path / "shard.lmdb", mixed_frames)
    reader = LmdbShardReader(path)
    expected = [reader.get_bytes(k) for k in range(len(reader))]  # the parent's environment is open before forking
    assert lmdb_shards._open_shards.pid == os.getpid()
    chunks = [list(range(i, len(expected), 3)) for i in range(3)]
    context = multiprocessing.get_context("fork")
    # Pool arguments are pickled (a fresh reader, like spawned workers); Process targets inherit the parent's reader.
    with context.Pool(2) as pool:
        results = pool.starmap(_read_in_child, [(reader, c) for c in chunks])
    for (pid, opened_by, records), keys in zip(results, chunks):
        assert pid != os.getpid() and opened_by == pid
        assert records == [expected[k] for k in keys]
    queue = context.SimpleQueue()
    children = [context.Process(target=lambda c=c: queue.put(_read_in_child(reader, c))) for c in chunks]
    for child in children:
        child.start()
    results = [queue.get() for _ in children]
    for child in children:
        child.join()
    assert sorted(r[2] for r in results) == sorted([expected[k] for k in c] for c in chunks)
    assert all(pid == opened_by != os.getpid() for pid, opened_by, _ in results)
    assert reader.get_bytes(5) == expected[5]  # the parent's handle still works
    assert LmdbShardReader(path).get_bytes(6) == expected[6]  # a second reader of the file shares the environment
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._checked_pid is None and clone.get_bytes(7) == expected[7]
    reader.close()


def test_lmdb_reader_sees_a_replaced_shard(tmp_path, molecule_frames):
    path = _write_lmdb(tmp_path / "shard.lmdb", molecule_frames[:3])
    assert len(LmdbShardReader(path)) == 3
    _write_lmdb(path, molecule_frames[3:8])
    reader = LmdbShardReader(path)
    assert len(reader) == 5 and reader.get_bytes(0) == encode_frame(molecule_frames[3])


def test_lmdb_store_flat_index(tmp_path, mixed_frames):
    cuts = [0, 28, 29, 100, len(mixed_frames)]
    paths = [_write_lmdb(tmp_path / f"shard-{i:05d}.lmdb", mixed_frames[a:b])
             for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    store = LmdbStore(paths)
    assert len(store) == len(mixed_frames)
    assert store.locate(28) == (1, 0) and store.locate(29) == (2, 0) and store.locate(len(store) - 1) == (3, 27)
    for i in (0, 27, 28, 29, 99, 100, len(store) - 1):
        assert_same_frame(store[i], _expected(mixed_frames[i]))
    assert len(LmdbStore(paths, lengths=[28, 1, 71, 28])) == len(store)
    with pytest.raises(IndexError):
        store[len(store)]
    store.close()


# --- WebDataset ----------------------------------------------------------------------------------------------------


def _write_wds(path: Path, frames: list[Frame], first: int = 0) -> Path:
    with WdsShardWriter(path) as writer:
        for k, frame in enumerate(frames, start=first):
            writer.write("%010d" % k, frame)
    return path


def test_wds_round_trip_and_deterministic_tar(tmp_path, mixed_frames):
    a = _write_wds(tmp_path / "a.tar", mixed_frames)
    b = _write_wds(tmp_path / "b.tar", mixed_frames)
    assert a.read_bytes() == b.read_bytes()
    read = list(WdsShardReader(a))
    assert [k for k, _ in read] == ["%010d" % k for k in range(len(mixed_frames))]
    for (_, frame), original in zip(read, mixed_frames):
        assert_same_frame(frame, _expected(original))
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    streamed = list(iter_wds_frames([a], rank=0, world_size=1, worker=0, num_workers=1))
    for frame, original in zip(streamed, mixed_frames, strict=True):
        assert_same_frame(frame, _expected(original))


def test_wds_write_is_atomic_and_keys_checked(tmp_path, molecule_frames):
    path = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError, match="boom"):
        with WdsShardWriter(path) as writer:
            writer.write("0001", molecule_frames[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    for key in ("a.b", "__meta__", "x/y", ""):
        with pytest.raises(ValueError, match="key"):
            with WdsShardWriter(path) as writer:
                writer.write(key, molecule_frames[0])
    with pytest.raises(ValueError, match="duplicate key '0001'"):
        with WdsShardWriter(path) as writer:
            writer.write("0001", molecule_frames[0])
            writer.write("0001", molecule_frames[1])
    assert os.listdir(tmp_path) == []


def test_webdataset_never_unpickles_other_members(tmp_path, molecule_frames):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        members = {"0001.frame.msgpack": encode_frame(molecule_frames[0]), "0001.pyd": pickle.dumps(Payload()),
                   "0001.pickle": pickle.dumps(Payload())}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (frame,) = iter_wds_frames([path], rank=0, world_size=1, worker=0, num_workers=1)
    assert_same_frame(frame, molecule_frames[0])
    assert not marker.exists()
    with pytest.raises(ValueError, match="unexpected member '0001.pyd'"):
        list(WdsShardReader(path))


@pytest.fixture(scope="module")
def wds_store(tmp_path_factory, mixed_frames):
    """Five shards of uneven size holding every mixed frame once, keyed by global record number."""
    root = tmp_path_factory.mktemp("wds")
    cuts = [0, 30, 70, 71, 120, len(mixed_frames)]
    return [str(_write_wds(root / f"shard-{i:05d}.tar", mixed_frames[a:b], first=a))
            for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def _split(urls, shuffle_buffer: int, seed: int) -> dict[tuple[int, int], list[str]]:
    def sources(rank: int, worker: int) -> list[str]:
        frames = iter_wds_frames(urls, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank, world_size=2,
                                 worker=worker, num_workers=2)
        return [f.source for f in frames]

    return {(rank, worker): sources(rank, worker) for rank in range(2) for worker in range(2)}


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_wds_ranks_and_workers_cover_every_frame_once(wds_store, mixed_frames, shuffle_buffer):
    parts = _split(wds_store, shuffle_buffer, seed=3)
    seen = [s for part in parts.values() for s in part]
    assert sorted(seen) == sorted(f.source for f in mixed_frames) and len(set(seen)) == len(mixed_frames)
    assert all(parts.values())  # five shards over four (rank, worker) pairs: nobody is idle
    if shuffle_buffer:
        assert parts == _split(wds_store, shuffle_buffer, seed=3)
        assert parts != _split(wds_store, shuffle_buffer, seed=4)
        in_order = _split(wds_store, 0, seed=3)
        assert parts != in_order
    else:
        assert parts[(0, 0)] == [f.source for f in mixed_frames[:30] + mixed_frames[120:]]


def test_wds_split_defaults_come_from_the_environment(wds_store, monkeypatch):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "WORKER": "1", "NUM_WORKERS": "2"}.items():
        monkeypatch.setenv(name, value)
    assert [f.source for f in iter_wds_frames(wds_store)] == _split(wds_store, 0, 0)[(1, 1)]
    assert shards_for(wds_store, 1, 2, 1, 2) == [wds_store[3]]
    with pytest.raises(ValueError, match="rank 2/2"):
        shards_for(wds_store, 2, 2, 0, 1)


def _frames_as_is(frame: Frame) -> Frame:
    return frame


def test_wds_worker_split_inside_a_torch_dataloader(wds_store, mixed_frames):
    torch = pytest.importorskip("torch")

    class Shards(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter_wds_frames(wds_store, rank=1, world_size=2)  # the worker split comes from torch

    loader = torch.utils.data.DataLoader(Shards(), batch_size=None, num_workers=2, collate_fn=_frames_as_is,
                                         multiprocessing_context="fork")
    got = sorted(f.source for f in loader)
    assert got == sorted(_split(wds_store, 0, 0)[(1, 0)] + _split(wds_store, 0, 0)[(1, 1)])
    assert len(got) == len(set(got)) == 40 + 49  # rank 1 holds shards 1 (frames 30-69) and 3 (71-119)


def test_wds_more_readers_than_shards(wds_store, mixed_frames):
    parts = [[f.source for f in iter_wds_frames(wds_store, rank=r, world_size=4, worker=w, num_workers=2)]
             for r in range(4) for w in range(2)]
    assert sum(not p for p in parts) == 3  # five shards for eight readers
    assert sorted(s for p in parts for s in p) == sorted(f.source for f in mixed_frames)


def test_select_chooses_split_rows_by_dataset_and_size_with_heads_in_the_order_asked(tmp_path):
    """The one selection every loader and check uses: rows of the split, filtered by dataset and natoms, each row's
    head the position of its dataset in the names asked; a dataset the store lacks or nothing left is one line."""
    from lampretrain.config import ConfigError
    from lampretrain.store.index import StoreIndex

    from finetune_support import AL, FEO, make_store

    index = StoreIndex.open(make_store(tmp_path / "s", [{"path": str(FEO), "dataset": "feo"},
                                                        {"path": str(AL), "dataset": "al"}]))
    train = index.rows("train")
    both = index.select("train", ["al", "feo"])
    assert both.names == ["al", "feo"] and both.rows.tolist() == train.tolist()
    assert [index.datasets[d] for d in index.dataset[both.rows]] == [both.names[h] for h in both.heads]
    assert index.select("train").names == index.datasets == ["feo", "al"]
    al = index.select("train", ["al"])
    assert 0 < len(al) < len(train) and (index.dataset[al.rows] == index.datasets.index("al")).all()
    assert (al.heads == 0).all()
    cap = int(np.median(index.natoms[train]))
    small = index.select("train", max_natoms=cap)
    assert small.rows.tolist() == train[index.natoms[train] <= cap].tolist()
    with pytest.raises(ConfigError, match="^data.datasets: 'water' is not a dataset of .*; it has feo, al$"):
        index.select("train", ["feo", "water"])
    with pytest.raises(ConfigError, match="^finetune.replay: .* has no 'test' frames of al$"):
        index.select("test", ["al"], key="finetune.replay")
    assert len(index.select("test", ["al"], required=False)) == 0
