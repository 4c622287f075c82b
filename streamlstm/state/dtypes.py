"""The element types a key's h and c can be kept in (state.dtype): float32, or half the bytes in bfloat16
or float16. Only the stored state is narrowed: each step widens it to float32, steps in float32 and
rounds the result to the element type (round to nearest even, as torch's own conversions round).

On the host the state is a NumPy array of each type's storage: float32, float16, and bfloat16 as its 16
bits (uint16; NumPy has no bfloat16). The changelog names the type of each record with its format byte,
so a record written under one state.dtype restores under another: widened exactly, or rounded once.
Knows nothing of Kafka or of torch. The names are config.StateDtype's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Element:
    name: str  # as state.dtype spells it
    code: int  # the changelog value's format byte
    storage: np.dtype  # how NumPy holds it


ELEMENTS = {e.name: e for e in (Element("float32", 1, np.dtype("<f4")), Element("bfloat16", 2, np.dtype("<u2")),
                                  Element("float16", 3, np.dtype("<f2")))}
BY_CODE = {e.code: e for e in ELEMENTS.values()}


def widen(values: np.ndarray, element: Element) -> np.ndarray:
    """float32 values of an array held as `element` (exact: every bfloat16 and float16 is a float32)."""
    if element.name == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def narrow(values: np.ndarray, element: Element) -> np.ndarray:
    """float32 values rounded to `element`, to nearest even; NaN stays NaN (torch's rounding, bit for bit)."""
    if element.name == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
        return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)
    with np.errstate(over="ignore"):  # beyond float16's range is inf, as torch rounds it
        return values.astype(element.storage)


def convert(values: np.ndarray, source: Element, target: Element) -> np.ndarray:
    """An array held as `source` as one held as `target`."""
    if source == target:
        return values
    return narrow(widen(values, source), target)
