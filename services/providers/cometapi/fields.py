"""Reading the loosely typed fields of CometAPI's answers, and checking the ids that go into requests."""
from __future__ import annotations

from typing import Any

from services.errors import ValidationError


def as_float(value: Any) -> float | None:
    """A number from an answer's field (numbers may come as strings); None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def as_int(value: Any) -> int | None:
    number = as_float(value)
    return int(number) if number is not None and number == int(number) else None


def as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def require_id(value: str, name: str) -> None:
    """An id must be given before a request that names it is sent."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"No {name} was given.", hint="Pick a job first.", fields={name: "required"})
