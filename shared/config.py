"""Reading typed settings from `TIDEWIRE_*` environment variables (one settings object per service)."""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


def _convert(raw: str, typ: Any) -> Any:
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(typ) if a is not type(None)]
        return None if raw == "" else _convert(raw, args[0])
    if typ is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if typ in (int, float, str):
        return typ(raw)
    if origin is tuple:
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    return raw


def from_env(cls: type[T], prefix: str = "TIDEWIRE_", env: dict[str, str] | None = None) -> T:
    """Builds a dataclass of settings: field `nats_url` is read from `TIDEWIRE_NATS_URL`."""
    env = dict(os.environ) if env is None else env
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = prefix + f.name.upper()
        if name in env:
            kwargs[f.name] = _convert(env[name], hints[f.name])
    return cls(**kwargs)
