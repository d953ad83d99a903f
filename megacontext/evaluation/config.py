"""The evaluation's settings: one small dataclass per part, each validating itself.

``configs/eval.yaml`` mirrors these fields key for key;
:func:`megacontext.evaluation.checks.check_config` builds them all from a composed Hydra config
and raises once, naming every bad value, before any model loads.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from megacontext.data import WindowLayout, WindowSpec
from megacontext.dtypes import DTYPE_NAMES
from megacontext.positions import PositionRule
from megacontext.rope import RopeConfig
from megacontext.spans import SPAN, node_size
from megacontext.substitution import GIST_ROPES, POSITION_MODES

DTYPES = DTYPE_NAMES  # model.dtype
TREE_DTYPES = DTYPE_NAMES  # gist dtypes of the evaluation's memory trees
MEAN = "mean"  # gistnet=mean: the mean-pooling baseline stands in for GistNet


def _int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _ints(problems: list[str], obj: Any, lows: dict[str, int]) -> None:
    for name, low in lows.items():
        v = getattr(obj, name)
        if not _int(v) or v < low:
            problems.append(f"{name}={v!r} (expected an int >= {low})")


def _raise(what: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"invalid {what}: " + "; ".join(problems))


@dataclass(frozen=True)
class WindowPlan:
    """What an evaluation scores: the window shapes, how many windows of each level, and the
    horizons reported (the window vocabulary: :mod:`megacontext.data.windows`).

    A level-k window is ``[old context | raw tail | horizon]`` cut from one held-out document;
    its old context is ``context_spans`` L1 nodes (level 1) or ``l2_spans`` L2 nodes (level 2).
    :meth:`spec` gives the data module's :class:`WindowSpec` (the same spec and count as
    training's validation give the very same windows), :meth:`layout` the shape scored.

    Args:
        context_spans: L1 nodes of old context in a level-1 window (32 tokens each).
        l2_spans: L2 nodes of old context in a level-2 window (1,024 tokens each).
        tail_tokens: raw tokens between the old context and the scored tokens.
        horizon: H, the tokens scored after the tail (the window's last H tokens).
        horizons: the horizons reported; each a prefix of the scored ``horizon`` tokens.
        num_windows: level-1 windows (0: none).
        num_l2_windows: level-2 windows (0: none).
        span: tokens per L1 node (32 in this project).
    """

    context_spans: int = 14
    l2_spans: int = 1
    tail_tokens: int = 64
    horizon: int = 64
    horizons: tuple[int, ...] = (16, 32, 64)
    num_windows: int = 24
    num_l2_windows: int = 4
    span: int = SPAN

    def __post_init__(self) -> None:
        problems: list[str] = []
        _ints(problems, self, {"context_spans": 1, "l2_spans": 1, "tail_tokens": 0,
                               "horizon": 1, "num_windows": 0, "num_l2_windows": 0, "span": 2})
        object.__setattr__(self, "horizons", tuple(self.horizons))
        if not self.horizons:
            problems.append("horizons=() (expected at least one horizon)")
        for h in self.horizons:
            if not _int(h) or h < 1:
                problems.append(f"horizons entry {h!r} (expected an int >= 1)")
            elif _int(self.horizon) and h > self.horizon:
                problems.append(f"horizons entry {h} is larger than the window's horizon "
                                f"{self.horizon} (the scored tokens; raise windows.horizon)")
        if _int(self.num_windows) and _int(self.num_l2_windows) \
                and self.num_windows + self.num_l2_windows == 0:
            problems.append("num_windows=0 and num_l2_windows=0 (nothing to score)")
        _raise("WindowPlan", problems)

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(k for k, n in ((1, self.num_windows), (2, self.num_l2_windows)) if n)

    def count(self, level: int) -> int:
        return self.num_windows if level == 1 else self.num_l2_windows

    def spec(self, level: int) -> WindowSpec:
        """The data module's :class:`WindowSpec` for windows of ``level`` only."""
        return WindowSpec(span=self.span, context_spans=self.context_spans,
                          tail_tokens=self.tail_tokens, horizon=self.horizon,
                          l2_share=0.0 if level == 1 else 1.0, l2_spans=self.l2_spans)

    def layout(self, level: int) -> WindowLayout:
        """The shape of a level-``level`` window (what :mod:`megacontext.substitution` scores)."""
        return self.spec(level).layout(level)

    def length(self, level: int) -> int:
        return self.layout(level).length


MIXED_SCORERS = ("recency", "similarity", "lexical", "lens")
LONG_RANGE_SCORERS = ("recency", "similarity", "lexical")


@dataclass(frozen=True)
class MixedPlan:
    """Mixed-level working contexts chosen by the focus allocator, at several budgets.

    Each window's old context and tail go into a small memory tree (the ingest pipeline);
    the allocator assembles a working context of at most ``budget`` entries for them (the tail
    always raw), and the horizon is scored after it.

    Args:
        budgets: working-context budgets W (entries covering old context + tail).
        levels: window levels to run them on (those being scored; at least one of them).
        scorer: the allocator's scorer: ``recency``, ``similarity`` (query: the mean
            embedding of the 64 tokens before the horizon), ``lexical`` (query: those tokens'
            ids) or ``lens`` (query: those tokens; the evaluation's ``lens`` export).
        compare: another scorer whose contexts are scored on the same windows at the same
            budgets (``mixed_<compare>@W``), for a paired difference with its interval
            (``gain_vs_compare``: NLL under ``compare`` minus NLL under ``scorer``); None: off.
        tree_dtype: gist dtype of the trees; float32 keeps the coarsest cover identical to
            the plain gist condition.
        positions: the read-time position rule of the working contexts (``exact``: true
            positions under the run's RoPE; ``compact``, ``grouped``, ``single``: the rule's
            positions under the model's own RoPE; a mapping for ``local`` and ``quantum``).
    """

    budgets: tuple[int, ...] = (128, 256)
    levels: tuple[int, ...] = (1, 2)
    scorer: str = "recency"
    compare: str | None = None
    tree_dtype: str = "float32"
    positions: Any = "exact"

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:
            object.__setattr__(self, "positions", PositionRule.of(self.positions))
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        object.__setattr__(self, "budgets", tuple(self.budgets))
        object.__setattr__(self, "levels", tuple(self.levels))
        problems += [f"budgets entry {b!r} (expected an int >= 1)" for b in self.budgets
                     if not _int(b) or b < 1]
        if len(set(self.budgets)) != len(self.budgets):
            problems.append(f"budgets={list(self.budgets)} has repeats")
        problems += [f"levels entry {k!r} (expected 1 or 2)" for k in self.levels
                     if k not in (1, 2)]
        if self.scorer not in MIXED_SCORERS:
            problems.append(f"scorer={self.scorer!r} (expected one of {MIXED_SCORERS})")
        if self.compare is not None and (self.compare not in MIXED_SCORERS
                                         or self.compare == self.scorer):
            problems.append(f"compare={self.compare!r} (expected null or one of "
                            f"{MIXED_SCORERS} other than scorer={self.scorer!r})")
        if self.tree_dtype not in TREE_DTYPES:
            problems.append(f"tree_dtype={self.tree_dtype!r} (expected one of {TREE_DTYPES})")
        _raise("MixedPlan", problems)


@dataclass(frozen=True)
class DistancePlan:
    """ΔNLL by the distance of the replaced span from the scored tokens (level-1 windows).

    The old context's spans are cut into ``buckets`` groups of neighbouring spans; one group
    at a time is replaced by its gists (the rest stays raw), and, as its reference, dropped.
    ``buckets = context_spans`` replaces one span at a time. Costs ``2 · buckets`` passes per
    window.

    Args:
        num_windows: the first this-many level-1 windows are used (0: off).
        buckets: groups of neighbouring spans, nearest to the scored tokens first.
    """

    num_windows: int = 4
    buckets: int = 4

    def __post_init__(self) -> None:
        problems: list[str] = []
        _ints(problems, self, {"num_windows": 0, "buckets": 1})
        _raise("DistancePlan", problems)


@dataclass(frozen=True)
class Variant:
    """A variant of the gist condition scored on the same windows.

    Unset fields take the main setting. A ``rope`` override (RopeConfig fields, e.g.
    ``{scaling: ntk, factor: 2.0}``) changes every condition, so the variant re-scores the
    full and truncated baselines under it as well.
    """

    name: str | None = None
    position_mode: str | None = None
    gist_rope: str | None = None
    rope: dict | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.position_mode is not None and self.position_mode not in POSITION_MODES:
            problems.append(f"position_mode={self.position_mode!r} (expected one of "
                            f"{POSITION_MODES})")
        if self.gist_rope is not None and self.gist_rope not in GIST_ROPES:
            problems.append(f"gist_rope={self.gist_rope!r} (expected one of {GIST_ROPES})")
        if self.rope is not None:
            rope = dict(self.rope)
            object.__setattr__(self, "rope", rope)
            fields = {f.name for f in dataclasses.fields(RopeConfig)} - {"head_dim", "theta"}
            unknown = sorted(set(rope) - fields)
            if unknown:
                problems.append(f"rope keys {unknown} (expected RopeConfig fields such as "
                                f"scaling, factor, original_max_position)")
            else:
                try:  # validate against a stand-in RoPE; the model's own is applied later
                    dataclasses.replace(RopeConfig(head_dim=64, theta=1e4), **rope)
                except (ValueError, TypeError) as e:
                    problems.append(f"rope={rope}: {e}")
        if self.position_mode is None and self.gist_rope is None and not self.rope:
            problems.append("a variant must change position_mode, gist_rope or rope")
        _raise(f"Variant {self.name or ''}".rstrip(), problems)

    def label(self) -> str:
        if self.name:
            return str(self.name)
        parts = []
        if self.position_mode is not None:
            parts.append(f"positions={self.position_mode}")
        if self.gist_rope is not None:
            parts.append(f"gist_rope={self.gist_rope}")
        if self.rope:
            parts.append("rope=" + ",".join(f"{k}:{v}" for k, v in self.rope.items()))
        return " ".join(parts)


@dataclass(frozen=True)
class SubstitutabilityConfig:
    """The substitutability measurement.

    Args:
        position_mode: gists at their span centers (``center``) or renumbered
            consecutively (``consecutive``), for the main gist and mean-pool conditions.
        gist_rope: ``point`` | ``span`` | ``gaussian`` rotation of gists.
        sink_tokens: first tokens of each window kept by the ``sink`` and ``streaming@W``
            baselines (attention sinks).
        batch_size: windows per forward pass (speed only; results do not depend on it
            beyond float rounding).
        bootstrap: resamples of the windows for the 95% intervals (0: none).
    """

    windows: WindowPlan = field(default_factory=WindowPlan)
    mixed: MixedPlan = field(default_factory=MixedPlan)
    distance: DistancePlan = field(default_factory=DistancePlan)
    variants: tuple[Variant, ...] = ()
    position_mode: str = "center"
    gist_rope: str = "point"
    sink_tokens: int = 4
    batch_size: int = 8
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "variants", tuple(self.variants))
        if self.position_mode not in POSITION_MODES:
            problems.append(f"position_mode={self.position_mode!r} (expected one of "
                            f"{POSITION_MODES})")
        if self.gist_rope not in GIST_ROPES:
            problems.append(f"gist_rope={self.gist_rope!r} (expected one of {GIST_ROPES})")
        _ints(problems, self, {"batch_size": 1, "bootstrap": 0, "sink_tokens": 0})
        w = self.windows
        mixed = [k for k in self.mixed.levels if k in w.levels]
        if self.mixed.budgets and self.mixed.levels and not mixed:
            problems.append(f"mixed.levels={list(self.mixed.levels)}, but no windows of those "
                            f"levels are scored (windows.num_windows / num_l2_windows)")
        for level in mixed:
            minimum = w.layout(level).num_gists + w.tail_tokens
            for b in self.mixed.budgets:
                if b < minimum:
                    problems.append(
                        f"mixed.budgets entry {b} is below the least working context of a "
                        f"level-{level} window ({w.layout(level).num_gists} gists + "
                        f"{w.tail_tokens} raw tail = {minimum} entries)")
        if self.distance.num_windows:
            if 1 not in w.levels:
                problems.append("distance.num_windows > 0 needs level-1 windows "
                                "(windows.num_windows > 0)")
            elif self.distance.buckets > w.context_spans:
                problems.append(f"distance.buckets={self.distance.buckets} exceeds "
                                f"windows.context_spans={w.context_spans} (at most one span "
                                f"per bucket)")
        labels = [v.label() for v in self.variants]
        if len(set(labels)) != len(labels):
            problems.append(f"variant names {labels} must be unique")
        _raise("SubstitutabilityConfig", problems)


