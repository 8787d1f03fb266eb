"""read_frames over every real fixture with format guessing; the registry's errors; JSON streaming."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from lampretrain.io import FORMATS, ReadError, guess_format, json_stream, read_frames

REAL = Path(__file__).parent / "data" / "real"

EXPECTED = {
    "mlearn_pbe_elemental": 164,
    "custodian_vasp_mp/FeO_PBEU_relax": 28,
    "custodian_vasp_mp/Al_r2SCAN_relax": 2,
    "fairchem_oxides_asedb": 295,
    "spice_hdf5": 55,
    "ani1x_hdf5": 8,
    "deepmd_nopbc_cho": 2062,
    "deepmd_water": 240,
}


@pytest.mark.parametrize("folder, count", sorted(EXPECTED.items()))
def test_every_fixture_folder_reads_and_validates(folder: str, count: int) -> None:
    frames = list(read_frames(REAL / folder, dataset=folder))
    assert len(frames) == count
    sources = set()
    for frame in frames:
        frame.validate()
        assert frame.dataset == folder and frame.source.startswith(str(REAL / folder))
        sources.add(frame.source)
    assert len(sources) == count  # every record has its own id


def test_whole_fixture_tree_reads_once_each() -> None:
    assert guess_format(REAL) == "directory"
    assert sum(1 for _ in read_frames(REAL)) == sum(EXPECTED.values())


def test_registry_and_errors(tmp_path: Path) -> None:
    assert {
        "extxyz",
        "vasprun",
        "outcar",
        "pymatgen_json",
        "deepmd",
        "deepmd_hdf5",
        "ase_db",
        "aselmdb",
        "spice_hdf5",
        "ani_hdf5",
    } <= set(FORMATS)
    with pytest.raises(ValueError, match="unknown format"):
        read_frames(REAL / "spice_hdf5", format="nope")
    with pytest.raises(TypeError):
        read_frames(REAL / "ani1x_hdf5" / "ani1_n5.hdf5", methd="wb97x_tz")
    with pytest.raises(TypeError, match="methd"):
        read_frames(REAL, methd="wb97x_tz")
    with pytest.raises(ReadError, match="no such file"):
        guess_format(tmp_path / "missing.xyz")
    bad = tmp_path / "empty.h5"
    import h5py

    h5py.File(bad, "w").close()
    with pytest.raises(ReadError, match="HDF5"):
        guess_format(bad)


def test_options_reach_the_readers_that_take_them() -> None:
    frames = list(read_frames(REAL / "ani1x_hdf5", method="ccsd(t)_cbs"))
    assert sum(f.energy is None for f in frames) == 2


def test_json_stream_handles_members_split_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_stream, "_CHUNK", 3)
    text = ' [1, {"a": [1, 2], "b": "x,]"}, 3.5e10 , -2.25, NaN] '
    assert list(json_stream.iter_top_level(io.StringIO(text))) == [
        (0, 1),
        (1, {"a": [1, 2], "b": "x,]"}),
        (2, 3.5e10),
        (3, -2.25),
        (4, pytest.approx(float("nan"), nan_ok=True)),
    ]
    assert list(json_stream.iter_top_level(io.StringIO('{"k": {"f": 1}, "m": 2}'))) == [("k", {"f": 1}), ("m", 2)]
    with pytest.raises(json_stream.JSONStreamError) as info:
        list(json_stream.iter_top_level(io.StringIO('{"k": 1, "m": [1, 2')))
    assert info.value.index == "m"
