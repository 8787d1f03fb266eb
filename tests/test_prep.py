"""Prep end to end on the real fixtures: stores, index, statistics, bad input, kill and resume."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from ase.io import write
from ase.neighborlist import neighbor_list

from lampretrain.config import ConfigError
from lampretrain.frames import HARTREE_TO_EV
from lampretrain.io import read_frames
from lampretrain.prep.pipeline import prepare
from lampretrain.prep.spec import load_spec
from lampretrain.store.index import SPLITS, StoreIndex
from lampretrain.store.lmdb_shards import LmdbShardReader
from lampretrain.store.wds_shards import WdsShardReader

from finetune_support import free_port

REAL = Path(__file__).parent / "data" / "real"
REPO = Path(__file__).parent.parent

SOURCES = [
    {"path": str(REAL / "mlearn_pbe_elemental"), "include": "[CL]*/test.json", "dataset": "mlearn", "level_of_theory": "PBE"},
    {"path": str(REAL / "custodian_vasp_mp/FeO_PBEU_relax/vasprun.xml"), "dataset": "feo", "level_of_theory": "PBE+U"},
    {"path": str(REAL / "deepmd_water"), "include": "data_1", "dataset": "water"},
    {"path": str(REAL / "spice_hdf5/SPICE-1.1.4_n2.hdf5"), "dataset": "spice"},
    {"path": str(REAL / "deepmd_nopbc_cho"), "include": "C4H3O1", "dataset": "cho"},
]


def write_spec(tmp_path: Path, sources=SOURCES, **extra) -> Path:
    spec = {"name": "t", "output": str(tmp_path / "store"), "sources": sources, "shard_size_mb": 0.2, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    spec = load_spec(write_spec(tmp))
    report = prepare(spec, workers=2, progress=False)
    return StoreIndex.open(spec.output), report


def source_frames():
    frames = {}
    for s in SOURCES:
        paths = sorted(Path(s["path"]).glob(s["include"])) if "include" in s else [s["path"]]
        for p in paths:
            for f in read_frames(p, dataset=s["dataset"]):
                frames[f.source] = f
    return frames


def assert_same_frame(a, b):
    assert a.source == b.source and a.dataset == b.dataset
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.numbers, b.numbers)
    for name in ("cell", "forces", "stress", "magmoms"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert a.energy == b.energy
    np.testing.assert_array_equal(a.pbc, b.pbc)


def test_both_formats_round_trip_every_frame(store):
    index, report = store
    originals = source_frames()
    assert report["written"] == len(originals) == len(index)
    assert report["skipped"] == {"invalid": 0, "duplicate": 0, "read_error": 0}
    seen = set()
    for split in SPLITS:
        rows = index.rows(split)
        lmdb_frames = [f for p in index.shard_paths("lmdb", split) for f in LmdbShardReader(p)]
        wds_frames = [f for p in index.shard_paths("wds", split) for _, f in WdsShardReader(p)]
        assert len(lmdb_frames) == len(wds_frames) == len(rows)
        for row, a, b in zip(rows, lmdb_frames, wds_frames):
            assert_same_frame(a, originals[a.source])
            assert_same_frame(b, originals[a.source])
            assert index.natoms[row] == a.natoms
            assert index.datasets[index.dataset[row]] == a.dataset
            seen.add(a.source)
    assert seen == set(originals)
    assert len(index.shard_paths("lmdb", "train")) > 1  # bounded shard size took effect


def test_index_counts_match_ase_neighbor_list(store):
    index, _ = store
    for split in ("train", "val"):
        rows = index.rows(split)
        frames = [f for p in index.shard_paths("lmdb", split) for f in LmdbShardReader(p)]
        for row, frame in list(zip(rows, frames))[::7]:
            atoms = frame.to_atoms()
            i, d = neighbor_list("id", atoms, 6.0, self_interaction=False)
            assert index.n_edges[row] == len(i)
            k = np.bincount(i[d < 4.5], minlength=len(atoms))
            assert index.n_angles[row] == int((k * (k - 1)).sum())
            assert index.composition(row) == frame.composition()


def test_element_references_reproduce_least_squares_fit(store):
    index, _ = store
    stats = index.stats()
    originals = source_frames()
    train = [f for p in index.shard_paths("lmdb", "train") for f in LmdbShardReader(p)]
    for name in ("mlearn", "feo", "water"):
        frames = [f for f in train if f.dataset == name]
        elements = sorted({int(z) for f in frames for z in f.numbers})
        counts = np.array([[np.sum(f.numbers == z) for z in elements] for f in frames], dtype=float)
        energies = np.array([originals[f.source].energy for f in frames])
        expected, *_ = np.linalg.lstsq(counts, energies, rcond=None)
        refs = np.array([stats[name]["element_references"][str(z)] for z in elements])
        np.testing.assert_allclose(counts @ refs, counts @ expected, rtol=1e-12)
        residual = (energies - counts @ refs) / counts.sum(1)
        assert stats[name]["residual_per_atom_rms"] == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-9)
        forces = np.concatenate([f.forces.ravel() for f in frames])
        assert stats[name]["force_rms"] == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-9)
    assert stats["mlearn"]["element_references"].keys() == {"3", "29"}  # Li and Cu


def test_split_is_stable_when_sources_are_added(tmp_path, store):
    index, _ = store
    spec = load_spec(write_spec(tmp_path, SOURCES[:2]))
    prepare(spec, workers=1, progress=False)
    small = StoreIndex.open(spec.output)
    big = dict(zip(index.hash, index.split))
    for h, split in zip(small.hash, small.split):
        assert big[h] == split


def bad_extxyz(path: Path) -> None:
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    def frame(positions, numbers=(8, 1), energy=-1.0, cell=5.0):
        atoms = Atoms(numbers=list(numbers), positions=positions, cell=np.eye(3) * cell, pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((len(atoms), 3)))
        return atoms

    good = [[0, 0, 0], [0, 0, 0.97]]
    images = [
        frame(good),
        frame(good, energy=float("nan")),  # 1: NaN label
        frame([[0, 0, 0], [0, 0, 0.05]]),  # 2: atoms too close
        frame(good, cell=0.0),  # 3: zero-volume cell
        frame(good, energy=-2.0),
    ]
    write(path, images, format="extxyz")


def test_bad_records_are_reported_and_the_rest_written(tmp_path):
    bad = tmp_path / "bad.extxyz"
    bad_extxyz(bad)
    truncated = tmp_path / "truncated.extxyz"
    text = bad.read_text().splitlines()
    truncated.write_text("\n".join(text[: len(text) // 5 * 4 + 1]) + "\n")  # cut inside the 5th frame
    sources = [{"path": str(bad), "dataset": "bad"}, {"path": str(truncated), "dataset": "cut"}]
    spec = load_spec(write_spec(tmp_path, sources, split={"val": 0.0}))
    report = prepare(spec, workers=1, progress=False)
    reasons = {item["source"]: item["reason"] for item in report["skipped_records"]}
    assert f"{bad}#1" in reasons and "energy" in reasons[f"{bad}#1"]
    assert f"{bad}#2" in reasons and "positions" in reasons[f"{bad}#2"]
    assert f"{bad}#3" in reasons and "cell" in reasons[f"{bad}#3"]
    assert report["skipped"]["read_error"] == 1
    assert any(str(truncated) in item["source"] for item in report["skipped_records"] if item["kind"] == "read_error")
    index = StoreIndex.open(spec.output)
    written = [f.source for p in index.shard_paths("lmdb", "train") for f in LmdbShardReader(p)]
    assert set(written) >= {f"{bad}#0", f"{bad}#4", f"{truncated}#0"}
    assert report["written"] + report["skipped"]["invalid"] + report["skipped"]["duplicate"] == report["frames_in"]


def test_duplicates_are_dropped_and_reported(tmp_path):
    path = str(REAL / "custodian_vasp_mp/Al_r2SCAN_relax/vasprun.xml")
    sources = [{"path": path, "dataset": "al"}, {"path": path, "dataset": "al"}]
    report = prepare(load_spec(write_spec(tmp_path, sources)), workers=1, progress=False)
    assert report["written"] == 2 and report["skipped"]["duplicate"] == 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update(shards=3), "unknown key 'shards'"),
        (lambda s: s["sources"][0].update(format="vasp5"), "unknown format 'vasp5'"),
        (lambda s: s["sources"][0].update(colour="red"), "unknown key 'colour'"),
        (lambda s: s.update(formats=["parquet"]), "'parquet' is not allowed"),
        (lambda s: s["sources"][0].update(path="/nonexistent/x.xml"), "does not exist"),
    ],
)
def test_bad_spec_fails_before_any_work(tmp_path, mutate, message):
    spec = {"name": "t", "output": str(tmp_path / "out"), "sources": [dict(SOURCES[1])]}
    mutate(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        prepare(load_spec(path), progress=False)
    assert not (tmp_path / "out").exists()


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_prep(spec: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lampretrain.cli", "prep", str(spec), "--workers", "1", "--quiet"]
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, **popen)


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["parts", "shards"])
def test_killed_prep_resumes_to_identical_store(tmp_path, kill_when):
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    clean_dir.mkdir(), killed_dir.mkdir()
    clean = write_spec(clean_dir)
    prepare(load_spec(clean), workers=1, progress=False)
    spec = write_spec(killed_dir)
    out = killed_dir / "store"
    watch = {"parts": out / ".work" / "parts", "shards": out / "lmdb"}[kill_when]
    proc = run_prep(spec)
    deadline = time.time() + 120
    while time.time() < deadline and not (watch.exists() and any(watch.glob("[!.]*"))):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "prep finished before it could be killed"
    assert run_prep(spec).wait() == 0
    clean_files = store_files(clean_dir / "store")
    killed_files = store_files(out)
    assert killed_files.keys() == clean_files.keys()
    for name in clean_files:
        if name in ("manifest.json", "report.json"):
            continue  # they record the output path and the run time
        assert killed_files[name] == clean_files[name], name


def test_data_prep_specs_validate():
    specs = sorted((REPO / "data_prep").glob("*.yaml"))
    assert len(specs) >= 10
    for path in specs:
        spec = load_spec(path)
        assert spec.sources and all(s.format for s in spec.sources if path.name != "demo.yaml")


@pytest.mark.slow
def test_prep_on_a_ray_cluster_equals_local_processes(tmp_path, store):
    """A real Ray head started on loopback; prep workers run as Ray tasks and write the same store."""
    import shutil

    ray_bin = shutil.which("ray")
    if ray_bin is None:
        pytest.skip("ray is not installed (pip install 'lampretrain[sweep]')")
    index, _ = store
    port = free_port()  # a port derived from the pid met another run's token-authenticated head once
    # a token in ~/.ray/auth_token (left by `ray get-auth-token --generate`) turns token auth on for the head only
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    start = [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        code = (
            "import sys; from lampretrain.prep.spec import load_spec; from lampretrain.prep.pipeline import prepare; "
            f"prepare(load_spec(sys.argv[1]), ray_address='127.0.0.1:{port}', progress=False)"
        )
        spec = write_spec(tmp_path)
        subprocess.run([sys.executable, "-c", code, str(spec)], check=True, cwd=REPO, env=env, timeout=600)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
    ray_files = store_files(tmp_path / "store")
    local_files = store_files(index.root)
    assert ray_files.keys() == local_files.keys()
    for name in ray_files:
        if name not in ("manifest.json", "report.json"):
            assert ray_files[name] == local_files[name], name


def extxyz_texts(frames) -> list[list[str]]:
    """Each frame's extxyz lines as ASE writes them (count, comment, one line per atom)."""
    texts = []
    for frame in frames:
        buffer = io.StringIO()
        write(buffer, frame.to_atoms(), format="extxyz")
        texts.append(buffer.getvalue().splitlines(keepends=True))
    return texts