@dataclass(frozen=True)
class LongRangePlan:
    """Windows whose old context reaches beyond the base model's trained length.

    Each window is ``[old context | raw tail | horizon]`` with an old context of
    ``context_tokens`` tokens, cut from the evaluated documents laid back to back (few
    documents are that long); the old context is replaced by L1 gists, L2 gists, or a mixed
    working context of ``mixed_budget`` entries chosen by the allocator, and scored against
    ``truncated`` and ``sink`` at the same tail, and ``full`` where the window has at most
    ``full_max_tokens`` tokens (one long forward pass each). Every condition of a window uses
    the same RoPE: the model's with ``rope`` overrides, ``auto`` resolved once from the
    window's extent.

    Args:
        enabled: run it.
        context_tokens: old-context lengths (multiples of 1,024, the L2 node size).
        num_windows: windows per length.
        tail_tokens: raw tokens between the old context and the scored ones.
        horizon: tokens scored.
        levels: gist levels to replace the old context with (1 and/or 2).
        mixed_budget: working-context budget(s) W of the mixed condition: an int or a list
            (0 or []: off). Each W also scores ``streaming@W`` (sinks + the most recent
            tokens at cache ranks, the model's own RoPE) and ``recent@W`` (the last W tokens
            at their true positions).
        full_max_tokens: score ``full`` only for windows of at most this many tokens (0: never).
        positions: the read-time position rule of the ``mixed@W`` contexts (``MixedPlan``).
        scorer: the allocator's scorer of the ``mixed@W`` contexts: ``recency`` or
            ``lexical`` (query: the ids of the 64 tokens before the horizon) or
            ``similarity`` (their mean embedding).
        rope: RopeConfig overrides for every condition (default ``{scaling: auto}``: NTK
            resolved from the positional extent).
    """

    enabled: bool = True
    context_tokens: tuple[int, ...] = (16384, 32768)
    num_windows: int = 2
    tail_tokens: int = 64
    horizon: int = 64
    levels: tuple[int, ...] = (1, 2)
    mixed_budget: int | tuple[int, ...] = (1024, 2048)
    full_max_tokens: int = 0
    rope: dict | None = field(default_factory=lambda: {"scaling": "auto"})
    positions: Any = "exact"
    scorer: str = "recency"

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:
            object.__setattr__(self, "positions", PositionRule.of(self.positions))
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        if self.scorer not in LONG_RANGE_SCORERS:
            problems.append(f"scorer={self.scorer!r} (expected one of {LONG_RANGE_SCORERS}; "
                            f"a lens is trained on in-window memories)")
        object.__setattr__(self, "context_tokens", tuple(self.context_tokens))
        object.__setattr__(self, "levels", tuple(self.levels))
        budgets = self.mixed_budget
        budgets = (budgets,) if _int(budgets) else tuple(budgets or ())
        object.__setattr__(self, "mixed_budget", tuple(b for b in budgets if b != 0))
        _ints(problems, self, {"num_windows": 1, "tail_tokens": 0, "horizon": 1,
                               "full_max_tokens": 0})
        problems += [f"mixed_budget entry {b!r} (expected an int >= 1)"
                     for b in self.mixed_budget if not _int(b) or b < 1]
        if len(set(self.mixed_budget)) != len(self.mixed_budget):
            problems.append(f"mixed_budget={list(self.mixed_budget)} has repeats")
        if not isinstance(self.enabled, bool):
            problems.append(f"enabled={self.enabled!r} (expected a bool)")
        if not self.context_tokens:
            problems.append("context_tokens=() (expected at least one length)")
        l2 = node_size(2, SPAN)  # 1,024: every level's nodes tile the old context
        problems += [f"context_tokens entry {n!r} (expected a positive multiple of {l2})"
                     for n in self.context_tokens if not _int(n) or n < l2 or n % l2]
        problems += [f"levels entry {k!r} (expected 1 or 2)" for k in self.levels
                     if k not in (1, 2)]
        for b in self.mixed_budget:
            if _int(b) and _int(self.tail_tokens) and 0 < b < self.tail_tokens + 32:
                problems.append(f"mixed_budget {b} cannot hold the raw tail "
                                f"({self.tail_tokens}) and the coarsest cover")
        if self.rope is not None:
            rope = dict(self.rope)
            object.__setattr__(self, "rope", rope)
            try:
                dataclasses.replace(RopeConfig(head_dim=64, theta=1e4,
                                               original_max_position=8192), **rope)
            except (ValueError, TypeError) as e:
                problems.append(f"rope={rope}: {e}")
        _raise("LongRangePlan", problems)


