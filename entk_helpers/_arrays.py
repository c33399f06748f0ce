"""The one conversion of array inputs (tensors, numpy arrays, sequences) to tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray | Sequence[float]


def as_tensor(x: ArrayLike, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> Tensor:
    """``x`` as a detached tensor, in ``dtype`` on ``device`` when given (else as it is).

    numpy views with negative strides (``np.sort(x)[::-1]``), which ``torch.as_tensor``
    refuses, are copied first; a tensor that needs no conversion is returned without a copy.
    """
    if isinstance(x, np.ndarray) and any(s < 0 for s in x.strides):
        x = np.ascontiguousarray(x)
    elif not isinstance(x, (Tensor, np.ndarray)):
        x = np.asarray(x, dtype=np.float64)
    return torch.as_tensor(x).detach().to(device=device, dtype=dtype)
