"""Upcycling under its old name: the mapping lives in ``routelab.upcycle`` (below ``routelab.train``,
whose ``init_from`` starts runs from it); import it from there. Kept so ``routelab.pretrained.upcycle``
imports keep working."""

from routelab.upcycle import (
    Conversion,
    check_convertible,
    config_changes,
    fill_from_source,
    upcycle,
    upcycle_into,
    upcycle_with_conversion,
)

__all__ = ["Conversion", "check_convertible", "config_changes", "fill_from_source", "upcycle", "upcycle_into", "upcycle_with_conversion"]
