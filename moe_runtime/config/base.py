"""The base of every config model, byte sizes with units, and validation errors that name the YAML path."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from moe_runtime.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_byte_size(value: Any) -> Any:
    """`"24GiB"` -> 25769803776, `"80GB"` -> 80000000000; integers pass through (pydantic checks them)."""
    if not isinstance(value, str):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value)
    if not m:
        raise ValueError("expected bytes as an integer or with a unit, e.g. 2GiB, 24GiB, 512MiB, 80GB")
    unit = m.group(2) or "B"
    scale = 1 if unit == "B" else (1024 if "i" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]


def validate(cls: type[Section], data: dict[str, Any], source: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, cls)) from None


def format_validation_error(e: ValidationError, source: str, cls: type[Section]) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = err["loc"][:-1]
            allowed = _allowed_keys(cls, parent)
            lines.append(f"{where}: unknown key; allowed: {allowed}")
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict):
            # a section's own validator: its message names the values, the section dump would only add noise
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{where}={err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}")
    return f"{source}: " + "; ".join(lines)


def _allowed_keys(cls: type[Section], loc: tuple) -> list[str]:
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(part) if model else None
        model = field.annotation if field is not None else None
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
