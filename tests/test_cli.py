"""The ``pqflex`` command as users type it: one spelling of every shared flag, errors before any work, no
tracebacks for user errors (subprocesses, as a shell runs them)."""

import subprocess
import sys

import pytest

import pqflex


def pqflex_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pqflex.harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version_and_help_show_defaults():
    out = pqflex_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"pqflex {pqflex.__version__}"
    for command in ("demo", "bench", "eval"):
        text = pqflex_cli(command, "--help").stdout
        for flag in ("--budget", "--pq", "--device"):  # one spelling in every command
            assert flag in text, (command, flag)
        assert "(default:" in text
    assert "--batch-size" in pqflex_cli("bench", "--help").stdout
    assert "--batch-size" in pqflex_cli("eval", "--help").stdout


@pytest.mark.parametrize("args,message", [
    (["bench", "--budget", "0"], "budget must be a fraction of the context in (0, 1] or a whole number"),
    (["eval", "--budgets", "0.1,1.5"], "got '1.5'"),
    (["bench", "--preset", "llama-9"], "invalid choice: 'llama-9'"),
    (["bench", "--methods", "pqcache,flash"], "unknown method 'flash'"),
    (["eval", "--methods", "dense"], "unknown method 'dense'"),
    (["eval", "--tasks", "passkey,qa"], "unknown task 'qa'"),
    (["demo", "--pq", "M=3x"], "PQConfig.M must be an int"),
    (["eval", "--pq", "budget=0.1"], "give the budget with --budget"),
    (["bench", "--pq", "nbitz=8"], "nbitz"),
    (["eval", "--resume"], "--resume needs --json"),
])
def test_bad_values_are_rejected_by_the_parser_without_a_traceback(args, message):
    out = pqflex_cli(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_user_errors_after_parsing_print_one_line(tmp_path):
    out = pqflex_cli("bench", "--preset", "tiny", "--selection", "block", "--block-size", "0", "--device", "cpu")
    assert out.returncode == 2 and "pqflex bench: error: PQConfig.block_size=0 is out of range" in out.stderr
    assert "Traceback" not in out.stderr
    missing = pqflex_cli("eval", "--from-json", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "nope.json" in missing.stderr and "Traceback" not in missing.stderr


def test_plot_without_matplotlib_fails_before_any_work(tmp_path):
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'matplotlib' else real(n, *a); "
            "from pqflex.harness.cli import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "eval", "--from-json", str(tmp_path / "x.json"), "--plot",
                          str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--plot needs matplotlib: pip install 'pqflex[plot]'" in out.stderr


def test_model_command_prints_the_default_models_path():
    from pqflex.harness.models import materialize_default_model

    out = pqflex_cli("model", timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == str(materialize_default_model(progress=False))


def test_ctrl_c_in_eval_points_to_resume(monkeypatch, capsys, tmp_path):
    from pqflex.harness import cli, evaluate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "main", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--json", str(tmp_path / "run.json")])
    assert exit_.value.code == 130
    assert f"what was measured is in {tmp_path / 'run.json'}: rerun the same command with --resume" in \
        capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["demo", "--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["demo", "--model", "/nonexistent"], "no model directory at '/nonexistent'"),
    (["eval", "--model", "/nonexistent"], "no model directory at '/nonexistent'"),
    (["demo", "--pq", "foo=1"], "unknown PQConfig field(s) foo; allowed: M, nbits, sink_size"),
    (["bench", "--warmup", "1", "--device", "cuda:x"], "got 'cuda:x'"),
])
def test_user_mistakes_are_one_line_with_status_2(args, message):
    out = pqflex_cli(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_loading():
    out = pqflex_cli("demo", "--device", "cuda")
    assert out.returncode == 2 and "--device cuda: no CUDA device is available" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not out.stdout


def test_help_is_light_and_shows_each_default_once():
    code = ("import sys\nfrom pqflex.harness.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    for args in (["--help"], ["demo", "--help"], ["demo", "--device", "gpu"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "False False", (args, out.stdout[-300:])  # no heavy imports
    text = " ".join(pqflex_cli("eval", "--help").stdout.split())  # unwrapped
    assert "(default: 0.2,0.1,0.05)" in text and "[0.2" not in text and "(default: {})" not in text
    assert text.count("default") == text.count("(default:")  # one mention of each
    assert "A pass key hidden" in pqflex_cli("demo", "--help").stdout  # a description


@pytest.mark.slow
def test_pq_settings_that_do_not_fit_the_model_fail_before_the_prefill():
    out = pqflex_cli("demo", "--pq", "M=7", "--length", "1024", "--device", "cpu", timeout=600)
    assert out.returncode == 2 and "PQConfig.M=7 does not divide the head dim 64" in out.stderr, out.stderr
    assert "prefill" not in out.stdout


def test_cache_command_shows_and_clears(tmp_path):
    env_dir = tmp_path / "store"
    run = lambda *a: subprocess.run([sys.executable, "-m", "pqflex.harness.cli", "cache", *a], capture_output=True,
                                    text=True, timeout=120, env={**__import__("os").environ,
                                                                 "PQFLEX_CACHE_DIR": str(env_dir)})
    assert "(empty)" in run().stdout
    (env_dir / "models" / "some-model").mkdir(parents=True)
    (env_dir / "models" / "some-model" / "model.safetensors").write_bytes(b"x" * 2**20)
    (env_dir / "leftover.bin").write_bytes(b"y" * 100)
    shown = run().stdout
    assert "models/some-model" in shown and "leftover.bin" in shown and "1.0 MiB" in shown
    cleared = run("--clear")
    assert cleared.returncode == 0 and not env_dir.exists()


def test_converted_models_go_to_the_one_cache_directory(monkeypatch, tmp_path):
    from pqflex import storage
    from pqflex.harness.models import default_cache_dir

    monkeypatch.setenv("PQFLEX_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models" and storage.cache_dir() == tmp_path


def test_lm_eval_task_command_writes_an_offline_task(tmp_path):
    from pqflex.harness.models import materialize_default_model

    out = pqflex_cli("lm-eval-task", str(tmp_path / "task"), "--prompts", "2", "--length", "300", timeout=600)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "task" / "pqflex_passkey.yaml").is_file()
    assert len((tmp_path / "task" / "passkey.jsonl").read_text().splitlines()) == 2
    assert f"pretrained={materialize_default_model(progress=False)}" in out.stdout
