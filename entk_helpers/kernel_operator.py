"""One interface for every kernel you can multiply by, dense or not.

:class:`KernelOperator` is a symmetric ``scipy.sparse.linalg.LinearOperator`` (float64 numpy
in and out) that also works on tensors (:meth:`~KernelOperator.matmat_torch`), counts the
kernel-vector products it has applied in ``n_matvecs`` (which :func:`entk_helpers.top_eigenpairs`
reports as ``EigenResult.n_matvecs``, the products of that solve), and calls ``on_product``
after each block of products (a progress bar's ``update``). :class:`entk_helpers.NTKOperator`
and :class:`entk_helpers.lm.LayerNTKOperator` are the two kinds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from .budget import check_budget


class KernelOperator(LinearOperator):
    """A symmetric ``(size, size)`` kernel as a matrix-free operator.

    Subclasses implement :meth:`matmat_torch` and call :meth:`_count` with the number of
    vectors each product applied. ``n_matvecs``: products so far; ``on_product``: ``None`` or
    a function called with that number after each product.
    """

    def __init__(self, size: int) -> None:
        super().__init__(dtype=np.float64, shape=(size, size))
        self.n_matvecs = 0
        self.on_product: Callable[[int], object] | None = None

    def matmat_torch(self, vectors: Tensor) -> Tensor:
        """``(size, k) -> (size, k)``: the kernel applied to k vectors, as tensors."""
        raise NotImplementedError

    def _count(self, k: int) -> None:
        self.n_matvecs += k
        if self.on_product is not None:
            self.on_product(k)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        tensor = torch.as_tensor(np.asarray(x, dtype=np.float64))
        return self.matmat_torch(tensor).detach().cpu().double().numpy()

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _adjoint(self) -> KernelOperator:
        return self  # symmetric

    def to_dense(self) -> Tensor:
        """The whole kernel ``(size, size)``, by applying the operator to the identity."""
        size = self.shape[0]
        check_budget(size * size * 8, f"the dense ({size}, {size}) kernel",
                     "Keep the operator matrix-free and use top_eigenpairs.")
        return self.matmat_torch(torch.eye(size, dtype=torch.float64))
