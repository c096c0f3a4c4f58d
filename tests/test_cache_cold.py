"""The cold tier: exact rows in RAM and on disk, codecs, exact byte counts, and faults named by path."""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvslim.cache.methods.recall.cold import ColdTier, check_cold_codec
from kvslim.errors import ColdTierError, InvalidInput


def _stream(tier, codec="none", d=16, name="l0.k"):
    return tier.stream(name, check_cold_codec(codec, d), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_rows_round_trip_exactly(store):
    tier = ColdTier(store)
    s = _stream(tier)
    x = torch.randn(2, 3, 300, 16)
    s.append(x[:, :, :7])
    s.append(x[:, :, 7:])  # crosses the first reservation step (256 tokens)
    assert s.n == 300 and s.nbytes() == 300 * 2 * 3 * 16 * 4
    assert torch.equal(s.read(0, 300), x)
    idx = torch.randint(0, 300, (2, 3, 11))
    got = s.fetch(idx)
    assert torch.equal(got, x.gather(2, idx[..., None].expand(2, 3, 11, 16)))
    assert s.fetched_bytes == 2 * 3 * 11 * 16 * 4
    assert s.reserved_nbytes() >= s.nbytes()
    tier.close()


@pytest.mark.parametrize("codec,bytes_per_row", [("fp16", 32), ("fp8", 16 + 4), ("tq4", 8 + 2)])
def test_codec_rows_match_the_codec(codec, bytes_per_row):
    tier = ColdTier("disk")
    s = _stream(tier, codec)
    x = torch.randn(1, 2, 40, 16)
    s.append(x)
    c = check_cold_codec(codec, 16)
    want = c.decode(c.encode(x)).float()
    assert torch.equal(s.read(0, 40), want)
    assert s.nbytes() == 40 * 2 * bytes_per_row
    tier.close()


def test_refuses_codecs_that_share_state_between_tokens():
    with pytest.raises(InvalidInput, match="kivi2"):
        check_cold_codec("kivi2", 16)


def test_folder_missing_or_not_writable(tmp_path):
    with pytest.raises(InvalidInput, match=str(tmp_path / "nope")):
        ColdTier("disk", tmp_path / "nope")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InvalidInput, match="not a directory"):
        ColdTier("disk", afile)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not apply
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(InvalidInput, match="not writable"):
            ColdTier("disk", ro)
    finally:
        ro.chmod(0o700)
    with pytest.raises(InvalidInput, match="ram|disk"):
        ColdTier("flash")


def test_user_folder_keeps_folder_removes_files(tmp_path):
    tier = ColdTier("disk", tmp_path)
    s = _stream(tier)
    s.append(torch.randn(1, 1, 5, 16))
    assert [p.name for p in tmp_path.glob("l0.k-*.cold")] == [s.path.name]
    tier.close()
    assert tmp_path.exists() and not list(tmp_path.glob("*.cold"))


def test_temporary_folder_removed_when_collected():
    tier = ColdTier("disk")
    s = _stream(tier)
    s.append(torch.randn(1, 1, 5, 16))
    folder = tier.folder
    assert folder.exists()
    del tier, s
    gc.collect()
    assert not folder.exists()


def test_deleted_file_is_reported_with_its_path(tmp_path):
    tier = ColdTier("disk", tmp_path)
    s = _stream(tier)
    s.append(torch.randn(1, 1, 5, 16))
    os.unlink(s.path)
    with pytest.raises(ColdTierError, match="deleted") as e:
        s.fetch(torch.zeros(1, 1, 1, dtype=torch.long))
    assert str(s.path) in str(e.value)


def test_truncated_file_is_reported_with_its_path(tmp_path):
    tier = ColdTier("disk", tmp_path)
    s = _stream(tier)
    s.append(torch.randn(1, 1, 5, 16))
    os.truncate(s.path, 100)
    with pytest.raises(ColdTierError, match="truncated") as e:
        s.read(0, 5)
    assert str(s.path) in str(e.value)


def test_full_disk_while_reserving_is_reported(tmp_path, monkeypatch):
    tier = ColdTier("disk", tmp_path)
    s = _stream(tier)
    s.append(torch.randn(1, 1, 5, 16))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ColdTierError, match="No space left") as e:
        s.append(torch.randn(1, 1, 400, 16))
    assert str(s.path) in str(e.value)
    assert s.n == 5  # nothing half-stored
    assert s.read(0, 5).shape == (1, 1, 5, 16)


def test_a_real_file_size_limit_is_reported(tmp_path):
    """A child process with RLIMIT_FSIZE of 64 KiB: the reservation fails for real (EFBIG), not by a patch."""
    code = textwrap.dedent(f"""
        import resource, signal, torch
        from kvslim.cache.methods.recall.cold import ColdTier, check_cold_codec
        from kvslim.errors import ColdTierError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        s = ColdTier("disk", {str(tmp_path)!r}).stream("l0.v", check_cold_codec("none", 64), torch.float32, "cpu")
        try:
            s.append(torch.randn(1, 8, 600, 64))
        except ColdTierError as e:
            print("ERR", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR cold file" in out.stdout and "l0.v-" in out.stdout


def test_batch_reorder(tmp_path):
    tier = ColdTier("disk", tmp_path)
    s = _stream(tier)
    x = torch.randn(3, 2, 9, 16)
    s.append(x)
    s.select_batch(lambda t: t[torch.tensor([2, 0])])
    assert torch.equal(s.read(0, 9), x[[2, 0]])


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_deep_copy_has_its_own_rows(store, tmp_path):
    import copy

    tier = ColdTier(store, tmp_path if store == "disk" else None)
    s = _stream(tier)
    x = torch.randn(1, 2, 30, 16)
    s.append(x)
    c = copy.deepcopy(s)
    c.append(torch.zeros(1, 2, 5, 16))
    assert s.n == 30 and c.n == 35 and torch.equal(c.read(0, 30), x)
    if store == "disk":
        assert c.path != s.path and c.path.parent == tmp_path
    del c
    gc.collect()
    assert torch.equal(s.read(0, 30), x)
