"""The focus allocator: which tree nodes, at which level, fill the working-context budget.

Axes: ``w`` working-context entries, ``c`` hidden size, ``s`` span (32).

A refocus (``FocusAllocator.assemble``), in four steps (docs/allocator.md has the long form):

1. **Cover.** The coarsest legal cover of ``[0, cursor)``: the last ``tail_tokens`` tokens raw,
   the rest tiled greedily by the largest aligned nodes the tree holds (the base-``s`` digits
   of the covered length: at most ``s − 1`` entries per level plus the top level's nodes).
   If even that exceeds the budget, a ``ValueError`` says the minimum. With ``previous``, its
   entries are kept instead where still legal, and the tokens the cursor advanced over enter
   raw (a jump of more than a budget starts over). A cursor within the budget gets the exact
   context: every token raw.
2. **Forced collapses.** While over budget, collapse the least useful complete group of
   ``s`` sibling entries into their parent (frees ``s − 1`` slots).
3. **Refinement.** A max-heap of expandable entries (by score) and a min-heap of collapsible
   groups (by their parent's score): expand the best entry into its ``s`` children while the
   budget has room (``s − 1`` slots) and its score beats ``expand_threshold``; when full,
   collapse the least useful group to pay for it, only if the entry beats the group by more
   than ``collapse_threshold``. Entries changed in the last ``cooldown`` refocuses are left
   alone, and a refocus with ``previous`` makes at most ``max_swaps`` such changes.
4. The entries, sorted by token, become a ``WorkingContext``.

Work per refocus is O(w log w) plus ``s`` scores per change, whatever the tree's size:
only the current entries, their complete groups' parents and the children of expanded
nodes are ever scored or read (``FocusAllocator.last_stats`` counts them).

Modules: ``focus`` (:class:`FocusAllocator`: settings, checks, ``assemble``), ``cover`` (the
coarsest legal cover and carrying a previous cut over), ``refocus`` (the engine: forced
collapses and refinement on two lazy heaps; :class:`RefocusStats`), ``scorers`` (the scorer
protocol, the registry and ``recency``, ``similarity``, ``oracle``, and ``lens``: LensNet, the
learned scorer, whose home is ``megacontext.lens``), ``lexical`` (the query's rare tokens
looked up in the nodes' own tokens: training-free retrieval; through the tree's token index
when it has one, bounded by the budget and the query, else by a scan of the memory, O(memory)
per query) and ``cache`` (gists reused across
refocuses). The package reads the tree (duck-typed), ``megacontext.spans``,
``megacontext.working_context`` and ``megacontext.lens`` (the net and its scorer, not its
training data); it never imports the base model. LensNet's names are re-exported here.
"""

from megacontext.allocator.focus import FocusAllocator, Query
from megacontext.allocator.lexical import LexicalScorer
from megacontext.allocator.refocus import RefocusStats
from megacontext.allocator.scorers import (
    SCORERS,
    OracleScorer,
    RecencyScorer,
    ScoreContext,
    Scorer,
    SimilarityScorer,
    register_scorer,
)
from megacontext.lens import LensConfig, LensNet, LensScorer, load_lens, save_lens

__all__ = ["SCORERS", "FocusAllocator", "LensConfig", "LensNet", "LensScorer", "LexicalScorer",
           "OracleScorer", "Query", "RecencyScorer", "RefocusStats", "ScoreContext", "Scorer",
           "SimilarityScorer", "load_lens", "register_scorer", "save_lens"]
