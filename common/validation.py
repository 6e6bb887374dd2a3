"""Pydantic validation errors as `ConfigError` lines that start with the dotted key.

Shared by every declarative config (node/config.py's TOML tables, molre's MoLREConfig and
TrainConfig): "network.port: expected an integer 0..65535, got 70000" instead of pydantic's
multi-line report. A cross-field rule raises `RuleError(key, message)` from a model validator so
its line names the key the rule is about.
"""

from __future__ import annotations

import typing
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError

from common.errors import ConfigError

__all__ = ["RuleError", "bounds", "config_error", "dotted_key", "show", "table_of"]


class RuleError(ValueError):
    """A rule between keys failed: `key` is relative to the model the validator belongs to."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def show(value: Any) -> str:
    """A value as an error message quotes it: strings in double quotes (as TOML writes them)."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


def dotted_key(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def table_of(annotation: Any) -> type[BaseModel] | None:
    """The model of a field holding a table or a list of tables."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """(the table holding the last key of `loc`, that key's FieldInfo or None)."""
    table: type[BaseModel] | None = model
    info = None
    names = [part for part in loc if not isinstance(part, int)]
    for i, part in enumerate(names):
        if table is None or part not in table.model_fields:
            return table, None
        info = table.model_fields[part]
        if i < len(names) - 1:
            table = table_of(info.annotation)
    return table, info


def bounds(info: Any) -> str:
    """The bounds of a field's constraints as text: " 0..65535", " >= 1", " > 0", " >= 0, < 1"."""
    lo: Any = None
    hi: Any = None
    lo_op, hi_op = ">=", "<="
    for m in getattr(info, "metadata", ()):
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_op = m.gt, ">"
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, Lt):
            hi, hi_op = m.lt, "<"
    if lo is not None and hi is not None:
        return f" {lo}..{hi}" if (lo_op, hi_op) == (">=", "<=") else f" {lo_op} {lo}, {hi_op} {hi}"
    if lo is not None:
        return f" {lo_op} {lo}"
    if hi is not None:
        return f" {hi_op} {hi}"
    return ""


def _expected(info: Any, kind: str) -> str:
    b = bounds(info)
    if kind == "number":
        if b == " > 0":
            return "a positive number"
        if b == " >= 0":
            return "a non-negative number"
        return f"a number{b}"
    return f"an integer{b}"


def _message(model: type[BaseModel], err: Any) -> str:
    loc: tuple[Any, ...] = tuple(err["loc"])
    etype: str = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    table, info = _field_at(model, loc)
    got = f", got {show(value)}"
    cause = ctx.get("error")
    if isinstance(cause, RuleError):
        return (
            f"{dotted_key(loc + (cause.key,))}: {cause.message}"
            if loc
            else f"{cause.key}: {cause.message}"
        )
    key = dotted_key(loc)
    if etype == "extra_forbidden":
        known = ", ".join(sorted(table.model_fields)) if table is not None else ""
        return f"{key}: unknown key (known keys here: {known})"
    if etype == "value_error" and cause is not None:
        return f"{key}: {cause}"
    if etype in ("int_type", "int_parsing", "int_from_float"):
        return f"{key}: expected {_expected(info, 'integer')}{got}"
    if etype in ("float_type", "float_parsing", "finite_number"):
        return f"{key}: expected {_expected(info, 'number')}{got}"
    if etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        kind = "number" if getattr(info, "annotation", None) is float else "integer"
        return f"{key}: expected {_expected(info, kind)}{got}"
    if etype == "bool_type":
        return f"{key}: expected a boolean (true or false){got}"
    if etype == "string_type":
        return f"{key}: expected a string{got}"
    if etype in ("path_type", "path_parsing"):
        return f"{key}: expected a path{got}"
    if etype == "list_type":
        return f"{key}: expected a list{got}"
    if etype in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: expected a table{got}"
    if etype == "literal_error":
        choices = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        why = f" ({info.description})" if getattr(info, "description", None) else ""
        return f"{key}: expected one of {choices}{got}{why}"
    if etype == "missing":
        return f"{key}: required"
    if etype == "too_short" and isinstance(value, list):
        return f"{key}: must not be empty"
    if etype in ("string_too_short", "too_short"):
        return f"{key}: required (must not be empty)"
    if etype == "string_pattern_mismatch":
        what = getattr(info, "description", None) or f"text matching {ctx.get('pattern')}"
        return f"{key}: expected {what}{got}"
    return f"{key}: {err['msg']}{got}"  # pragma: no cover - a constraint not mapped above


def config_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> ConfigError:
    """One line per problem, each starting with `prefix` + the dotted key."""
    return ConfigError("\n".join(prefix + _message(model, e) for e in exc.errors()))
