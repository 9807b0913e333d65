"""Error messages of the ``longlora:`` block: each pydantic error becomes one line naming
the key (``longlora.rope.factor``), the value, why it is refused and what is allowed
(the :class:`Allowed` text each field's type carries in :mod:`longlora_plugin.config`)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Allowed:
    """What a field accepts, in words. ``interval``: its range as ``(0, 1]``, for the
    reason of a bound error (``is outside (0, 1]``)."""

    text: str
    interval: str | None = None


# pydantic error type -> why the value is refused (bound errors use the field's interval)
_REASONS: dict[str, str] = {
    "literal_error": "is not allowed",
    "int_type": "is not an integer",
    "int_parsing": "is not an integer",
    "float_type": "is not a number",
    "float_parsing": "is not a number",
    "finite_number": "is not a finite number",
    "bool_type": "is not a boolean",
    "list_type": "is not a list",
    "string_type": "is not a string",
    "too_short": "is empty",
}
_BOUNDS = {"greater_than_equal": ("<", "ge"), "greater_than": ("<=", "gt"),
           "less_than_equal": (">", "le"), "less_than": (">=", "lt")}  # fmt: skip


def _path(loc: tuple[Any, ...]) -> str:
    out = "longlora"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """The type inside ``Optional`` / ``Annotated`` layers, and the metadata collected."""
    metadata: list[Any] = []
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            metadata += list(annotation.__metadata__)
            annotation = typing.get_args(annotation)[0]
            continue
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(annotation):  # Optional[X]
            annotation = args[0]
            continue
        return annotation, metadata


def _annotation_at(
    root: type[BaseModel], loc: tuple[Any, ...]
) -> tuple[type[BaseModel] | None, list[Any]]:
    """``(model holding the key, metadata of the annotation at loc)``; list indices
    descend into the item type."""
    model: type[BaseModel] | None = root
    metadata: list[Any] = []
    annotation: Any = None
    for part in loc:
        if isinstance(part, str):
            nested = _model_in(annotation) if annotation is not None else model
            if nested is None or part not in nested.model_fields:
                return nested, []
            model = nested
            field = nested.model_fields[part]
            annotation, metadata = _unwrap(field.annotation)
            metadata = list(field.metadata) + metadata
        else:  # list index: the item type
            args = typing.get_args(annotation)
            annotation, metadata = _unwrap(args[0]) if args else (None, [])
    return model, metadata


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The nested model whose keys are at ``loc`` (``()``: ``root``)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _model_in(_unwrap(model.model_fields[part].annotation)[0])
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _allowed(metadata: list[Any]) -> Allowed | None:
    return next((m for m in metadata if isinstance(m, Allowed)), None)


def _reason(err: dict[str, Any], allowed: Allowed | None) -> str:
    kind = err.get("type", "")
    if kind in _BOUNDS:
        if allowed is not None and allowed.interval:
            return f"is outside {allowed.interval}"
        symbol, key = _BOUNDS[kind]
        return f"is {symbol} {err.get('ctx', {}).get(key)}"
    if kind in _REASONS:
        return _REASONS[kind]
    msg = str(err.get("msg", ""))
    return msg.removeprefix("Value error, ")


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def format_error(err: dict[str, Any], raw: dict[str, Any], root: type[BaseModel]) -> str:
    """One line for one pydantic error of the ``longlora:`` block ``raw``, whose schema is
    ``root``: the key, the value, why it is refused and what is allowed."""
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the documentation"
        return f"{_path(loc)}: unknown key; allowed keys: {allowed}"
    if not loc or (kind == "value_error" and _model_at(root, loc) is not None):
        # a model's own validator: its message names the keys
        return str(err.get("msg", "")).removeprefix("Value error, ")
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        model = _model_at(root, loc)
        keys = ", ".join(model.model_fields) if model else ""
        return f"{_path(loc)}={err.get('input')!r} is not a mapping; allowed keys: {keys}"
    _, metadata = _annotation_at(root, loc)
    allowed = _allowed(metadata)
    reason = _reason(err, allowed)
    if isinstance(loc[-1], int):  # an item: report on the list, as the user wrote it
        whole = _lookup(raw, loc[:-1])
        _, list_metadata = _annotation_at(root, loc[:-1])
        allowed = _allowed(list_metadata) or allowed
        text = f"{_path(loc[:-1])}={whole!r} contains {err.get('input')!r}, which {reason}"
    else:
        text = f"{_path(loc)}={err.get('input')!r} {reason}"
    return f"{text}; allowed: {allowed.text}" if allowed else text
