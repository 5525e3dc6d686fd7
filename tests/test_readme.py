"""The README's Python snippets run as written (in order, sharing one namespace)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippets_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102  (our own README)
    printed = capsys.readouterr().out
    assert printed.startswith("def parse(")  # the prompt, decoded back to text, then the continuation
