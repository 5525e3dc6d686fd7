"""Pretrained weights from elsewhere, converted into ordinary ``RoutedTransformer`` models, never wrapped.

``hf``: Hugging Face checkpoints from a local folder (``from_hf``; ``routelab import hf``), read lazily
(``checkpoint``) into a model built without parameter memory and filled one tensor at a time (``fill``).
``upcycle``: a trained model mapped onto another routing config (dense FFN -> MoE experts, dense ->
sparse attention, longer positions; ``routelab upcycle``, ``train.init_from``). The mapping lives in
``routelab.upcycle``, below ``train`` (which starts runs from it); ``pretrained.upcycle`` re-exports it.

This package builds on ``routelab.train`` (it writes run folders), never the other way round, and
``routelab.model`` knows nothing of it.
"""

from routelab.pretrained.hf import FAMILIES, convert_hf, from_hf, hf_model_config, load_hf_tokenizer
from routelab.pretrained.upcycle import Conversion, check_convertible, upcycle, upcycle_into, upcycle_with_conversion

__all__ = [
    "FAMILIES", "convert_hf", "from_hf", "hf_model_config", "load_hf_tokenizer",
    "Conversion", "check_convertible", "upcycle", "upcycle_into", "upcycle_with_conversion",
]
