"""The error a configuration value raises, and the checks every options dataclass uses.

A leaf: imports nothing of routelab, so every package can import it. A check names the field,
the value and what is allowed, so a wrong config fails with one line a user can act on.
"""

from __future__ import annotations

from typing import Any

ERROR_FILE_ENV = "ROUTELAB_ERROR_FILE"  # a child routelab process leaves its one-line error in this file


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and what is allowed."""


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError`` naming ``name``, ``value`` and ``allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid; allowed: {allowed}")


def check_positive(obj: Any, *names: str) -> None:
    """Each field ``names`` of ``obj`` is a number > 0."""
    for n in names:
        v = getattr(obj, n)
        check(v is not None and v > 0, qualified(obj, n), v, "a number > 0")


def check_fraction(obj: Any, name: str, closed_right: bool = False) -> None:
    """Field ``name`` of ``obj`` lies in [0, 1) (or [0, 1] with ``closed_right``)."""
    v = getattr(obj, name)
    ok = 0.0 <= v <= 1.0 if closed_right else 0.0 <= v < 1.0
    check(ok, qualified(obj, name), v, "0 <= value <= 1" if closed_right else "0 <= value < 1")


def qualified(obj: Any, name: str) -> str:
    """``model.attention.window``: the field's dotted name, from the dataclass's ``_section``."""
    prefix = getattr(obj, "_section", type(obj).__name__)
    return f"{prefix}.{name}"
