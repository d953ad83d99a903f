"""The kill campaign (megacontext.bench.crash) in short: SIGKILLs mid-ingest, mid-merge and
mid-training, a full disk, a read-only tree and two writers — each leaves a sound tree (or a
checkpoint that resumes bit for bit) and nothing lost or duplicated."""

from __future__ import annotations

import os
import random

import pytest

from megacontext.bench import crash, crash_hazards
from megacontext.bench.crash_setup import make_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # ~1.3M BPE tokens to ingest (~2 s of work after ~1 s of start-up), ~0.17M to merge
    return make_setup(tmp_path_factory.mktemp("crash"), 1_500_000, 200_000, seed=3)


def test_the_stream_is_bpe_tokens_of_documents_longer_than_a_read(setup):
    assert 0.5 < setup.stream.size / 1_500_000 < 0.95  # merges: fewer tokens than characters
    assert setup.inputs[0].stat().st_size > 1 << 20  # read in two pieces, cut exactly


def test_ingest_killed_three_times_mid_work_resumes_to_the_uninterrupted_tree(setup):
    r = crash.ingest_campaign(setup, 3, random.Random(1))
    assert r["kills_mid_work"] == 3
    assert all(0 <= n < r["tokens"] for n in r["committed_at_kill"])
    assert r["unsound_after_kill"] == r["not_prefix_after_kill"] == 0
    assert r["tokens_lost"] == r["tokens_duplicated"] == r["rerun_appended_tokens"] == 0
    assert r["rounds_equal_to_reference"] == r["rounds"] >= 1
    assert r["ok"]


def test_merge_killed_midway_resumes_to_the_serial_tree(setup):
    r = crash.merge_campaign(setup, 1, random.Random(2))
    assert r["kills_mid_merge"] == 1 and 0 <= r["committed_at_kill"][0] < r["tokens"]
    assert r["tokens_lost"] == r["tokens_duplicated"] == 0
    assert r["rounds_equal_to_serial"] == r["rounds"] >= 1 and r["ok"]


def test_training_killed_midway_resumes_bit_for_bit(setup):
    r = crash.train_campaign(setup, 1, random.Random(3), steps=60, every=6)
    assert r["kills_mid_training"] == 1 and 0 <= r["step_at_kill"][0] < 60
    assert r["mismatched_tensors"] == [] and r["rounds_bit_identical"] == r["rounds"]
    assert r["ok"]


def test_full_disk_read_only_tree_and_two_writers_fail_clearly_and_leave_a_sound_tree(setup):
    r = crash_hazards.hazards(setup)
    enospc = r["enospc"]
    assert enospc["exit"] == 2 and "No space left on device (ENOSPC)" in enospc["error"]
    assert f"writing tree at {setup.root / 'enospc'}" in enospc["error"] or \
        "enospc-disk" in enospc["error"]
    assert enospc["mid_stream"] and enospc["sound"] and enospc["resumed"]
    assert r["read_only"]["exit"] == 2 and r["read_only"]["sound"]
    assert "is not writable" in r["read_only"]["error"]
    assert r["two_writers"]["exit"] == 2 and r["two_writers"]["mid_stream"]
    assert "already open for append by another writer" in r["two_writers"]["error"]
    assert 0 in r["two_starts"]["exit"]
    assert all(part["ok"] and part["one_line"] and part["sound"] and part["resumed"]
               for part in r.values()), r


def test_disk_full_raises_only_past_its_budget(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with crash_hazards.DiskFull(10):
            assert os.pwrite(fd, b"x" * 10, 0) == 10
            with pytest.raises(OSError, match="No space left"):
                os.pwrite(fd, b"y", 10)
        assert os.pwrite(fd, b"z", 10) == 1  # restored
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 10 + b"z"


def test_read_only_refuses_writes_under_its_root_only(tmp_path):
    (tmp_path / "t").mkdir()
    inside, outside = tmp_path / "t" / "f", tmp_path / "g"
    with crash_hazards.ReadOnly(tmp_path / "t"):
        with pytest.raises(OSError, match="Read-only file system"):
            os.open(inside, os.O_WRONLY | os.O_CREAT)
        os.close(os.open(outside, os.O_WRONLY | os.O_CREAT))
    os.close(os.open(inside, os.O_WRONLY | os.O_CREAT))  # restored
