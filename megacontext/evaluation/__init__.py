"""Evaluation: substitutability of gists (per level, horizon, distance and budget, against
truncation, mean pooling and the full context) and passkey retrieval from memory.

``evaluate(cfg)`` is the plain function behind ``eval/eval.py``; docs/evaluation.md has the
protocol. No Lightning here.
"""

from megacontext.evaluation.config import (
    DistancePlan,
    MixedPlan,
    PasskeyConfig,
    SubstitutabilityConfig,
    Variant,
    WindowPlan,
    check_config,
)
from megacontext.evaluation.evaluate import evaluate, load_compressor
from megacontext.evaluation.passkey import run_passkey
from megacontext.evaluation.substitutability import (
    compose,
    held_out_windows,
    run_substitutability,
)

__all__ = ["DistancePlan", "MixedPlan", "PasskeyConfig", "SubstitutabilityConfig", "Variant",
           "WindowPlan", "check_config", "compose", "evaluate", "held_out_windows",
           "load_compressor", "run_passkey", "run_substitutability"]