def hostile_directory(root: Path) -> tuple[dict[str, list[str] | None], dict[str, str]]:
    """Good and malformed inputs side by side; returns (good frame source → its extxyz lines, or None for
    HDF5 conformers) and (bad record source → the reason prep must give)."""
    root.mkdir()
    good: dict[str, list[str] | None] = {}
    bad: dict[str, str] = {}

    def extxyz(name: str, texts: list[list[str]], broken: dict[int, str]) -> None:
        path = root / name
        path.write_text("".join(line for text in texts for line in text))
        for k, text in enumerate(texts):
            if k in broken:
                bad[f"{path}#{k}"] = broken[k]
            else:
                good[f"{path}#{k}"] = text

    feo = extxyz_texts(read_frames(REAL / "custodian_vasp_mp/FeO_PBEU_relax/vasprun.xml"))
    feo[5][2] = "Xx" + feo[5][2][2:]  # unknown element in the middle of the file
    extxyz("feo.extxyz", feo, {5: "unknown element 'Xx' in frame 5"})

    li = extxyz_texts(read_frames(REAL / "mlearn_pbe_elemental/Li/test.json"))
    n3, n10 = len(li[3]) - 2, len(li[10]) - 2
    li[3][0], li[10][0] = f"{n3 + 1}\n", f"{n10 - 1}\n"  # one header too big, one too small
    extxyz("li.extxyz", li, {3: f"says {n3 + 1} atoms, {n3} atom lines follow before the next header",
                             10: f"says {n10 - 1} atoms, {n10} atom lines follow"})

    ge = extxyz_texts(read_frames(REAL / "mlearn_pbe_elemental/Ge/test.json"))
    cut = root / "ge_cut.extxyz"
    cut.write_text("".join(line for text in ge for line in text)[:-25])  # the copy stopped inside the last line
    good.update({f"{cut}#{k}": text for k, text in enumerate(ge[:-1])})
    bad[f"{cut}#{len(ge) - 1}"] = "without a newline (truncated)"

    (root / "empty.extxyz").write_bytes(b"")
    bad[str(root / "empty.extxyz")] = "empty file"
    (root / "garbage.xyz").write_bytes(np.random.default_rng(0).bytes(4096))
    bad[str(root / "garbage.xyz")] = "binary content"

    ani = root / "ani.h5"
    ani.write_bytes((REAL / "ani1x_hdf5/ani1_n5.hdf5").read_bytes())
    with h5py.File(ani, "a") as h5:
        for name in h5:
            good.update({f"{ani}#{name}/{k}": None for k in range(len(h5[name]["coordinates"]))})
        odd = h5.create_group("C2H6O")  # a group with other names than ANI-1x's
        odd["atomic_numbers"] = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
        odd["positions"] = np.zeros((2, 9, 3))
    bad[f"{ani}#C2H6O"] = "group of no known layout: it has 'atomic_numbers', 'positions'"
    return good, bad


