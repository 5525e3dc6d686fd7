"""Pretrained weights from elsewhere, converted into ordinary ``RoutedTransformer`` models.

``hf``: Hugging Face checkpoints from a local folder (``RoutedTransformer.from_hf``; ``routelab import hf``).
"""

from routelab.pretrained.hf import FAMILIES, convert_hf, hf_model_config, load_hf_tokenizer

__all__ = ["FAMILIES", "convert_hf", "hf_model_config", "load_hf_tokenizer"]
