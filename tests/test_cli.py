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
