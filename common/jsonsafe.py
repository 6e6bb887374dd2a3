"""Values made JSON-able, in one place: audit columns, model cards, metrics lines, manifests and
the `audit --json` output all convert numpy, paths, enums, datetimes and pydicom values the same
way."""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

#: C0 and C1 control characters and DEL: text that reaches a terminal or a log must not carry
#: them (an ANSI escape in a SeriesDescription could repaint an operator's screen)
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def json_default(o: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, paths, enums,
    datetimes, bytes (hex), sets and objects with ``to_dict()``. Raises TypeError otherwise."""
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, (dt.datetime, dt.date, dt.time)):
        return o.isoformat()
    if isinstance(o, PurePath):
        return str(o)
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    if hasattr(o, "tolist"):  # numpy scalar or array
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def jsonable(value: Any, *, float_digits: int | None = None) -> Any:
    """`value` as plain JSON types, recursively: what :func:`json_default` converts, plus
    non-finite floats -> None (JSON has no NaN), strings without control characters, mapping
    keys as text, pydicom values (DSfloat, IS, UID, MultiValue) as float/int/str/list; anything
    else as its text. ``float_digits`` rounds floats (compact manifests)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value, float_digits=float_digits)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return round(float(value), float_digits) if float_digits is not None else float(value)
    if isinstance(value, str):
        return CONTROL_CHARS.sub(" ", value) if CONTROL_CHARS.search(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, float_digits=float_digits) for k, v in value.items()}
    if isinstance(value, (Sequence, set, frozenset)) and not isinstance(value, (bytes, bytearray)):
        return [jsonable(v, float_digits=float_digits) for v in value]
    try:
        plain = json_default(value)
    except TypeError:
        return str(value)
    return plain if isinstance(plain, str) else jsonable(plain, float_digits=float_digits)


__all__ = ["CONTROL_CHARS", "json_default", "jsonable"]
