"""lm-eval as users type it: `lm_eval --model hf --model_args pretrained=PATH,attn_implementation=pqcache,...`.

The real lm-eval CLI in a subprocess (which never imports pqflex itself: the installed .pth hook must), on the
default model, with a local generate_until passkey task (no downloads). pqcache finds the passkeys; the same
budget spent on sink + recent tokens only (pq_method=streaming) cannot, which proves the settings took effect.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from pqflex.harness.lm_eval_task import write_task
from pqflex.integrations import lm_eval as glue
from pqflex.harness.models import materialize_default_model

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    path = materialize_default_model(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    root = write_task(tmp_path_factory.mktemp("lm_eval_task"), tokenizer, 3, 1500, depths=[0.3, 0.5, 0.7])
    return path, root


def lm_eval(model_path, task_root, out, model_args):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={model_path},dtype=float32,{model_args}", "--tasks", "pqflex_passkey", "--include_path",
           str(task_root), "--device", "cpu", "--batch_size", "1", "--output_path", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    with open(result) as f:
        return json.load(f)["results"]["pqflex_passkey"]["exact_match,first-number"], done.stderr


def test_lm_eval_cli_runs_pqcache_with_its_settings(task_dir, tmp_path):
    model_path, root = task_dir
    found, log = lm_eval(model_path, root, tmp_path / "pq", "attn_implementation=pqcache,pq_budget=0.2,pq_M=2")
    assert "pqflex: pqcache attention with PQConfig(M=2, nbits=8, sink_size=32, budget=0.2" in log  # pq_M applied
    assert found >= 2 / 3
    streaming, log = lm_eval(model_path, root, tmp_path / "st",
                             "attn_implementation=pqcache,pq_budget=0.2,pq_method=streaming")
    assert "recent_ratio=1.0" in log
    assert streaming == 0.0


def test_pq_settings_without_pqcache_raise():
    class Model:
        class config:
            _attn_implementation = "sdpa"

    with pytest.raises(ValueError, match="model_args \\['pq_budget'\\] need attn_implementation=pqcache"):
        glue.apply(Model(), {"budget": 0.1})
    assert glue.apply(Model(), {}) is None
    kwargs = {"pq_budget": 0.1, "dtype": "float32"}
    assert glue.pop_settings(kwargs) == {"budget": 0.1} and kwargs == {"dtype": "float32"}


def test_startup_hook_is_light():
    code = "import sys; print('_pqflex_lm_eval_hook' in sys.modules, 'importlib.abc' in sys.modules, len(sys.modules))"
    hooked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    bare = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True).stdout.split()
    assert hooked[:2] == ["True", "False"], hooked  # the hook is installed and imports nothing heavy
    assert int(hooked[2]) - int(bare[2]) < 20, (hooked, bare)  # site + the .pth files, not importlib.abc's 60


def test_a_broken_pqflex_never_breaks_lm_eval(tmp_path):
    broken = tmp_path / "pqflex"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated: incompatible transformers')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = "import warnings; warnings.simplefilter('always'); import lm_eval.models.huggingface as m; print(m.HFLM)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # not the checkout: its pqflex would come first
    assert done.returncode == 0 and "HFLM" in done.stdout, done.stderr[-2000:]
    assert "pqflex: attn_implementation='pqcache' is unavailable in lm-eval" in done.stderr
