"""The writing half of `MegaContextTree`: appends and the atomic commit.

`TreeWriter` is a mixin of `MegaContextTree` (`tree.py`), which holds the handle's state
(`_files`, `_h`, `_layout`, `_rope`, `_path`) and its checks (`_check_writable`, `_level`).
Appends go straight to the array files (bounded RAM at any tree size); only `commit()` makes
them part of the tree, by atomically replacing the header that holds every level's committed
count. The crash-safety argument is in `commit`'s docstring and `docs/tree-format.md`.

Axis legend: `n` tokens, `g` gists (nodes of one level), `c` hidden size, `k` level.
"""

from __future__ import annotations

import numpy as np
import torch

from megacontext.dtypes import TORCH_DTYPES
from megacontext.spans import parents
from megacontext.tree import format as fmt


class TreeWriter:
    """Appends (tokens, gists with their centers and phases), commit and discard of an open
    tree. Mixed into `MegaContextTree`; every method needs the tree open with mode "a"."""

    def append_tokens(self, ids) -> None:
        """Append token ids (uncommitted until `commit()`).

        Args:
            ids: `[n]` integer tensor, array or sequence; every id in `[0, vocab_size)`.

        Raises:
            TypeError: ids are not integers.
            ValueError: not 1-D, or an id is outside the vocabulary (the first one named with
                its index); nothing is written then.
        """
        self._check_writable()
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"token ids must be integers, got a tensor of {ids.dtype}")
            arr = ids.detach().cpu().numpy()
        elif isinstance(ids, np.ndarray):
            arr = ids
        else:
            arr = np.asarray(ids)
            if arr.size == 0:
                return
        if arr.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"token ids must be 1-D [n], got shape {tuple(arr.shape)}")
        if arr.size == 0:
            return
        vocab = self.vocab_size
        bad = (arr < 0) | (arr >= vocab)
        if bad.any():
            i = int(bad.argmax())
            raise ValueError(
                f"token id {int(arr[i])} at index {i} is outside the vocabulary [0, {vocab}) "
                f"of tree at {self._path}; nothing was appended"
            )
        self._files[fmt.data_name(0)].append(arr.astype(self._layout.record_dtype(fmt.data_name(0))))

    def append_gists(self, level: int, gists) -> None:
        """Append gists to a level (uncommitted until `commit()`); centers and phases follow.

        The new gists are nodes `appended_count(level) …` of `level`; their children must
        already be appended.

        Args:
            level: 1 … levels.
            gists: `[g, c]` floating tensor or array; stored in the tree's gist dtype.

        Raises:
            TypeError: not floating point.
            ValueError: wrong shape or width; more gists than complete child spans; a NaN/inf
                (or a value that overflows the gist dtype), naming the level and row. Nothing is
                written then.
        """
        self._check_writable()
        level = self._level(level)
        x = torch.from_numpy(gists) if isinstance(gists, np.ndarray) else gists
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"gists must be a tensor or array, got {type(gists).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"gists must be floating point, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(
                f"gists for level {level} must be [g, {self.hidden_size}] (hidden_size of tree at "
                f"{self._path}), got shape {tuple(x.shape)}"
            )
        g = x.shape[0]
        if g == 0:
            return
        data = self._files[fmt.data_name(level)]
        first = data.count
        children = self.appended_count(level - 1)
        complete = parents(children, self.span)
        if first + g > complete:
            raise ValueError(
                f"level {level} would have {first + g} gists but level {level - 1} has only "
                f"{children} records = {complete} complete spans of {self.span}; "
                f"append the children first"
            )
        x = x.detach().cpu()
        stored = x.to(TORCH_DTYPES[self.gist_dtype])  # [g, c]
        for tensor, why in ((x, "is NaN or inf"), (stored, f"overflows {self.gist_dtype}")):
            finite = torch.isfinite(tensor).all(dim=1)  # [g]
            if not bool(finite.all()):
                row = int((~finite).int().argmax())
                raise ValueError(
                    f"gist row {row} (level {level} node {first + row}) {why}; nothing was "
                    f"appended to tree at {self._path}"
                )
        if self.gist_dtype == "bfloat16":
            arr = stored.view(torch.int16).numpy().view("<u2")
        else:
            arr = stored.numpy().astype(self._layout.record_dtype(data.name).base, copy=False)
        meta_file = self._files[fmt.meta_name(level)]
        meta = fmt.node_metadata(level, first, first + g, self._rope, self.span)  # [g]
        saved = [(f, f.count, f.tail_crc, list(f.done_crcs)) for f in (data, meta_file)]
        try:
            data.append(arr)
            meta_file.append(meta)
        except BaseException:
            for f, n, tail, done in saved:
                f.rollback(n, tail, done)
            raise

    def commit(self, extra: dict | None = None) -> None:
        """Make every append since the last commit durable and visible, atomically.

        ``extra`` (JSON-ready) is merged into the header's ``extra`` object in the same atomic
        header replacement, so notes about the data (e.g. how far an ingest got) can never
        disagree with the committed counts.

        Protocol (the order is the crash safety): (1) fsync every data and metadata file,
        (2) write the checksums of newly completed chunks and fsync them, (3) write the new
        header (counts and tail checksums) to a temporary file, fsync it, `os.replace` it over
        header.json and fsync the directory. The header is the only thing that says how much
        of each file is real, and it changes last and atomically: a crash before (3) leaves
        the old header, whose counts point only at bytes that were already durable, and any
        bytes beyond them are an uncommitted tail that open() ignores or truncates. Reversing
        (1) and (3) could durably commit counts that point at bytes the disk never got.

        Raises:
            ValueError: count(k) != count(k−1) // 32 for some gist level (names every one);
                nothing is committed then and the appends stay pending.
        """
        self._check_writable()
        counts = [self.appended_count(k) for k in range(self.levels + 1)]
        bad = [
            f"level {k} has {counts[k]} gists but level {k - 1} has {counts[k - 1]} records, "
            f"so it needs {counts[k - 1]} // {self.span} = {counts[k - 1] // self.span}"
            for k in range(1, self.levels + 1)
            if counts[k] != parents(counts[k - 1], self.span)
        ]
        if bad:
            raise ValueError(f"cannot commit tree at {self._path}: " + "; ".join(bad))
        if counts == self._h["counts"] and not extra and not self._inputs.pending:
            return
        for f in self._files.values():  # (1) + (2)
            f.sync()
        inputs = self._inputs.sync()  # records ride in the same header replacement
        h = dict(self._h)
        if extra:
            h["extra"] = {**h.get("extra", {}), **extra}
        h["counts"] = counts
        h["tail_crc32"] = {name: f.tail_crc for name, f in self._files.items()}
        if inputs["count"] or "inputs" in h:
            h["inputs"] = inputs
        h["updated"] = fmt.utc_now()
        fmt.write_header(self._path, h)  # (3)
        for f in self._files.values():
            f.mark_committed()
        self._inputs.mark_committed(inputs)
        self._h = h

    def append_inputs(self, records: list[dict]) -> None:
        """Queue input records (JSON-ready dicts) for the tree's inputs log; the next
        `commit()` makes them durable and visible atomically with the counts, so a record
        is committed exactly when the data appended with it is (see `tree/inputs.py`)."""
        self._check_writable()
        self._inputs.append(records)

    def discard(self) -> None:
        """Drop every uncommitted append (truncate the files back to the committed sizes)."""
        self._check_writable()
        for f in self._files.values():
            f.truncate_to_committed()
        self._inputs.truncate_to_committed()
