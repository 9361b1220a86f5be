"""Units of the objectives and the trials table's columns, and how to print them.

Every objective has a unit a reader sees beside it: ``top1``/``top5`` in % (of validation
images), ``macs`` in multiply-accumulates per image, ``flops`` in floating-point operations per
image (2 x MACs: torch's ``FlopCounterMode`` counts a multiply-add as two), ``params`` in
parameters, ``latency_ms`` in milliseconds, ``kept_fraction`` as a fraction of the dense
model's parameters. Counts are shown with a decimal prefix (K = 1e3, M = 1e6, G = 1e9).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

#: Objective or column name -> what one unit of it is.
UNITS = {
    "top1": "%", "top5": "%", "macs": "MACs per image", "flops": "FLOPs per image",
    "params": "parameters", "latency_ms": "ms", "kept_fraction": "of dense params",
}
#: Columns that count things (shown with a K/M/G prefix).
COUNTS = ("macs", "flops", "params", "nonzero_macs")
#: FLOPs per MAC (torch's FlopCounterMode convention).
FLOPS_PER_MAC = 2
_PREFIXES = (("G", 1e9), ("M", 1e6), ("K", 1e3))


def prefix_for(values: Iterable[float]) -> tuple[str, float]:
    """The decimal prefix and its scale that suit the largest finite ``values`` (``("", 1)``
    below a thousand)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=0.0)
    return next(((p, s) for p, s in _PREFIXES if top >= s), ("", 1.0))


def count_text(value: float, digits: int = 3) -> str:
    """``4.61e6`` -> ``"4.61M"`` (``digits`` significant digits; ``"nan"`` when missing)."""
    if value is None or not math.isfinite(value):
        return "nan"
    prefix, scale = prefix_for([value])
    return f"{value / scale:.{digits}g}{prefix}"


def value_text(name: str, value: float) -> str:
    """One value with its unit as a table or progress line shows it: ``91.2%``, ``4.61M``,
    ``3.20ms``, ``0.48``."""
    if value is None or not math.isfinite(value):
        return "nan"
    if UNITS.get(name) == "%":
        return f"{value:.1f}%"
    if name == "latency_ms":
        return f"{value:.2f}ms"
    if name in COUNTS:
        return count_text(value)
    return f"{value:.3g}"


def column_title(name: str, prefix: str = "") -> str:
    """A column or axis title with its unit: ``top1 (%)``, ``MACs per image (M)``, ``params (M)``."""
    if name == "macs":
        return f"MACs per image ({prefix})" if prefix else "MACs per image"
    if name == "flops":
        return f"FLOPs per image ({prefix})" if prefix else "FLOPs per image"
    if name in COUNTS:
        return f"{name} ({prefix})" if prefix else name
    unit = UNITS.get(name)
    return f"{name} ({unit})" if unit else name
