"""The embedded default model (GGUF -> Hugging Face directory) and the passkey prompt builder.

Tests marked ``slow`` convert and load the real SmolLM2-135M-Instruct (about 40 s on two CPU cores, once per
module); the others only read the tokenizer from the GGUF file.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import re

import pytest
import torch

from pqflex.harness import models
from pqflex.harness.models import GGUF_INSTALL_COMMAND, find_default_gguf, load_default_model, materialize_default_model
from pqflex.harness.prompts import ANSWER_PREFIX, NEEDLE, passkey_found, passkey_prompt


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    gguf = find_default_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return materialize_default_model(tmp_path_factory.mktemp("models"), progress=False)


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    return load_default_model(attn_implementation="sdpa", cache_dir=model_dir.parent, progress=False)


def _no_package(name, *args, **kwargs):
    return None


# --- locating the GGUF file -------------------------------------------------------------------------------


def test_find_default_gguf():
    path = find_default_gguf()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert "SmolLM2-135M-Instruct" in path.name


def test_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _no_package)
    with pytest.raises(FileNotFoundError, match=re.escape(GGUF_INSTALL_COMMAND)):
        find_default_gguf()


def test_package_without_gguf(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(models.GGUF_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        find_default_gguf()


# --- materialization without converting -------------------------------------------------------------------


def test_materialize_missing_package_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", _no_package)
    with pytest.raises(FileNotFoundError, match=re.escape(GGUF_INSTALL_COMMAND)):
        materialize_default_model(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / models.DEFAULT_MODEL_NAME).exists()


def test_materialize_refuses_incomplete_target(tmp_path):
    target = tmp_path / models.DEFAULT_MODEL_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=re.escape(str(target))):
        materialize_default_model(tmp_path, progress=False)


def test_interrupted_conversion_leaves_no_directory(monkeypatch, tmp_path):
    def half_convert(gguf, out_dir, progress):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", half_convert)
    with pytest.raises(KeyboardInterrupt):
        materialize_default_model(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_installed_gguf_has_the_pinned_sha256():
    assert models.file_sha256(find_default_gguf()) == models.GGUF_SHA256


def test_gguf_with_another_sha256_is_refused_before_converting(monkeypatch, tmp_path):
    fake = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"not the model")
    monkeypatch.setattr(models, "find_default_gguf", lambda: fake)
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted a file with the wrong sha256"))
    with pytest.raises(ValueError, match=f"has sha256 {models.file_sha256(fake)}, not the {models.GGUF_SHA256}"):
        materialize_default_model(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / models.DEFAULT_MODEL_NAME).exists()


def test_copy_is_converted_again_when_its_gguf_changes(monkeypatch, tmp_path):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"version 1")
    converted = []

    def fake_convert(source, out_dir, progress):
        converted.append(source.read_bytes())
        for name in models._MARKER_FILES:
            (out_dir / name).write_text(source.read_text())

    monkeypatch.setattr(models, "find_default_gguf", lambda: gguf)
    monkeypatch.setattr(models, "_convert", fake_convert)
    monkeypatch.setattr(models, "GGUF_SHA256", models.file_sha256(gguf))
    target = materialize_default_model(tmp_path / "cache", progress=False)
    assert materialize_default_model(tmp_path / "cache", progress=False) == target and converted == [b"version 1"]
    assert json.loads((target / models._SOURCE_FILE).read_text())["sha256"] == models.GGUF_SHA256
    gguf.write_bytes(b"version 2")  # e.g. a reinstall of the package
    monkeypatch.setattr(models, "GGUF_SHA256", models.file_sha256(gguf))
    assert materialize_default_model(tmp_path / "cache", progress=False) == target
    assert converted == [b"version 1", b"version 2"] and (target / "config.json").read_text() == "version 2"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [models.DEFAULT_MODEL_NAME]


def test_load_rejects_non_float_dtype(tmp_path):
    with pytest.raises(TypeError, match="torch.int8"):
        load_default_model(dtype=torch.int8, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="'float32'"):
        load_default_model(dtype="float32", cache_dir=tmp_path)


# --- passkey prompts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [1024, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_within_two_percent(tokenizer, n_tokens, depth):
    prompt = passkey_prompt(tokenizer, n_tokens, depth, seed=3)
    assert prompt.input_ids.dtype == torch.long
    assert prompt.input_ids.shape == (1, prompt.n_tokens)
    assert abs(prompt.n_tokens - n_tokens) <= 0.02 * n_tokens
    assert prompt.attention_mask.shape == prompt.input_ids.shape


def test_prompt_layout(tokenizer):
    prompt = passkey_prompt(tokenizer, 512, 0.5, passkey=71432)
    assert prompt.passkey == "71432"
    text = tokenizer.decode(prompt.input_ids[0])
    needle = NEEDLE.format(passkey="71432")
    assert text.startswith("There is an important info hidden")
    assert text.count(needle) == 1
    assert text.endswith("What is the pass key? " + ANSWER_PREFIX)
    assert text.index("What is the pass key?") > text.index(needle)


def test_chat_prompt_layout(tokenizer):
    prompt = passkey_prompt(tokenizer, 512, 0.5, passkey="71432", chat=True)
    text = tokenizer.decode(prompt.input_ids[0])
    assert text.count("<|im_start|>user") == 1
    assert text.endswith("<|im_start|>assistant\n" + ANSWER_PREFIX)
    # The chat template writes BOS itself; the tokenizer must not add a second one.
    assert prompt.input_ids[0, :2].tolist().count(tokenizer.bos_token_id) == 1
    bare = tokenizer.decode(passkey_prompt(tokenizer, 512, 0.5, passkey="71432", chat=True,
                                           answer_prefix=None).input_ids[0])
    assert bare.endswith("<|im_start|>assistant\n")


def test_needle_moves_with_depth(tokenizer):
    needle = NEEDLE.format(passkey="12345")
    offsets = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        text = tokenizer.decode(passkey_prompt(tokenizer, 1024, depth, passkey="12345").input_ids[0])
        offsets.append(text.index(needle))
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


def test_prompt_is_deterministic(tokenizer):
    a = passkey_prompt(tokenizer, 600, 0.3, seed=7)
    b = passkey_prompt(tokenizer, 600, 0.3, seed=7)
    c = passkey_prompt(tokenizer, 600, 0.3, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and a.passkey == b.passkey
    assert re.fullmatch(r"\d{5}", a.passkey)
    assert a.passkey != c.passkey


@pytest.mark.parametrize("depth", [-0.1, 1.01, math.nan, math.inf])
def test_depth_outside_unit_interval(tokenizer, depth):
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        passkey_prompt(tokenizer, 1024, depth)


def test_too_few_tokens_names_minimum(tokenizer):
    with pytest.raises(ValueError, match=r"minimum for this tokenizer is \d+") as info:
        passkey_prompt(tokenizer, 20, 0.5)
    minimum = int(re.search(r"minimum for this tokenizer is (\d+)", str(info.value)).group(1))
    assert passkey_prompt(tokenizer, minimum, 0.5).n_tokens == minimum
    with pytest.raises(ValueError, match=f"n_tokens={minimum - 1}"):
        passkey_prompt(tokenizer, minimum - 1, 0.5)


@pytest.mark.parametrize("passkey", ["12a45", "-123", "", 1.5])
def test_bad_passkey(tokenizer, passkey):
    with pytest.raises((ValueError, TypeError), match="passkey"):
        passkey_prompt(tokenizer, 512, 0.5, passkey=passkey)


@pytest.mark.parametrize("text, found", [
    (" 71432. Remember it.", True),
    ("The pass key is 71432", True),
    ("71432", True),
    (" 714320", False),
    (" 7143", False),
    (" 7 then 71432", False),
    (" 71,432", False),
    ("I don't know.", False),
    ("", False),
])
def test_passkey_found(text, found):
    assert passkey_found(text, "71432") is found
    assert passkey_found(text, 71432) is found


# --- the real model ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_progress_bar_when_asked_for_none(model_dir, capfd):
    capfd.readouterr()
    load_default_model(cache_dir=model_dir.parent, progress=False)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err[-500:]


@pytest.mark.slow
def test_materialize_is_idempotent(model_dir):
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert materialize_default_model(model_dir.parent, progress=False) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in model_dir.parent.iterdir()] == [models.DEFAULT_MODEL_NAME]
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert "_model_name_or_path" not in config
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (30, 9, 3, 64)


@pytest.mark.slow
def test_loaded_model_matches_gguf(model_and_tokenizer):
    from transformers import AutoModelForCausalLM

    model, tokenizer = model_and_tokenizer
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    gguf = find_default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # [1, S]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [0.2, 0.5, 0.8])
def test_full_attention_finds_passkey(model_and_tokenizer, depth):
    model, tokenizer = model_and_tokenizer
    prompt = passkey_prompt(tokenizer, 1024, depth, seed=round(depth * 10))
    with torch.no_grad():
        out = model.generate(prompt.input_ids, attention_mask=prompt.attention_mask, max_new_tokens=8,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, prompt.n_tokens:], skip_special_tokens=True)
    assert passkey_found(answer, prompt.passkey), (prompt.passkey, answer)