def test_prep_of_hostile_files_keeps_every_good_frame(tmp_path):
    good, bad = hostile_directory(tmp_path / "raw")
    sources = [{"path": str(tmp_path / "raw"), "include": "*", "dataset": "mixed"}]
    spec = load_spec(write_spec(tmp_path, sources, split={"val": 0.0, "test": 0.0}))
    report = prepare(spec, workers=1, progress=False)

    reasons = {item["source"]: item["reason"] for item in report["skipped_records"]}
    assert reasons.keys() == bad.keys()
    for source, reason in bad.items():
        assert reason in reasons[source] and reasons[source].startswith(source), reasons[source]
        assert "\n" not in reasons[source] and "Traceback" not in reasons[source]
    assert report["skipped"] == {"invalid": 0, "duplicate": 0, "read_error": len(bad)}
    assert report["written"] == report["frames_in"] == len(good)

    index = StoreIndex.open(spec.output)
    stored = {f.source: f for p in index.shard_paths("lmdb", "train") for f in LmdbShardReader(p)}
    assert stored.keys() == good.keys()
    with h5py.File(tmp_path / "raw" / "ani.h5") as h5:
        for source, text in good.items():
            frame = stored[source]
            if text is None:  # an ANI-1x conformer: hartree in the file
                group, k = source.split("#")[1].rsplit("/", 1)
                assert frame.energy == pytest.approx(h5[group]["wb97x_dz.energy"][int(k)] * HARTREE_TO_EV, rel=1e-15)
                continue
            assert frame.energy == float(re.search(r" energy=(\S+)", text[1]).group(1))
            expected = np.array([line.split()[1:4] for line in text[2:]], dtype=float)
            np.testing.assert_array_equal(frame.positions, expected)


