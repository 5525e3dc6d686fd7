"""routelab: routing in Transformer language models (attention routing and Mixture of Experts)."""

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

__version__ = "0.1.0"

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
