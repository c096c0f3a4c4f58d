"""Issue 25 defect 6: where ``store=disk`` cold files go and when they leave. ``kvslim niah`` kept every finished
cell's temporary cold folder until the process exited, and folders of a process killed with ``kill -9`` stayed in
``$TMPDIR`` for good. Each cell now closes its caches when it ends; the first disk tier of a process removes the
leftovers of dead processes; docs/recall.md says where the files go."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvslim.cache.methods.recall.cold import ColdTier, remove_stale


@pytest.fixture
def tmpdir_only(tmp_path, monkeypatch):
    """This test's own $TMPDIR (tempfile's cached choice too), so other processes' folders are never touched."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _cold_folders(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.name.startswith("kvslim-cold-"))


def test_each_niah_cell_removes_its_cold_folder_when_it_ends(tmpdir_only, tmp_path_factory):
    from kvslim.eval.harness.runner import Grid, run_grid
    from kvslim.eval.harness.tiny import tiny_pair

    seen: list[list[str]] = []
    grid = Grid(task="passkey", model="tiny-llama", recipes=["recall:m=4,k=2,w=16,sinks=2,store=disk"],
                lengths=[400], depths=[0, 0.5, 1], seeds=[0], options={"max_new_tokens": 4})  # fmt: skip
    out = tmp_path_factory.mktemp("niah")
    for batch in (1, 3):
        run_grid(grid, out / str(batch), pair=tiny_pair("tiny-llama"), progress=False, batch=batch,
                 on_record=lambda _r: seen.append(_cold_folders(tmpdir_only)))  # fmt: skip
    assert len(seen) == 2 * 2 * 3  # full and recall, 3 depths, one by one and batched
    assert all(folders == [] for folders in seen), seen


def test_folders_of_a_killed_process_are_removed_by_the_next(tmpdir_only):
    code = ("import time; from kvslim.cache.methods.recall.cold import ColdTier; t = ColdTier('disk'); "
            "s = t.stream('layer0.k', None, None, 'cpu'); print(t.folder, flush=True); time.sleep(120)")  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmpdir_only)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(proc.stdout.readline().strip())
        assert folder.name.startswith(f"kvslim-cold-{proc.pid}-") and folder.is_dir()
        alive = remove_stale()  # its process runs: kept
        assert alive == [] and folder.is_dir()
    finally:
        proc.kill()  # kill -9: no finalizer runs
        proc.wait()
    assert folder.is_dir()
    older = tmpdir_only / "kvslim-cold-abcd1234"  # an older kvslim's name (no pid): left alone
    older.mkdir()
    subprocess.run([sys.executable, "-c", "from kvslim.cache.methods.recall.cold import ColdTier; ColdTier('disk').close()"],
                   env=env, check=True)  # fmt: skip
    assert not folder.exists() and older.is_dir()
    assert _cold_folders(tmpdir_only) == ["kvslim-cold-abcd1234"]


def test_stale_files_in_a_users_folder_are_removed_too(tmp_path):
    dead = 2**22 + 12345  # above pid_max's default: no such process
    (tmp_path / f"layer0.k-{dead}-abcdef12.cold").write_bytes(b"x")
    mine = tmp_path / f"layer0.k-{os.getpid()}-abcdef12.cold"
    mine.write_bytes(b"x")
    other = tmp_path / "notes-1-2.txt"
    other.write_bytes(b"x")
    assert remove_stale(tmp_path) == [tmp_path / f"layer0.k-{dead}-abcdef12.cold"]
    assert mine.exists() and other.exists()
    tier = ColdTier("disk", tmp_path)
    tier.close()


def test_docs_say_where_cold_files_go():
    text = (Path(__file__).parent.parent / "docs" / "recall.md").read_text()
    assert "kvslim-cold-<pid>-" in text and "kill -9" in text and "TMPDIR" in text
