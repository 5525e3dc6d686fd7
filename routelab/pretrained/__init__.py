"""Pretrained weights: converted, never wrapped (see DESIGN.md). ``upcycle`` maps a trained model
onto another routing config (dense FFN -> MoE experts, dense -> sparse attention, longer positions)."""

from routelab.pretrained.upcycle import Conversion, check_convertible, upcycle, upcycle_into, upcycle_with_conversion

__all__ = ["Conversion", "check_convertible", "upcycle", "upcycle_into", "upcycle_with_conversion"]
