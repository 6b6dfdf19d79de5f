"""Damaged data (issue 31): each case is one ``macfw: error:`` line naming the file and the fix (exit 2),
or, for the cache's own derived files, a rebuild that gives the same data: never a traceback and never
a silently wrong batch.

The table (docs/reliability.md lists it):

============================  ==========================================================================
damage                        outcome
============================  ==========================================================================
truncated ``.npz``            one line: "... is not a readable .npz ... Delete it ..."
columns of unequal length     one line: "arrays differ in length ..."
NaN in observations           one line: "'observations' holds NaN or infinity in 1 row(s), the first at row 7"
a truncated shard             one line naming the shard (``...-001.npz``)
a shard's columns disagree    one line naming the shard
NaN in a shard                one line naming the shard and the row
store column of wrong size    the manifest's sizes catch it on open: re-converted (a warning names it), same data
store column of wrong shape   the ``.npy`` header against the manifest: re-converted, same data
============================  ==========================================================================
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from macfw.data.generate import generate_dataset, generate_shards

SMOKE = ["--gin_file", "gin/smoke.gin", "--gin_bindings", "train.progress = False"]
DATASET = "cube-single-play-v0"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """A tiny generated dataset (4 episodes of 101 steps) and 2 shards of 2 episodes, intact."""
    root = tmp_path_factory.mktemp("damage")
    npz = generate_dataset(DATASET, root / "good" / "d.npz", 4, episode_length=101, seed=0, workers=1, progress=False)
    shards = generate_shards(DATASET, root / "shards", 2, 2, episode_length=101, seed=0, workers=1, progress=False)
    return dict(root=root, npz=Path(npz), shards=[Path(p) for p in shards])


def _arrays(path: Path) -> dict[str, Any]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _copy_pair(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    shutil.copy(str(src).replace(".npz", "-val.npz"), str(dst).replace(".npz", "-val.npz"))
    return dst


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _short_actions(p: Path) -> None:
    a = _arrays(p)
    a["actions"] = a["actions"][:-1]
    np.savez(p, **a)


def _nan_obs(p: Path) -> None:
    a = _arrays(p)
    a["observations"] = a["observations"].copy()
    a["observations"][7, 3] = np.nan
    np.savez(p, **a)


DAMAGE = {"truncated": _truncate, "short_actions": _short_actions, "nan_obs": _nan_obs}
EXPECT = {
    "truncated": r"is not a readable \.npz .*truncated",
    "short_actions": r"arrays differ in length \(404 observations but \{'actions': 403\}\)",
    "nan_obs": r"'observations' holds NaN or infinity in 1 row\(s\), the first at row 7",
}


def _main(argv, capsys, monkeypatch, cache: Path) -> tuple[int, str]:
    import gin

    from macfw import run

    monkeypatch.setenv("MACFW_CACHE_DIR", str(cache))
    gin.clear_config()
    try:
        rc = run.main(argv)
    finally:
        gin.clear_config()
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("macfw: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    return lines[0]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_dataset_file_is_one_line_naming_it_and_the_fix(good, damage, tmp_path, capsys, monkeypatch):
    bad = _copy_pair(good["npz"], tmp_path / f"{damage}.npz")
    DAMAGE[damage](bad)
    w = tmp_path / "run"
    rc, err = _main(
        [*SMOKE, "--gin_bindings", f"OGBenchDataset.dataset_path = '{bad}'", "--workdir", str(w)],
        capsys,
        monkeypatch,
        tmp_path / "cache",
    )
    line = _one_line(rc, err)
    assert str(bad) in line and re.search(EXPECT[damage], line), line
    assert "Delete it" in line, line  # the fix
    assert not (w / "checkpoints").exists() or not any((w / "checkpoints").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_is_one_line_naming_the_shard(good, damage, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "shards"
    for s in good["shards"]:
        _copy_pair(s, folder / s.name)
    victim = folder / good["shards"][1].name
    DAMAGE[damage](victim)
    cache = tmp_path / "cache"
    rc, err = _main(
        [*SMOKE, "--gin_bindings", f"OGBenchDataset.dataset_path = '{folder}'", "--workdir", str(tmp_path / "run")],
        capsys,
        monkeypatch,
        cache,
    )
    line = _one_line(rc, err)
    assert str(victim) in line, line
    assert re.search(EXPECT[damage].replace("404", "202").replace("403", "201"), line), line
    stores = cache / "shard-stores"  # nothing of the damaged shard was converted
    names = [p.name for p in stores.rglob("*")] if stores.exists() else []
    assert not any(victim.stem in n for n in names), names


def _open(folder: Path, cache: Path):
    from macfw.data.shards import open_sharded

    return open_sharded(
        folder,
        base_name=DATASET,
        dataset_name=DATASET,
        task_mode="goal",
        cache_dir=cache,
        progress=False,
    )


def _store_columns(cache: Path) -> list[Path]:
    return sorted((cache / "shard-stores").rglob("observations.npy"))


@pytest.mark.parametrize("damage", ["size", "shape"])
def test_a_damaged_store_column_is_caught_on_open_and_rebuilt_to_the_same_data(good, damage, tmp_path):
    """The cache's converted columns are checked against the manifest (sizes, ``.npy`` header) on every
    open; a damaged one is re-converted from its shard (a warning names it) and reads as before."""
    folder = good["shards"][0].parent
    cache = tmp_path / "cache"
    before = np.array(_open(folder, cache).column("observations")[0])
    col = _store_columns(cache)[0]
    if damage == "size":
        _truncate(col)
    else:  # the same bytes, another shape in the header
        arr = np.load(col)
        np.save(col, arr.reshape(arr.shape[1], arr.shape[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = np.array(_open(folder, cache).column("observations")[0])
    said = " ".join(str(w.message) for w in caught)
    assert "Re-converting the shard store" in said and "observations" in said, said
    np.testing.assert_array_equal(after, before)
