"""routelab: routing in Transformer language models (attention routing and Mixture of Experts)."""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

# importing the packages of each family registers their kinds (attention kinds, FFN kinds, routers)
import routelab.attention  # noqa: F401  (registers attention kinds)
import routelab.ffn  # noqa: F401  (registers the dense FFN)
import routelab.moe  # noqa: F401  (registers ffn.kind=moe and the routers)
from routelab.config import (
    AttentionConfig,
    Config,
    ConfigError,
    DataConfig,
    FFNConfig,
    ModelConfig,
    TrainConfig,
)
from routelab.model import ModelOutput, RoutedTransformer

__all__ = [
    "AttentionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FFNConfig",
    "ModelConfig",
    "ModelOutput",
    "RoutedTransformer",
    "TrainConfig",
]
