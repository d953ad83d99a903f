"""LensNet, the learned focus scorer, in one home: the net and its export, the allocator's
scorer ``lens``, and the labelled examples it is trained on.

Modules: ``model`` (:class:`LensNet`, :class:`LensConfig`, ``node_features``, ``save_lens`` /
``load_lens``, ``ranking_loss``, ``flops_per_node``), ``scorer`` (:class:`LensScorer`, which
``megacontext.allocator`` registers as ``lens``) and ``data`` (the examples: memories, planted
facts, full-detail values measured by the frozen base model). This package imports only the
model and the scorer, which read nothing of the project but ``spans`` and ``exports``, so the
allocator can import it; ``data`` builds memories with the base model, the ingestor and the
allocator, and is imported explicitly (``from megacontext.lens.data import ...``). The
Lightning training glue is ``megacontext.training.lens``; docs/focus.md has the recipe.
"""

from megacontext.lens.model import (
    LensConfig,
    LensNet,
    flops_per_node,
    load_lens,
    node_features,
    ranking_loss,
    save_lens,
)
from megacontext.lens.scorer import LensScorer

__all__ = ["LensConfig", "LensNet", "LensScorer", "flops_per_node", "load_lens", "node_features",
           "ranking_loss", "save_lens"]
