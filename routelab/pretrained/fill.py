"""A model built without parameter memory, then filled from a checkpoint one tensor at a time.

``empty_model`` builds a ``RoutedTransformer`` whose parameters lie on the meta device (shapes, no
storage, no initialisation) while its buffers are built as usual on the CPU: the RoPE tables and
the other tables a module computes from its config keep exactly the values a normal build gives
them (``to_empty`` would leave them uninitialised; the approach of ``accelerate``'s
``init_empty_weights``). ``fill`` gives every parameter CPU storage, initialises the few the
checkpoint lacks as a newly built model does (``RoutedTransformer.reset_parameters``), then copies
each checkpoint tensor into its parameter or buffer. Peak memory is the model plus one checkpoint
tensor, instead of a random model plus the whole converted checkpoint beside it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from routelab.config import ModelConfig
from routelab.errors import ConfigError
from routelab.model import RoutedTransformer
from routelab.pretrained.checkpoint import Source

log = logging.getLogger("routelab.pretrained")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers is moved to the meta device (its
    initialisation then does nothing); buffers are untouched. Not thread-safe (patches
    ``nn.Module.register_parameter``)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(cfg: ModelConfig) -> RoutedTransformer:
    """``RoutedTransformer(cfg)`` with its parameters on the meta device and real buffers."""
    with parameters_on_meta():
        return RoutedTransformer(cfg)


def materialise(model: nn.Module) -> None:
    """Give every meta parameter uninitialised CPU storage; a parameter shared by several modules
    (tied embeddings) stays one parameter."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = type(p)(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]


def fill(model: RoutedTransformer, sources: dict[str, Source]) -> RoutedTransformer:
    """Materialise ``model`` (from ``empty_model``) and copy into it every tensor of ``sources``
    (keyed by its name in the model's state dict), one at a time; the parameters ``sources`` lacks
    are initialised as in a newly built model. Returns ``model``."""
    params = dict(model.named_parameters())  # a tied parameter under its first name only
    buffers = dict(model.named_buffers())
    folder = next(iter(sources.values())).tensors.folder if sources else None
    for name in sources:
        if name not in params and name not in buffers:
            raise ConfigError(f"import of {str(folder)!r} produced {name!r}, which the model lacks (a bug in the family's mapping)")
    fresh = sorted(set(params) - set(sources))
    materialise(model)
    if fresh:
        log.info("not in the checkpoint, initialised fresh: %s", ", ".join(fresh))
        model.reset_parameters(fresh)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, source in sources.items():
        source.fill(targets[name].data, name)
    return model
