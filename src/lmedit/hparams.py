"""Hyperparameter dataclasses, loadable from YAML with strict checking.

EasyEdit's YAML loading silently depends on PyYAML quirks ("5e-4" is a
string to PyYAML) and its error for an unknown key is a bare TypeError.
Here every field is coerced to its declared type and an unknown key is
rejected by name, with the closest known key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T", bound="HyperParams")

# Keys that describe where the configuration came from; accepted in every file.
METADATA_KEYS = frozenset({"method", "alg_name", "model", "model_name", "description"})


class HyperParamsError(ValueError):
    """A hyperparameter file or value is wrong; the message says which key and how to fix it."""


@dataclasses.dataclass
class HyperParams:
    """Base class: subclasses are plain dataclasses with typed fields and defaults."""

    def edit_calls_limit(self) -> tuple[int, str] | None:
        """The most edit calls one chain of edits can hold before it is restored, and how to raise it; None: no
        limit. A method with a fixed store (MELO: one LoRA block per call) overrides it, so a run is refused before
        it starts rather than after hours of editing."""
        return None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any], *, source: str = "hyperparameters") -> T:
        """Build from a mapping, rejecting unknown keys and coercing values to the declared types."""
        known = set(cls.field_names())
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in METADATA_KEYS and key not in known:
                continue
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise HyperParamsError(
                    f"{source}: unknown key {key!r} for {cls.__name__}{hint} Known keys: {', '.join(sorted(known))}"
                )
            kwargs[key] = _coerce(value, hints[key], f"{source}: {key}")
        try:
            params = cls(**kwargs)
        except TypeError as exc:  # a required field without default is missing
            raise HyperParamsError(f"{source}: {exc}") from None
        params.validate()
        return params

    @classmethod
    def from_yaml(cls: type[T], path: str | Path, overrides: Mapping[str, Any] | None = None) -> T:
        path = Path(path)
        if not path.is_file():
            raise HyperParamsError(f"hyperparameter file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise HyperParamsError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise HyperParamsError(f"{path} must hold a mapping of key: value, found {type(loaded).__name__}")
        loaded.update(overrides or {})
        return cls.from_dict(loaded, source=str(path))

    def replace(self: T, **changes: Any) -> T:
        """A copy with some values changed, checked like a loaded file."""
        merged = {**self.to_dict(), **changes}
        return type(self).from_dict(merged, source=f"{type(self).__name__}.replace")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each field's default (fields without one are left out)."""
        found: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                found[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                found[f.name] = f.default_factory()
        return found

    def validate(self) -> None:
        """Subclasses check value ranges here and raise HyperParamsError."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a YAML value to a field's declared type (handles '5e-4' strings, ints for floats, lists)."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except HyperParamsError as exc:
                errors.append(str(exc))
        raise HyperParamsError(f"{where}: {value!r} matches none of {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise HyperParamsError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and args:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise HyperParamsError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise HyperParamsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise HyperParamsError(f"{where}: expected true or false, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise HyperParamsError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise HyperParamsError(f"{where}: expected a number, got {value!r}") from None
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise HyperParamsError(f"{where}: expected a whole number, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise HyperParamsError(f"{where}: expected a whole number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise HyperParamsError(f"{where}: expected a string, got {value!r}")
        return value
    return value