@pytest.mark.parametrize("removed", ["nothing", "half"])
def test_rerun_finishes_clean_up_of_work_dir_killed_after_the_manifest(tmp_path, removed):
    """The state a kill inside the final ``rmtree(.work)`` leaves: the finished store plus the work dir of stage 1
    (rebuilt here by the same stage-1 code the pipeline ran), whole or with part of it already deleted."""
    from lampretrain.prep.convert import Settings, run_task
    from lampretrain.prep.pipeline import _claim_work_dir, expand_tasks

    spec = load_spec(write_spec(tmp_path, SOURCES[:2]))
    prepare(spec, workers=1, progress=False)
    out = Path(spec.output)
    finished = store_files(out)
    work = _claim_work_dir(out, spec)
    settings = Settings(spec.cutoff, spec.three_body_cutoff, spec.min_distance, spec.split.group_by)
    for task in expand_tasks(spec):
        run_task(task, str(work), settings)
    records = sorted((work / "parts").glob("*.records"))
    assert sum(p.stat().st_size for p in records) > 100_000  # the second copy of the encoded records
    if removed == "half":
        for path in records[: len(records) // 2]:
            path.unlink()
        (work / "spec.sha256").unlink()

    report = prepare(spec, workers=1, progress=False)
    assert not work.exists()
    assert store_files(out) == finished
    assert report == json.loads(finished["report.json"])
