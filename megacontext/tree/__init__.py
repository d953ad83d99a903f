"""The memory tree: token ids and gists on disk, append-only, crash-safe (storage only).

`MegaContextTree` is the handle (create/open, reads, appends, commit); `verify(path)` checks a
tree's integrity without trusting it. The byte layout is documented in `docs/tree-format.md`.
"""

from megacontext.tree.format import FORMAT_VERSION
from megacontext.tree.tree import MegaContextTree
from megacontext.tree.verify import verify

__all__ = ["FORMAT_VERSION", "MegaContextTree", "verify"]
