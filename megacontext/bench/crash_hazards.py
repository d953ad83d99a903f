"""The kill campaign's hazards: the disk filling up mid-ingest, a read-only tree directory, and
two writers at once. Each must end with a one-line error (``megacontext ingest: error: ...``,
no traceback) and a sound tree that holds what was committed; once the cause is gone the same
command finishes, equal byte for byte to an ingest that met no hazard.

Where the machine allows (root and ``unshare``), the full disk is real: the ingest runs in a
mount namespace of its own on a ``tmpfs`` smaller than the tree, and the read-only directory is
a read-only bind mount of the tree over itself, both gone when the command ends. Otherwise the
disk is filled by :class:`DiskFull` (the tree's ``os.pwrite``/``os.write`` raise ``ENOSPC``
past a budget, in this process) and the tree made read-only by ``chmod a-w`` (not root) or by
:class:`ReadOnly` (every write-open under the tree raises ``EROFS``, in this process). Each
result says which (``how``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shlex
import shutil
import signal
import subprocess
import time
from functools import cache
from pathlib import Path

import numpy as np

from megacontext.bench.crash_setup import (
    REPO,
    Setup,
    committed_tokens,
    env,
    ingest_cmd,
    lost_and_duplicated,
    run,
    same_bytes,
    tree_state,
)


class DiskFull:
    """``os.pwrite`` and ``os.write`` raise ``OSError(ENOSPC)`` once ``budget`` more bytes were
    written (what a full disk does), until the context ends."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __enter__(self):
        self.pwrite, self.write = os.pwrite, os.write

        def full(n: int) -> None:
            self.budget -= n
            if self.budget < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def pwrite(fd, data, offset):
            full(len(data))
            return self.pwrite(fd, data, offset)

        def write(fd, data):
            full(len(data))
            return self.write(fd, data)

        os.pwrite, os.write = pwrite, write
        return self

    def __exit__(self, *exc) -> None:
        os.pwrite, os.write = self.pwrite, self.write


class ReadOnly:
    """Opening a file under ``root`` for writing, and creating, renaming, truncating or
    removing there, raise ``OSError(EROFS)``, as on a read-only mount, until the context ends."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _inside(self, path) -> bool:
        try:
            return self.root in Path(os.fsdecode(path)).resolve().parents
        except (TypeError, ValueError):
            return False

    def __enter__(self):
        self.saved = os.open, os.replace, os.rename, os.truncate, os.unlink
        real_open = self.saved[0]
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

        def refuse(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            if flags & writes and self._inside(path):
                refuse(path)
            return real_open(path, flags, mode, dir_fd=dir_fd)

        def guard(real):
            def call(path, *a, **k):
                if self._inside(path):
                    refuse(path)
                return real(path, *a, **k)
            return call

        os.open = open_
        os.replace, os.rename, os.truncate, os.unlink = (guard(f) for f in self.saved[1:])
        return self

    def __exit__(self, *exc) -> None:
        os.open, os.replace, os.rename, os.truncate, os.unlink = self.saved


@cache
def can_mount() -> bool:
    """Whether this process can make a private mount namespace and mount a tmpfs in it."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"megacontext-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        return subprocess.run(["unshare", "--mount", "sh", "-c",
                               f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(probe))}"],
                              capture_output=True).returncode == 0
    finally:
        probe.rmdir()


