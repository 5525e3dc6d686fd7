"""The README's Python snippets run as written: the library examples in order (one namespace), and
the example router file as a router routelab then uses by name."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
FILE_PREFIX = "# routelab/"  # a block that is a file to add to the package, not an example to run


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_snippets_run(capsys):
    blocks = [b for b in _blocks() if not b.startswith(FILE_PREFIX)]
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102  (our own README)
    printed = capsys.readouterr().out
    assert printed.startswith("def parse(")  # the prompt, decoded back to text, then the continuation


def test_the_readme_router_file_is_a_working_router():
    """The one-file router of the README, registered in a fresh process, trains in a model by name."""
    (router,) = [b for b in _blocks() if b.startswith("# routelab/moe/routers/")]
    check = textwrap.dedent(
        """
        import torch
        from routelab import ModelConfig, RoutedTransformer
        from routelab.report.flops import model_cost

        model = RoutedTransformer(ModelConfig(vocab_size=11, d_model=16, n_heads=2, max_seq_len=8,
                                              ffn={"kind": "moe", "router": "sigmoid", "num_experts": 4}))
        x = torch.randint(0, 11, (2, 8))
        model(x, labels=x).loss.backward()
        assert model.layers[0].ffn.router.weight.grad.abs().sum() > 0
        assert model_cost(model, 8).ffn_flops > 0
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", router + check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
