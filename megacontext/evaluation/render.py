"""Small helpers shared by the evaluation's tables and plots (``report``, ``long_range``).

Numbers as text (``n/a`` for a missing or non-finite value, 95% intervals in brackets) and a
matplotlib ``Figure`` on an Agg canvas (no pyplot: no global backend, no open figures).
"""

from __future__ import annotations

import math


def number(x, digits: int = 3, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals (``+`` shown with ``sign``); ``n/a`` for None/NaN/inf."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def interval(value, ci, digits: int = 3, sign: bool = False) -> str:
    """``value [lo, hi]``, or ``value`` alone without an interval."""
    text = number(value, digits, sign)
    if ci:
        text += f" [{number(ci[0], digits, sign)}, {number(ci[1], digits, sign)}]"
    return text


def figure(width: float, height: float, ncols: int = 1):
    """``(fig, axes)``: a constrained-layout figure of ``ncols`` axes in one row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def error_bar(value, ci):
    """matplotlib ``yerr`` ``[[below], [above]]`` of one point and its interval (0 without)."""
    if not ci or value is None:
        return [[0.0], [0.0]]
    return [[max(value - ci[0], 0.0)], [max(ci[1] - value, 0.0)]]


def verdict(gain, ci, what: str = "memory") -> str:
    """``"<what> better"`` when the interval of a gain (> 0: ``what`` is better) lies above 0,
    ``"<what> worse"`` when below, ``"tie"`` when it holds 0 (or there is none)."""
    if gain is None or not ci or ci[0] is None or ci[1] is None:
        return "no interval"
    if ci[0] > 0:
        return f"{what} better"
    if ci[1] < 0:
        return f"{what} worse"
    return "tie"