@dataclass(frozen=True)
class PasskeyConfig:
    """Passkey retrieval from memory (the runtime loop with the allocator).

    A random ``digits``-digit key is hidden at ``depth`` (a fraction of the memory) in filler
    drawn from the held-out documents; the memory is ``length`` tokens; the question is the
    allocator's query; the model must complete the key. The memory runtime and its allocator
    come from the ``memory`` and ``allocator`` config groups; the truncation baseline keeps the
    allocator's ``budget`` most recent tokens.

    Args:
        enabled: run it.
        lengths: memory sizes in tokens.
        depths: where the key sits, as fractions of the memory (0 = oldest, 1 = newest).
        trials: keys per (length, depth).
        digits: key length.
        max_new_tokens: greedy tokens generated for the answer.
        full_context: also answer with every token in context (lengths within the model's
            trained length only; one long forward pass per trial).
        intro: the memory's first text (``str.format`` template without fields; ``{{``/``}}``
            for literal braces).
        needle: the sentence hiding the key: a ``str.format`` template that must use
            ``{key}`` and no other field.
        question: asked after the memory; its greedy continuation is the answer. A template
            without fields: the key in it would give the answer away.
    """

    enabled: bool = True
    lengths: tuple[int, ...] = (4096,)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    trials: int = 2
    digits: int = 5
    max_new_tokens: int = 8
    full_context: bool = False
    intro: str = ("There is a pass key hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the pass key.\n")
    needle: str = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    question: str = "\nWhat is the pass key? The pass key is"

    @staticmethod
    def template_fields(template: str) -> list[str]:
        """The replacement fields of a ``str.format`` template, in order (``ValueError`` when
        it does not parse, e.g. a lone ``{``)."""
        import string

        return [name for _, name, _, _ in string.Formatter().parse(template)
                if name is not None]

    def _check_templates(self, problems: list[str]) -> None:
        # Which fields each template needs / may use: the key belongs in the needle only (in
        # the intro it would sit at depth 0 in every memory; in the question it gives the
        # answer away).
        rules = {"intro": ((), ()), "needle": (("key",), ("key",)), "question": ((), ())}
        for name, (required, allowed) in rules.items():
            template = getattr(self, name)
            if not isinstance(template, str):
                problems.append(f"{name}={template!r} (expected a str.format template)")
                continue
            try:
                fields = self.template_fields(template)
            except ValueError as e:
                problems.append(f"{name}={template!r} is not a str.format template ({e}; write "
                                f"literal braces as {{{{ and }}}})")
                continue
            bad = sorted({f for f in fields if f not in allowed})
            if "key" in bad:
                why = ("the question must not contain the key: it would give the answer away"
                       if name == "question" else
                       "the key belongs in the needle only: in the intro it would sit at "
                       "depth 0 of every memory")
                problems.append(f"{name}={template!r} uses {{key}} ({why})")
                bad.remove("key")
            if bad:
                problems.append(f"{name}={template!r} uses the field(s) "
                                f"{', '.join('{' + f + '}' for f in bad)} (allowed: "
                                f"{', '.join('{' + f + '}' for f in allowed) or 'none'})")
            problems += [f"{name}={template!r} does not contain {{{f}}}" for f in required
                         if f not in fields]
        if isinstance(self.question, str) and not self.question.strip():
            problems.append(f"question={self.question!r} (expected a question: it is also "
                            f"the allocator's query)")

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "lengths", tuple(self.lengths))
        object.__setattr__(self, "depths", tuple(float(d) if isinstance(d, numbers.Real)
                                                 and not isinstance(d, bool) else d
                                                 for d in self.depths))
        _ints(problems, self, {"trials": 1, "digits": 1, "max_new_tokens": 1})
        if _int(self.max_new_tokens) and _int(self.digits) and self.max_new_tokens < self.digits:
            problems.append(f"max_new_tokens={self.max_new_tokens} cannot hold a "
                            f"{self.digits}-digit key")
        if not self.lengths:
            problems.append("lengths=() (expected at least one memory length)")
        problems += [f"lengths entry {n!r} (expected an int >= 64)" for n in self.lengths
                     if not _int(n) or n < 64]
        if not self.depths:
            problems.append("depths=() (expected at least one depth)")
        problems += [f"depths entry {d!r} (expected a number in [0, 1])" for d in self.depths
                     if not isinstance(d, float) or not 0.0 <= d <= 1.0 or math.isnan(d)]
        for name in ("enabled", "full_context"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} (expected a bool)")
        self._check_templates(problems)
        _raise("PasskeyConfig", problems)


@dataclass(frozen=True)
class MemoryConfig:
    """The memory runtime's settings (the ``memory`` config group): keyword arguments of
    :class:`megacontext.runtime.MemoryLM`."""

    levels: int = 2
    gist_dtype: str = "float16"
    refocus_every: int = 32
    gist_rope: str = "point"
    rope_scaling: str = "auto"  # auto: NTK factor from each refocus's extent; none: the model's
    positions: Any = "exact"  # read-time positions: exact | compact | grouped | single, or
    # {kind, local, quantum} (megacontext.positions.PositionRule)

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:
            object.__setattr__(self, "positions", PositionRule.of(self.positions))
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        _ints(problems, self, {"levels": 1, "refocus_every": 1})
        if self.rope_scaling not in ("auto", "none"):
            problems.append(f"rope_scaling={self.rope_scaling!r} (expected auto or none)")
        if self.gist_dtype not in TREE_DTYPES:
            problems.append(f"gist_dtype={self.gist_dtype!r} (expected one of {TREE_DTYPES})")
        if self.gist_rope not in GIST_ROPES:
            problems.append(f"gist_rope={self.gist_rope!r} (expected one of {GIST_ROPES})")
        _raise("MemoryConfig", problems)
