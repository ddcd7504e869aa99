"""The same-loss study's number formats (Liu, Xie, Li & Ma, ICML 2023, arXiv 2210.14199): values, intervals,
signed differences and p-values as the report's tables print them."""

from __future__ import annotations

import math


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if abs(v) < 1e-12:  # rounding noise of a zero spread
        return "0"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _pm(mean: float, ci: float, scale: float = 1.0, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    ci_s = f" ± {_fmt(ci * scale, 2)}" if ci is not None and math.isfinite(ci) else ""
    return f"{_fmt(mean * scale, digits)}{ci_s}"


def _signed(v: float, ci: float, unit: str = "") -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.3g}" + (f" ± {_fmt(ci, 2)}" if math.isfinite(ci) else "") + unit


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.2g}" if p >= 1e-4 else "<1e-4"

