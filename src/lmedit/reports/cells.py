"""How every report layout writes a number: a dash for a missing value, a fixed number of decimals otherwise."""

from __future__ import annotations

import math
from typing import Any


def number(value: Any, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals; "—" when there is none (None, or NaN from an empty mean)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def scaled(value: Any, factor: float = 100.0) -> float | None:
    """A fraction as the papers print it (× 100 by default); None stays None."""
    return None if value is None else float(value) * factor
