"""The two halves of the pretrained path together: a Hugging Face decoder imported (grouped-query
attention, converted RoPE layout, untied head) and then upcycled into top-2 MoE computes the
imported model's function at step 0, and with sliding-window attention over a window that covers
the sequence too."""

from __future__ import annotations

import dataclasses

import torch

from routelab.pretrained import from_hf, upcycle
from tests.pretrained.helpers import save_decoder


def test_an_imported_llama_upcycled_to_top2_moe_is_the_same_function_at_step_0(tmp_path):
    save_decoder("llama", tmp_path / "hf")
    dense = from_hf(tmp_path / "hf").eval()
    assert dense.cfg.n_kv_heads == 2 and dense.cfg.ffn.kind == "dense"
    ffn = {"kind": "moe", "num_experts": 4, "router": {"kind": "topk", "top_k": 2}, "activation": dense.cfg.ffn.activation,
           "bias": dense.cfg.ffn.bias, "hidden": dense.cfg.ffn_hidden}
    ids = torch.randint(0, dense.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(ids).logits
        moe = upcycle(dense, dataclasses.replace(dense.cfg, ffn=ffn)).eval()
        torch.testing.assert_close(moe(ids).logits, want, atol=1e-5, rtol=1e-5)
        local = dataclasses.replace(dense.cfg, ffn=ffn, attention={"kind": "local", "window": 16, "block_size": 4})
        torch.testing.assert_close(upcycle(dense, local).eval()(ids).logits, want, atol=1e-5, rtol=1e-5)
        narrow = dataclasses.replace(dense.cfg, attention={"kind": "local", "window": 2, "block_size": 4})
        assert not torch.allclose(upcycle(dense, narrow).eval()(ids).logits, want, atol=1e-3)


def test_upcycle_and_init_from_of_a_hugging_face_folder_say_to_import_it_first(tmp_path, capsys):
    """A Hugging Face folder given where a routelab model is read (``upcycle``, ``train --init-from``)
    is named as one, with the import command to run first (it used to fail on 'model.architectures')."""
    from routelab.cli import main

    hf = tmp_path / "hf"
    save_decoder("llama", hf)
    for argv, then in ((["upcycle", str(hf), "--out", str(tmp_path / "up"), "--set", "model.ffn.kind=moe"], "upcycle DIR"),
                       (["train", "lm-tiny", "--init-from", str(hf), "--out", str(tmp_path / "run")], "train --init-from DIR")):
        capsys.readouterr()
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("routelab: error:")]
        assert len(err) == 1 and err[0].endswith(
            f"{str(hf)!r} is a Hugging Face checkpoint (model_type 'llama'), not a routelab model; "
            f"run `routelab import hf {hf} --out DIR` first, then {then}"), err
        assert not (tmp_path / "up").exists()
