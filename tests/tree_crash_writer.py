"""Helper process for tests/test_tree.py: commit a tree, then die by SIGKILL mid-commit.

Usage: python tests/tree_crash_writer.py TREE_DIR

Commits 3000 tokens and their gists, appends 2000 more tokens and gists, then calls
`commit()` with the header writer replaced by one that writes half of the temporary header,
fsyncs it and kills the process, i.e. after the data files were fsynced and before the
atomic rename. The test then checks that the tree opens with exactly the first commit.
"""

import os
import signal
import sys

import torch

from megacontext.rope import RopeConfig
from megacontext.tree import MegaContextTree
from megacontext.tree import format as fmt


def gists_for(level: int, start: int, stop: int, hidden: int = 8) -> torch.Tensor:
    """Deterministic gists of nodes [start, stop) of a level: [g, hidden] float32."""
    i = torch.arange(start, stop, dtype=torch.float64)[:, None]
    j = torch.arange(hidden, dtype=torch.float64)[None, :]
    return (torch.sin(0.37 * i + j + level) * (level + 1)).float()


def fill(tree: MegaContextTree, ids: torch.Tensor) -> None:
    """Append ids and every gist their completion allows (the ingest's order)."""
    tree.append_tokens(ids)
    for k in range(1, tree.levels + 1):
        have, want = tree.appended_count(k), tree.appended_count(k - 1) // tree.span
        tree.append_gists(k, gists_for(k, have, want))


def main(path: str) -> None:
    tree = MegaContextTree.create(path, hidden_size=8, vocab_size=500,
                                  rope=RopeConfig(8, 10000.0), fingerprint={"name": "crash"},
                                  checksum_chunk_records=64)
    ids = torch.arange(5000) % 500
    fill(tree, ids[:3000])
    tree.commit()
    fill(tree, ids[3000:])

    def torn_header(root, header):
        data = b'{"format": "megacontext-tree", "counts": [5000, 156'
        with open(os.path.join(root, fmt.HEADER_TMP_NAME), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    fmt.write_header = torn_header
    tree.commit()
    raise AssertionError("unreachable: the process should have been killed")


if __name__ == "__main__":
    main(sys.argv[1])
