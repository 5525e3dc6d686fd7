"""Pretrained weights from elsewhere, converted into ordinary ``RoutedTransformer`` models.

``hf``: Hugging Face checkpoints from a local folder (``load_hf``; ``routelab import hf``).
"""

from routelab.pretrained.hf import FAMILIES, hf_model_config, load_hf, load_hf_tokenizer

__all__ = ["FAMILIES", "hf_model_config", "load_hf", "load_hf_tokenizer"]