def one_line_error(stderr: str) -> bool:
    """The CLI's failure shape: exactly one line, ``megacontext ingest: error: ...``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("megacontext ingest: error: ")


def last_line(stderr: str) -> str:
    return (stderr.strip().splitlines() or [""])[-1]


def cli_in_process(argv: list[str]) -> tuple[int, str]:
    """``megacontext ARGV`` in this process: (exit status, stderr)."""
    from megacontext.cli import main as cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli(argv)
    return code, err.getvalue()


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def full_disk(s: Setup, inputs: list[Path], stream: np.ndarray, ref: Path) -> dict:
    """The ingest's disk holds 60 % of the finished tree: it fails, the tree it leaves is
    sound, holds a prefix, and resumes (with room again) to the reference tree."""
    tree = s.root / "enospc"
    budget = int(0.6 * tree_size(ref))
    if can_mount():
        mount = s.root / "enospc-disk"
        mount.mkdir()
        inner = shlex.join(ingest_cmd(s, mount / "tree", inputs))
        q = shlex.quote
        script = (f"mount -t tmpfs -o size={budget} tmpfs {q(str(mount))} || exit 99; "
                  f"{inner}; rc=$?; cp -a {q(str(mount / 'tree'))} {q(str(tree))}; exit $rc")
        out = run(["unshare", "--mount", "sh", "-c", script])
        assert out.returncode != 99, f"tmpfs mount failed: {out.stderr}"
        mount.rmdir()
        code, err, how = out.returncode, out.stderr, f"a tmpfs of {budget:,} bytes"
    else:
        with DiskFull(budget):
            code, err = cli_in_process(ingest_cmd(s, tree, inputs)[3:])
        how = f"os.pwrite/os.write raise ENOSPC after {budget:,} bytes (in process)"
    state = tree_state(tree, stream)
    resumed = run(ingest_cmd(s, tree, inputs))
    lost, dup = lost_and_duplicated(tree, stream)
    r = {"how": how, "exit": code, "error": last_line(err),
         "one_line": code == 2 and one_line_error(err) and "No space left on device" in err,
         "sound": state.exists and not state.problems and state.prefix,
         "committed": state.tokens, "mid_stream": 0 < state.tokens < stream.size,
         "resumed": resumed.returncode == 0 and lost == dup == 0 and same_bytes(tree, ref)}
    shutil.rmtree(tree)
    return r


def read_only(s: Setup, inputs: list[Path], stream: np.ndarray, ref: Path) -> dict:
    """A tree holding the first input, made read-only, asked to ingest them all: refused
    before any byte changes; writable again, the same command finishes to the reference."""
    tree = s.root / "readonly"
    run(ingest_cmd(s, tree, inputs[:1]), check=True)
    before = {p.name: p.read_bytes() for p in tree.iterdir() if p.is_file()}
    cmd = ingest_cmd(s, tree, inputs)
    if can_mount():
        q = shlex.quote(str(tree))
        out = run(["unshare", "--mount", "sh", "-c",
                   f"mount --bind -o ro {q} {q} || exit 99; exec {shlex.join(cmd)}"])
        assert out.returncode != 99, f"read-only bind mount failed: {out.stderr}"
        code, err, how = out.returncode, out.stderr, "a read-only bind mount of the tree"
    elif os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [tree, *tree.iterdir()]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            out = run(cmd)
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        code, err, how = out.returncode, out.stderr, "chmod a-w of the tree and its files"
    else:  # root ignores permissions and cannot mount here: refuse writes in this process
        with ReadOnly(tree):
            code, err = cli_in_process(cmd[3:])
        how = "EROFS on every write under the tree (in process)"
    unchanged = before == {p.name: p.read_bytes() for p in tree.iterdir() if p.is_file()}
    state = tree_state(tree, stream)
    resumed = run(cmd)
    r = {"how": how, "exit": code, "error": last_line(err),
         "one_line": code == 2 and one_line_error(err) and "is not writable" in err,
         "sound": unchanged and not state.problems and state.prefix,
         "resumed": resumed.returncode == 0 and same_bytes(tree, ref)}
    shutil.rmtree(tree)
    return r


def two_writers(s: Setup, inputs: list[Path], stream: np.ndarray, ref: Path) -> dict:
    """A second ingest while a first one is mid-work (stopped by SIGSTOP after its first
    commit, so it holds the tree for as long as the second one takes): the second is refused;
    the first, continued, finishes to the reference tree."""
    tree = s.root / "two-writers"
    first = subprocess.Popen(ingest_cmd(s, tree, inputs), env=env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while committed_tokens(tree) <= 0 and first.poll() is None:
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)
    held = committed_tokens(tree)
    try:
        second = run(ingest_cmd(s, tree, inputs))
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate()
    lost, dup = lost_and_duplicated(tree, stream)
    state = tree_state(tree, stream)
    r = {"how": f"the first ingest stopped at {held:,} of {stream.size:,} tokens",
         "exit": second.returncode, "error": last_line(second.stderr),
         "one_line": second.returncode == 2 and one_line_error(second.stderr)
         and "already open for append by another writer" in second.stderr,
         "mid_stream": 0 < held < stream.size,
         "sound": not state.problems and state.prefix,
         "resumed": first.returncode == 0 and lost == dup == 0 and same_bytes(tree, ref),
         "first_error": last_line(first_err)}
    shutil.rmtree(tree)
    return r


def two_starts(s: Setup, inputs: list[Path], stream: np.ndarray, ref: Path) -> dict:
    """Two ingests of the same inputs into a new tree, started at the same moment: whichever
    way they interleave, each ends with success or a one-line refusal, and the tree holds the
    stream once."""
    tree = s.root / "two-starts"
    procs = [subprocess.Popen(ingest_cmd(s, tree, inputs), env=env(), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate() for p in procs]
    codes = [p.returncode for p in procs]
    lost, dup = lost_and_duplicated(tree, stream)
    state = tree_state(tree, stream)
    errors = [last_line(err) for (_, err), code in zip(outs, codes, strict=True) if code]
    r = {"how": "both started at once on a new tree", "exit": codes,
         "error": "; ".join(errors) or "none (the later one found every input held)",
         "one_line": 0 in codes and all(c == 0 or (c == 2 and one_line_error(err))
                                        for c, (_, err) in zip(codes, outs, strict=True)),
         "sound": not state.problems and state.prefix,
         "resumed": lost == dup == 0 and same_bytes(tree, ref)}
    shutil.rmtree(tree)
    return r


def hazards(s: Setup) -> dict:
    """Every hazard on the distributed part's (shorter) inputs; ``ok`` per hazard."""
    inputs, stream = s.merge_inputs, s.merge_stream
    ref = s.root / "hazard-reference"
    run(ingest_cmd(s, ref, inputs), check=True)
    results = {}
    for name, hazard in (("enospc", full_disk), ("read_only", read_only),
                         ("two_writers", two_writers), ("two_starts", two_starts)):
        t0 = time.perf_counter()
        results[name] = r = hazard(s, inputs, stream, ref)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["ok"] = bool(r["one_line"] and r["sound"] and r["resumed"]
                       and r.get("mid_stream", True))
    shutil.rmtree(ref)
    return results
