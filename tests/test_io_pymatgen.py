"""MPtrj / mlearn / pymatgen JSON readers against the mlearn files' own numbers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from lampretrain.frames import KBAR_TO_EV_PER_A3
from lampretrain.io import ReadError, guess_format, read_frames

MLEARN = Path(__file__).parent / "data" / "real" / "mlearn_pbe_elemental"
MO = MLEARN / "Mo" / "test.json"


def _mlearn(path: Path = MO) -> list[dict]:
    return json.loads(path.read_text())


def test_mlearn_labels_and_kbar_stress_convention() -> None:
    records = _mlearn()
    frames = list(read_frames(MO, dataset="mlearn", level_of_theory="PBE"))
    assert guess_format(MO) == "pymatgen_json"
    assert len(frames) == len(records) == 23
    for frame, rec in zip(frames, records):
        out = rec["outputs"]
        assert frame.energy == out["energy"]
        np.testing.assert_array_equal(frame.forces, out["forces"])
        np.testing.assert_array_equal(frame.positions, [s["xyz"] for s in rec["structure"]["sites"]])
        np.testing.assert_array_equal(frame.cell, rec["structure"]["lattice"]["matrix"])
        assert set(frame.numbers) == {42}
        # virial_stress: kB, VASP sign, order xx yy zz xy yz zx → ASE σ = −0.1 GPa × value.
        xx, yy, zz, xy, yz, zx = out["virial_stress"]
        k = -KBAR_TO_EV_PER_A3
        expected = k * np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]])
        np.testing.assert_allclose(frame.stress, expected, rtol=1e-15)
        assert frame.info["group"] == rec["group"]
        frame.validate()
    # Strained "Elastic" cells under tension have negative VASP pressure → positive ASE stress.
    assert frames[0].source == f"{MO}#0"


def _mptrj_layout(records: list[dict]) -> dict:
    """MPtrj's {mp_id: {frame_id: frame}} with stress stored as MPtrj does: (3, 3) kB, VASP sign."""
    data: dict = {}
    for i, rec in enumerate(records):
        out = rec["outputs"]
        xx, yy, zz, xy, yz, zx = out["virial_stress"]
        mp_id, frame_id = f"mp-{i // 4}", f"mp-{i // 4}-{i % 4}-0"
        data.setdefault(mp_id, {})[frame_id] = {
            "structure": rec["structure"],
            "uncorrected_total_energy": out["energy"],
            "corrected_total_energy": out["energy"] - 0.5,
            "energy_per_atom": out["energy"] / len(rec["structure"]["sites"]),
            "force": out["forces"],
            "stress": [[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]],
            "magmom": [0.01 * j for j in range(len(rec["structure"]["sites"]))],
            "bandgap": 0.0,
            "mp_id": mp_id,
        }
    return data


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_mptrj_layout_recovers_the_mlearn_numbers(tmp_path: Path, suffix: str) -> None:
    records = _mlearn()
    path = tmp_path / f"MPtrj_mini{suffix}"
    text = json.dumps(_mptrj_layout(records))
    path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    mlearn = list(read_frames(MO))
    frames = list(read_frames(path))
    assert len(frames) == len(mlearn)
    for frame, ref in zip(frames, mlearn):
        assert frame.energy == ref.energy  # uncorrected_total_energy: the raw DFT total
        np.testing.assert_array_equal(frame.forces, ref.forces)
        np.testing.assert_allclose(frame.stress, ref.stress, rtol=1e-15)
        np.testing.assert_array_equal(frame.positions, ref.positions)
        assert frame.info["corrected_total_energy"] == ref.energy - 0.5
    assert frames[5].info["mp_id"] == "mp-1" and frames[5].info["frame_id"] == "mp-1-1-0"
    assert frames[5].source == f"{path}#mp-1/mp-1-1-0"
    np.testing.assert_allclose(frames[5].magmoms, 0.01 * np.arange(frames[5].natoms))
    corrected = list(read_frames(path, energy_key="corrected_total_energy"))
    assert [f.energy for f in corrected] == [f.energy - 0.5 for f in mlearn]


def test_mptrj_record_missing_its_energy_is_reported_and_skipped(tmp_path: Path) -> None:
    data = _mptrj_layout(_mlearn()[:6])
    del data["mp-0"]["mp-0-2-0"]["uncorrected_total_energy"]
    path = tmp_path / "mptrj.json"
    path.write_text(json.dumps(data))
    errors: list[ReadError] = []
    frames = list(read_frames(path, on_error=errors.append))
    assert len(frames) == 5 and len(errors) == 1
    assert errors[0].field == "uncorrected_total_energy"
    assert errors[0].source == f"{path}#mp-0/mp-0-2-0"
    with pytest.raises(ReadError, match="uncorrected_total_energy"):
        list(read_frames(path))


def test_pymatgen_structure_and_computed_entries(tmp_path: Path) -> None:
    from pymatgen.core import Structure
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    records = _mlearn()[:3]
    structures = [Structure.from_dict(r["structure"]) for r in records]
    single = tmp_path / "structure.json"
    single.write_text(structures[0].to_json())
    (frame,) = read_frames(single)
    np.testing.assert_allclose(frame.positions, structures[0].cart_coords, atol=1e-12)
    assert frame.energy is None and frame.forces is None and frame.stress is None

    entries = [
        ComputedStructureEntry(s, r["outputs"]["energy"], correction=-1.25, entry_id=f"e{i}")
        for i, (s, r) in enumerate(zip(structures, records))
    ]
    listing = tmp_path / "entries.json"
    listing.write_text(json.dumps([e.as_dict() for e in entries]))
    raw = list(read_frames(listing))
    corrected = list(read_frames(listing, use_corrected=True))
    for f_raw, f_cor, entry in zip(raw, corrected, entries):
        assert f_raw.energy == pytest.approx(entry.uncorrected_energy, abs=1e-12)
        assert f_cor.energy == pytest.approx(entry.energy, abs=1e-12)  # pymatgen's corrected energy
        assert f_raw.info["entry_id"] == entry.entry_id
        np.testing.assert_allclose(f_raw.cell, entry.structure.lattice.matrix)


def test_truncated_json_yields_records_before_the_damage(tmp_path: Path) -> None:
    text = MO.read_text()
    cut = tmp_path / "test.json"
    cut.write_text(text[: len(text) // 2])
    records = _mlearn()
    errors: list[ReadError] = []
    frames = list(read_frames(cut, on_error=errors.append))
    assert 0 < len(frames) < len(records) and len(errors) == 1
    assert errors[0].index == len(frames)
    for frame, rec in zip(frames, records):
        assert frame.energy == rec["outputs"]["energy"]


def test_disordered_site_is_a_read_error(tmp_path: Path) -> None:
    rec = _mlearn()[0]
    rec["structure"]["sites"][3]["species"] = [{"element": "Mo", "occu": 0.5}, {"element": "Nb", "occu": 0.5}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([rec]))
    with pytest.raises(ReadError) as info:
        list(read_frames(path))
    assert info.value.field == "structure.sites[3].species" and info.value.index == 0
