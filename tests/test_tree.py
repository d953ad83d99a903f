"""Tests for megacontext.tree: round trips, the byte format, crash safety, integrity checks."""

import json
import math
import os
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tree_crash_writer import fill, gists_for

from megacontext.rope import RopeConfig
from megacontext.tree import MegaContextTree, verify
from megacontext.tree import format as fmt

ROPE = RopeConfig(8, 10000.0)
FP = {"name": "tiny", "hidden_size": 8, "vocab_size": 500, "tokenizer_sha256": "ab" * 32}


def make(path, levels=2, gist_dtype="float16", vocab_size=500, chunk=64, **kw):
    return MegaContextTree.create(path, hidden_size=8, vocab_size=vocab_size, rope=ROPE,
                                  fingerprint=FP, levels=levels, gist_dtype=gist_dtype,
                                  checksum_chunk_records=chunk, **kw)


def ids_for(n, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def reference_phases(centers, head_dim=8, theta=10000.0):
    """(c·θ_j) mod 2π in 60-digit arithmetic, θ_j = theta^(−2j/d) in float64: [g, d/2]."""
    mpmath.mp.dps = 60
    two_pi = 2 * mpmath.pi
    out = []
    for c in centers:
        row = []
        for j in range(head_dim // 2):
            th = theta ** (-2 * j / head_dim)
            row.append(float(mpmath.fmod(mpmath.mpf(float(c)) * mpmath.mpf(th), two_pi)))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def assert_phases_close(got, want, atol=1e-5):
    """Angles equal modulo 2π within atol rad."""
    d = (got.double() - want + math.pi) % (2 * math.pi) - math.pi
    assert d.abs().max().item() <= atol, d.abs().max().item()


def exact_centers(level, n, span=32):
    """i·s^k + (s^k − 1)/2 with exact rationals."""
    size = span**level
    return [float(Fraction(i * size) + Fraction(size - 1, 2)) for i in range(n)]


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("gist_dtype", ["float16", "bfloat16", "float32"])
def test_round_trip(tmp_path, gist_dtype):
    ids = ids_for(3000)
    with make(tmp_path / "t", gist_dtype=gist_dtype) as t:
        fill(t, ids[:1000])
        t.commit()
        fill(t, ids[1000:])
        t.commit()
    t = MegaContextTree.open(tmp_path / "t")
    assert t.num_tokens == 3000 and [t.count(k) for k in range(3)] == [3000, 93, 2]
    assert torch.equal(t.tokens(), ids) and t.tokens().dtype == torch.int64
    assert torch.equal(t.tokens(100, 164), ids[100:164])
    torch_dtype = getattr(torch, gist_dtype)
    for k in (1, 2):
        want = gists_for(k, 0, t.count(k)).to(torch_dtype).float()
        got = t.gists(k)
        assert got.dtype == torch.float32 and got.shape == (t.count(k), 8)
        assert torch.equal(got, want)
        assert t.centers(k).tolist() == exact_centers(k, t.count(k))
        assert t.centers(k).dtype == torch.float64
        ph = t.phases(k)
        assert ph.dtype == torch.float32 and ph.shape == (t.count(k), 4)
        assert_phases_close(ph, reference_phases(exact_centers(k, t.count(k))))
    assert t.centers(1, 0, 2).tolist() == [15.5, 47.5] and t.centers(2, 0, 1).item() == 511.5
    assert verify(tmp_path / "t") == [] and t.verify() == []
    # bytes on disk: per level the data, metadata and checksum files
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "t").iterdir()}
    assert sizes["level0.tokens"] == 3000 * 2
    rec = {"float16": 2, "bfloat16": 2, "float32": 4}[gist_dtype] * 8
    assert sizes["level1.gists"] == 93 * rec and sizes["level1.meta"] == 93 * (8 + 4 * 4)
    assert sizes["level1.gists.crc32"] == (93 // 64) * 4
    assert t.nbytes(1) == sum(v for n, v in sizes.items() if n.startswith("level1."))
    info = t.info()
    assert info["num_tokens"] == 3000 and info["counts"] == [3000, 93, 2]
    assert info["bytes_per_level"] == [t.nbytes(k) for k in range(3)]
    assert info["fingerprint"] == FP and info["rope"] == ROPE.to_dict()
    assert info["format_version"] == fmt.FORMAT_VERSION
    json.dumps(info)
    t.close()


def test_phases_near_a_billion_through_the_tree(tmp_path):
    """Forge a committed prefix of 2^30 tokens (sparse files), then append through the API."""
    n0 = 1 << 30
    counts = [n0, n0 // 32, n0 // 1024]
    with make(tmp_path / "t", chunk=1 << 16):
        pass
    root = tmp_path / "t"
    h = fmt.read_header(root)
    layout = fmt.layout_from_header(h)
    for level, name in layout.array_names():
        os.truncate(root / name, counts[level] * layout.record_bytes(name))  # sparse: no I/O
        os.truncate(root / fmt.crc_name(name), counts[level] // (1 << 16) * 4)
    fmt.write_header(root, {**h, "counts": counts})
    with MegaContextTree.open(root, mode="a") as t:
        fill(t, ids_for(1024))
        t.commit()
        assert t.num_tokens == n0 + 1024
        for k, n_new in ((1, 32), (2, 1)):
            first = counts[k]
            centers = t.centers(k, first, first + n_new)
            size = 32**k
            want = [float(Fraction(i * size) + Fraction(size - 1, 2))
                    for i in range(first, first + n_new)]
            assert centers.tolist() == want and centers[0].item() > 1e9
            assert_phases_close(t.phases(k, first, first + n_new), reference_phases(want))
            assert torch.equal(t.gists(k, first, first + n_new),
                               gists_for(k, first, first + n_new).half().float())
        assert torch.equal(t.tokens(n0, n0 + 1024), ids_for(1024))
    # The metadata function itself at level 6 nodes near 2^40 tokens.
    meta = fmt.node_metadata(6, 1000, 1004, ROPE)
    want = exact_centers(6, 1004)[1000:]
    assert meta["center"].tolist() == want
    assert_phases_close(torch.from_numpy(meta["phases"]), reference_phases(want))


@pytest.mark.parametrize("vocab,dtype,width", [(65536, "uint16", 2), (65537, "uint32", 4)])
def test_token_storage_width(tmp_path, vocab, dtype, width):
    ids = torch.tensor([0, 1, vocab - 1, 40000, vocab - 2] * 20)
    with make(tmp_path / "t", vocab_size=vocab) as t:
        fill(t, ids)
        t.commit()
        assert t.token_dtype == dtype
        assert torch.equal(t.tokens(), ids)
    assert (tmp_path / "t" / "level0.tokens").stat().st_size == 100 * width
    raw = np.fromfile(tmp_path / "t" / "level0.tokens", dtype="<" + {2: "u2", 4: "u4"}[width])
    assert raw.tolist() == ids.tolist()  # little-endian, no header in the data file


@pytest.mark.parametrize("levels,n", [(3, 2 * 32**3 + 1000), (6, 40000)])
def test_many_levels(tmp_path, levels, n):
    ids = ids_for(n)
    with make(tmp_path / "t", levels=levels, chunk=1000) as t:
        for a in range(0, n, 7000):
            fill(t, ids[a:a + 7000])
            t.commit()
    with MegaContextTree.open(tmp_path / "t") as t:
        assert t.levels == levels
        assert [t.count(k) for k in range(levels + 1)] == [n // 32**k for k in range(levels + 1)]
        for k in range(1, levels + 1):
            assert t.centers(k).tolist() == exact_centers(k, t.count(k))
            assert torch.equal(t.gists(k), gists_for(k, 0, t.count(k)).half().float())
        assert t.verify() == []
    # the header does not grow with the tree (only the digits of the counts change)
    assert (tmp_path / "t" / "header.json").stat().st_size < 3000


# --------------------------------------------------------------------------------------------
# reopen and crash safety


def test_reopen_keeps_committed_and_drops_uncommitted(tmp_path):
    ids = ids_for(2000)
    root = tmp_path / "t"
    t = make(root)
    fill(t, ids[:1000])
    t.commit()
    fill(t, ids[1000:])  # never committed
    assert t.count(0) == 1000 and t.appended_count(0) == 2000
    # A reader sees only the committed prefix even while the tail sits on disk.
    assert (root / "level0.tokens").stat().st_size == 4000
    with MegaContextTree.open(root) as r:
        assert r.num_tokens == 1000 and torch.equal(r.tokens(), ids[:1000])
        with pytest.raises(ValueError, match="out of bounds"):
            r.tokens(0, 1001)
        t.commit()
        assert r.num_tokens == 1000
        r.refresh()
        assert r.num_tokens == 2000 and torch.equal(r.tokens(1000, 2000), ids[1000:])
    fill(t, ids_for(640, seed=1))
    t.close()  # closing does not commit
    with MegaContextTree.open(root, mode="a") as t:
        assert t.num_tokens == 2000 and t.count(1) == 62
        assert torch.equal(t.tokens(), ids)
        assert (root / "level0.tokens").stat().st_size == 4000
        fill(t, ids_for(64, seed=2))
        t.discard()
        assert t.appended_count(0) == 2000 and (root / "level0.tokens").stat().st_size == 4000
    assert verify(root) == []


def test_torn_tail_is_ignored_then_truncated(tmp_path):
    root = tmp_path / "t"
    with make(root, chunk=16) as t:
        fill(t, ids_for(1000))
        t.commit()
    committed = {p.name: p.read_bytes() for p in root.iterdir() if p.name.startswith("level")}
    # Simulate a writer killed before commit: bytes past the committed sizes, a torn temp header.
    for name in committed:
        with open(root / name, "ab") as f:
            f.write(os.urandom(37))
    (root / fmt.HEADER_TMP_NAME).write_bytes(b'{"format": "megacontext-tree", "coun')
    with MegaContextTree.open(root) as r:
        assert r.num_tokens == 1000 and torch.equal(r.tokens(), ids_for(1000))
        assert r.verify() == []
    assert verify(root) == []
    with MegaContextTree.open(root, mode="a") as t:
        assert not (root / fmt.HEADER_TMP_NAME).exists()
        assert {n: (root / n).read_bytes() for n in committed} == committed
        fill(t, ids_for(100, seed=3))
        t.commit()
        assert t.verify() == []


def test_killed_writer_mid_commit(tmp_path):
    """A real SIGKILL after the data fsync and during the header write."""
    root = tmp_path / "t"
    helper = Path(__file__).with_name("tree_crash_writer.py")
    proc = subprocess.run([sys.executable, str(helper), str(root)], capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (root / fmt.HEADER_TMP_NAME).exists()
    assert (root / "level0.tokens").stat().st_size == 5000 * 2  # the tail did reach the disk
    assert verify(root) == []
    ids = torch.arange(5000) % 500
    with MegaContextTree.open(root, mode="a") as t:
        assert [t.count(k) for k in range(3)] == [3000, 93, 2]
        assert torch.equal(t.tokens(), ids[:3000])
        assert torch.equal(t.gists(1), gists_for(1, 0, 93).half().float())
        fill(t, ids[3000:])
        t.commit()
        assert t.verify() == [] and t.count(1) == 156


# --------------------------------------------------------------------------------------------
# bad input and damage


def test_open_with_other_model_names_every_field(tmp_path):
    make(tmp_path / "t", gistnet_digest="abc").close()
    other = {**FP, "name": "big", "tokenizer_sha256": "cd" * 32}
    with pytest.raises(ValueError) as e:
        MegaContextTree.open(tmp_path / "t", expect_fingerprint=other, expect_hidden_size=16,
                             expect_gistnet_digest="xyz")
    msg = str(e.value)
    assert str(tmp_path / "t") in msg and "was built for" in msg
    assert "hidden_size 8, this model has 16" in msg
    assert "fingerprint.name 'tiny', this model has 'big'" in msg
    assert "fingerprint.tokenizer_sha256" in msg and "gistnet_digest 'abc'" in msg
    assert "fingerprint.vocab_size" not in msg
    MegaContextTree.open(tmp_path / "t", expect_fingerprint=FP, expect_hidden_size=8,
                         expect_gistnet_digest="abc").close()


@pytest.mark.parametrize("damage,match", [
    (lambda raw: b"\x00\xffgarbage" * 5, "corrupted or truncated"),
    (lambda raw: raw[: len(raw) // 2], "corrupted or truncated"),
    (lambda raw: raw.replace(b'"format_version": 1', b'"format_version": 7'),
     "unsupported format_version 7"),
    (lambda raw: raw.replace(b'"hidden_size"', b'"hidden"'), "missing keys \\['hidden_size'\\]"),
])
def test_bad_header(tmp_path, damage, match):
    root = tmp_path / "t"
    make(root).close()
    hp = root / "header.json"
    hp.write_bytes(damage(hp.read_bytes()))
    for mode in ("r", "a"):
        with pytest.raises(ValueError, match=match) as e:
            MegaContextTree.open(root, mode=mode)
        assert str(hp) in str(e.value)
    problems = verify(root)
    assert len(problems) == 1 and str(hp) in problems[0]
    assert "does not exist" in verify(tmp_path / "nothing")[0]


def test_truncated_level_file(tmp_path):
    root = tmp_path / "t"
    with make(root) as t:
        fill(t, ids_for(2048))
        t.commit()
    os.truncate(root / "level1.gists", 1000)  # 64 gists of 16 bytes were committed
    problems = verify(root)
    assert len(problems) == 1
    assert "level 1 file level1.gists is truncated at byte offset 1000" in problems[0]
    assert "record 62 (byte offset 992)" in problems[0]
    for mode in ("r", "a"):
        with pytest.raises(ValueError, match="level 1 file level1.gists is truncated at byte "
                                             "offset 1000"):
            MegaContextTree.open(root, mode=mode)
    assert (root / "level1.gists").stat().st_size == 1000  # the writer did not paper over it


@pytest.mark.parametrize("name,offset,chunk_msg", [
    ("level1.gists", 16 * 20 + 3, "chunk 1 (records [16, 32), bytes [256, 512))"),
    ("level1.gists", 16 * 70, "chunk 4 (records [64, 78), bytes [1024, 1248))"),  # tail chunk
    ("level0.tokens", 2 * 500, "chunk 31 (records [496, 512), bytes [992, 1024))"),
])
def test_flipped_byte_is_reported(tmp_path, name, offset, chunk_msg):
    root = tmp_path / "t"
    with make(root, chunk=16) as t:
        fill(t, ids_for(2500))
        t.commit()
    assert verify(root) == []
    with open(root / name, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))
    problems = verify(root)
    level = name[5]
    assert any(f"level {level} file {name}: checksum mismatch in {chunk_msg}" in p
               for p in problems), problems


def test_flipped_metadata_is_reported(tmp_path):
    root = tmp_path / "t"
    with make(root, chunk=16) as t:
        fill(t, ids_for(2500))
        t.commit()
    meta = np.memmap(root / "level1.meta", dtype=fmt.meta_dtype(8), mode="r+")
    meta["center"][5] += 1.0
    meta["phases"][9, 2] += 1e-3
    meta.flush()
    del meta
    problems = "\n".join(verify(root))
    assert "level 1 file level1.meta: checksum mismatch in chunk 0" in problems
    assert "level 1 node 5: stored center 176.5, expected 175.5" in problems
    assert "level 1 node 9: stored phases differ from rope.phases by 0.001" in problems


def test_bad_appends_change_nothing(tmp_path):
    root = tmp_path / "t"
    t = make(root)
    fill(t, ids_for(64))
    t.commit()
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.name.startswith("level")}
    with pytest.raises(ValueError, match="token id 500 at index 3 is outside the vocabulary"):
        t.append_tokens(torch.tensor([1, 2, 3, 500, 7, -1]))
    with pytest.raises(ValueError, match="token id -1 at index 1"):
        t.append_tokens(np.array([4, -1], dtype=np.int32))
    with pytest.raises(TypeError, match="integers"):
        t.append_tokens(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="integers"):
        t.append_tokens([1.5])
    with pytest.raises(ValueError, match="1-D"):
        t.append_tokens(torch.zeros(2, 2, dtype=torch.int64))
    t.append_tokens(ids_for(32, seed=4))
    bad = gists_for(1, 2, 3)
    bad[0, 5] = float("nan")
    with pytest.raises(ValueError, match=r"gist row 0 \(level 1 node 2\) is NaN or inf"):
        t.append_gists(1, bad)
    big = gists_for(1, 2, 3) * 1e6
    with pytest.raises(ValueError, match=r"gist row 0 \(level 1 node 2\) overflows float16"):
        t.append_gists(1, big)
    with pytest.raises(ValueError, match=r"must be \[g, 8\]"):
        t.append_gists(1, torch.zeros(1, 9))
    with pytest.raises(ValueError, match="level 1 would have 4 gists"):
        t.append_gists(1, gists_for(1, 2, 4))
    with pytest.raises(ValueError, match="level 3 is out of range"):
        t.append_gists(3, gists_for(3, 0, 1))
    t.append_tokens([])  # empty appends are no-ops
    t.append_gists(1, torch.zeros(0, 8))
    # count(1) != count(0) // 32: commit refuses, and nothing changes on disk
    with pytest.raises(ValueError, match=r"level 1 has 2 gists but level 0 has 96 records, so "
                                         r"it needs 96 // 32 = 3"):
        t.commit()
    assert t.num_tokens == 64
    assert {n: (root / n).read_bytes()[: len(b)] for n, b in before.items()} == before
    with MegaContextTree.open(root) as r:
        assert r.count(0) == 64 and r.count(1) == 2
    t.append_gists(1, gists_for(1, 2, 3))
    t.commit()
    assert t.num_tokens == 96 and t.verify() == []
    t.close()


def test_create_over_existing_tree_and_single_writer(tmp_path):
    root = tmp_path / "t"
    make(root).close()
    with pytest.raises(FileExistsError, match=str(root)):
        make(root)
    with pytest.raises(ValueError, match="head_dim|hidden_size must be a positive"):
        MegaContextTree.create(tmp_path / "u", hidden_size=0, vocab_size=10, rope=ROPE,
                               fingerprint={})
    with MegaContextTree.open(root, mode="a"):
        with pytest.raises(RuntimeError, match="already open for append"):
            MegaContextTree.open(root, mode="a")
        with MegaContextTree.open(root) as r:
            with pytest.raises(ValueError, match="read-only"):
                r.append_tokens([1])
    MegaContextTree.open(root, mode="a").close()  # the lock was released


def test_a_tree_that_cannot_be_written_is_refused_naming_it(tmp_path, monkeypatch):
    """Appending to a tree on a read-only file system (or without write permission) fails at
    the writer lock, its first write, with a PermissionError naming the tree; reading works."""
    import errno

    from megacontext.tree import files

    root = tmp_path / "t"
    make(root).close()
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and str(root) in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(files.os, "open", read_only)
    with pytest.raises(PermissionError, match=f"tree at {root} is not writable "
                                              r"\(Read-only file system") as e:
        MegaContextTree.open(root, mode="a")
    assert e.value.errno == errno.EROFS
    with MegaContextTree.open(root) as tree:
        assert tree.num_tokens == 0


# --------------------------------------------------------------------------------------------
# property: chunking of appends and commits does not change the tree


def _tree_bytes(root):
    h = json.loads((root / "header.json").read_text())
    files = {p.name: p.read_bytes() for p in root.iterdir() if p.name.startswith("level")}
    return h["counts"], h["tail_crc32"], files


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    commits=st.lists(st.booleans(), min_size=12, max_size=12),
    chunk=st.sampled_from([1, 5, 32, 1000]),
)
def test_chunked_appends_equal_one_append(sizes, commits, chunk):
    ids = ids_for(sum(sizes), seed=7)
    with tempfile.TemporaryDirectory() as d:
        a, b = Path(d) / "a", Path(d) / "b"
        with make(a, levels=2, chunk=chunk) as t:
            fill(t, ids)
            t.commit()
        with make(b, levels=2, chunk=chunk) as t:
            pos = 0
            for size, c in zip(sizes, commits, strict=False):
                t.append_tokens(ids[pos:pos + size])
                pos += size
                for k in (1, 2):  # gists in two uneven pieces
                    have, want = t.appended_count(k), t.appended_count(k - 1) // 32
                    mid = (have + want + 1) // 2
                    t.append_gists(k, gists_for(k, have, mid))
                    t.append_gists(k, gists_for(k, mid, want))
                if c:
                    t.commit()
            t.commit()
        assert _tree_bytes(a) == _tree_bytes(b)
        assert verify(b) == []
