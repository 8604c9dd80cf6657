"""README's Python snippets run as pasted, in order, in one namespace (the default model, CPU)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_snippets_run_as_pasted(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape[0] == 1  # generate() ran
    assert namespace["codes"].shape == (1, 8, 4096, 8)
