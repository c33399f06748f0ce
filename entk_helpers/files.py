"""Atomic files: JSON summaries, arrays, torch objects and figures written so that an
interrupted run never leaves a half-written file (a temporary file, then a rename).

    >>> save_json({"accuracy": torch.tensor(0.99)}, "results/01/summary.json")
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_jsonable(value: Any) -> Any:
    """Tensors, arrays and numpy scalars as plain lists and numbers; NaN/inf as None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()] if value.ndim else to_jsonable(value.item())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON, atomically; returns the path."""
    path = Path(path)
    _atomic_write_bytes(path, json.dumps(to_jsonable(data), indent=2).encode())
    return path


def save_arrays(path: str | Path, **arrays: Any) -> Path:
    """``np.savez`` of ``arrays``, written atomically (a crash leaves no half-written file)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = Path(path)
    _atomic_write_bytes(path, buffer.getvalue())
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` of ``obj``, written atomically (a crash leaves no half-written file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path = Path(path)
    _atomic_write_bytes(path, buffer.getvalue())
    return path


def save_figure(fig: Any, path: str | Path, dpi: int = 90) -> Path:
    """Save a matplotlib figure as PNG at a modest dpi, atomically; returns the path."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
