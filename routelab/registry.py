"""Small explicit registries: a variant is chosen by one string field of its config section.

Each registry maps a name to a pair ``(config_class, module_class)``. The config class is a
dataclass holding that variant's options (so YAML sections are typed and validated per kind);
the module class is built from it. An unknown name raises an error listing the known names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnknownKindError(ValueError):
    """Raised for a name that is not in a registry; the message lists the known names."""


@dataclass(frozen=True)
class Entry:
    name: str
    config_class: type
    module_class: type


class Registry:
    """A name -> (config dataclass, module class) table for one family (attention, ffn, ...)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config_class: type) -> Callable[[type], type]:
        """Class decorator: ``@ATTENTION.register("dense", DenseAttentionConfig)``. The module class
        also gets ``kind = name`` and ``config_class``, so it can name itself and build its own options."""

        def decorator(module_class: type) -> type:
            if name in self._entries:
                raise ValueError(f"{self.family} kind {name!r} is registered twice")
            self._entries[name] = Entry(name, config_class, module_class)
            module_class.kind, module_class.config_class = name, config_class
            return module_class

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def names_where(self, flag: str, value: bool = True) -> list[str]:
        """Sorted names whose module class has the class attribute ``flag`` truthy (a capability such
        as a router's ``supports_selection_bias``), or with ``value=False`` falsy (those without a
        property such as ``whole_batch``); a class without the attribute lacks it. A flag that no
        registered class defines is a typo and raises."""
        classes = {name: entry.module_class for name, entry in self._entries.items()}
        if classes and not any(hasattr(c, flag) for c in classes.values()):
            raise AttributeError(f"no {self.family} kind defines the flag {flag!r}")
        return sorted(name for name, c in classes.items() if bool(getattr(c, flag, False)) == value)

    def get(self, name: Any) -> Entry:
        if name not in self._entries:
            hint = difflib.get_close_matches(str(name), self.names(), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UnknownKindError(
                f"unknown {self.family} kind {name!r}{did_you_mean}; known kinds: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


ATTENTION = Registry("attention")  # filled by routelab.attention
FFN = Registry("ffn")  # filled by routelab.ffn and routelab.moe
ROUTERS = Registry("router")  # filled by routelab.moe.routers
