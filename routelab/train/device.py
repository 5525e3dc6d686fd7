"""The device helpers under their old name: they live in ``routelab.device`` (a leaf, so layers below
``train`` use them too); import them from there. Kept for imports inside ``routelab.train`` and older code."""

from routelab.device import device_of, to_device

__all__ = ["device_of", "to_device"]
