"""Evaluation: substitutability of gists (per level, horizon, distance and budget, against
truncation, sink-kept truncation, streaming windows, mean pooling, a content-free constant and
the full context), long-range windows beyond the trained length, and passkey retrieval from
memory.

``evaluate(cfg)`` is the plain function behind ``eval/eval.py``; docs/evaluation.md has the
protocol. No Lightning here.
"""

from megacontext.evaluation.checks import EvalSettings, check_config
from megacontext.evaluation.config import (
    DistancePlan,
    LongRangePlan,
    MixedPlan,
    PasskeyConfig,
    SubstitutabilityConfig,
    Variant,
    WindowPlan,
)
from megacontext.evaluation.evaluate import evaluate, evaluation_documents, load_compressor
from megacontext.evaluation.passkey import run_passkey
from megacontext.evaluation.substitutability import (
    compose,
    evaluation_windows,
    run_substitutability,
)

__all__ = ["DistancePlan", "EvalSettings", "LongRangePlan", "MixedPlan", "PasskeyConfig",
           "SubstitutabilityConfig", "Variant", "WindowPlan", "check_config", "compose",
           "evaluate", "evaluation_documents", "evaluation_windows", "load_compressor",
           "run_passkey", "run_substitutability"]
