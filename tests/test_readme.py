"""Every Python block of README.md runs verbatim as a file on the CPU and prints what its comments say.

A block's ``# -> TEXT`` comment states what its output contains; a block whose first line names
``torchrun --nproc-per-node N`` runs on N processes the same way (``torch.distributed.run``). They load the real
default model: marked slow.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(?:python|py)\n(.*?)^```", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def _id(code: str) -> str:
    line = next(l for l in code.splitlines() if l.strip() and not l.startswith(("import", "from")))
    return re.sub(r"\W+", "_", line)[:40]


def test_the_readme_has_its_blocks_and_each_says_what_it_prints():
    found = blocks()
    assert len(found) >= 6
    for code in found:
        assert "# -> " in code, code.splitlines()[0]


@pytest.mark.slow
@pytest.mark.parametrize("code", blocks(), ids=_id)
def test_readme_block_runs_verbatim(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    ranks = re.search(r"torchrun --nproc-per-node (\d+)", code.splitlines()[0])
    cmd = [sys.executable, str(script)] if ranks is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", ranks.group(1), str(script)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(README.parent)}  # the checkout's pqflex, as `pip install -e .` gives
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for expected in re.findall(r"# -> (.+)$", code, re.M):
        assert expected.strip() in done.stdout, (expected, done.stdout[-2000:])
