"""HSDL's training step on sparse rows, on the CPU, without densifying a mini-batch.

Token-level routing is sparse: at the paper's shape a row of ``X`` has 162 nonzeros of 1,728
columns (27 layers, top-6). The dense step multiplies 512 x 1,728 by 1,728 x 32 five times and
takes the L1 norm of a dense 512 x 1,728 residual. Two facts make that unnecessary:

- the level-1 encoder ``X Wᵀ`` only reads the nonzeros (a sparse product), and
- codes and atoms are non-negative, so off a row's nonzeros ``|x_j - (cD)_j| = (cD)_j``, and
  ``‖x - cD‖_1 = c·(D 1) + Σ_{j ∈ supp x} (|x_j - (cD)_j| - (cD)_j)``: the reconstruction
  needs ``cD`` at the nonzeros only.

The kernels below (numba, one thread, deterministic) do a tenth of the dense arithmetic, in one
pass over the nonzeros each. Measured at the paper's shape on a shared 2-core machine
(2026-12-02, `benchmarks/bench_scaling.py`, an epoch of 604k rows, best of two runs): 14.1 s
with the dense step on 2 threads, 8.7 s with this one (7.3 ms a step of 512 rows, about half of
it PyTorch's fixed cost for the second level and Adam). torch's ``sampled_addmm`` and SciPy's
products were tried first and gave 10 ms a step on one core; torch's product with a transposed
CSR matrix took 4.8 ms where SciPy took 0.5 ms. `tests/test_hsdl.py` checks the terms and
gradients against the dense step.

Where a step goes (2026-12-02, shared 2-core AMD EPYC, 200 steps of 512 rows of a 150k-row
matrix of the paper's shape, one thread, cProfile; shares, since the machine's load varies):
3.6 ms a step that run, the three kernels 40% of it (the residual 23%), SciPy's row selection
and ``torch.sort`` of the ids about 0.2 ms (6%), the rest PyTorch's small ops, autograd and
fused Adam. A numba gather of a batch's rows from the CSR arrays (float32 data prepared once)
was tried in place of ``X[ids]``: 0.32-0.40 ms a batch (three variants) against SciPy's 0.17 ms
on rows not in cache, and a step 4% slower (median of six interleaved rounds in one process), so
SciPy's selection stays.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from scipy import sparse

__all__ = ["SparseBatch", "sparse_residual", "sparse_times_dense"]


class SparseBatch:
    """A mini-batch of rows of a canonical CSR matrix (sorted, no duplicate entries)."""

    def __init__(self, rows: sparse.csr_matrix) -> None:
        self.indptr = rows.indptr
        self.indices = rows.indices
        self.data = np.ascontiguousarray(rows.data, dtype=np.float32)
        self.shape = rows.shape

    def toarray(self) -> np.ndarray:
        return sparse.csr_matrix((self.data, self.indices, self.indptr),
                                 shape=self.shape).toarray()


@numba.njit(nogil=True, cache=True)
def _rows_times_dense(indptr, indices, data, dense):  # pragma: no cover - compiled
    """``B @ dense`` for B in CSR, dense of shape (n_columns, K)."""
    n_rows, width = len(indptr) - 1, dense.shape[1]
    out = np.zeros((n_rows, width), dtype=np.float32)
    for row in range(n_rows):
        for entry in range(indptr[row], indptr[row + 1]):
            column, value = indices[entry], data[entry]
            for k in range(width):
                out[row, k] += value * dense[column, k]
    return out


@numba.njit(nogil=True, cache=True)
def _rows_transposed_times(indptr, indices, data, dense, n_columns):  # pragma: no cover
    """``Bᵀ @ dense`` for B in CSR, dense of shape (n_rows, K)."""
    width = dense.shape[1]
    out = np.zeros((n_columns, width), dtype=np.float32)
    for row in range(len(indptr) - 1):
        for entry in range(indptr[row], indptr[row + 1]):
            column, value = indices[entry], data[entry]
            for k in range(width):
                out[column, k] += value * dense[row, k]
    return out


# fastmath lets LLVM split the K-long dot product into vector lanes (reassociation); the
# result is still the same on every run of one machine.
@numba.njit(nogil=True, cache=True, fastmath=True)
def _residual_at_nonzeros(indptr, indices, data, codes, atoms_t):  # pragma: no cover
    """``Σ_entries |x - p| - p`` with ``p = codes[row] · atoms_t[column]``, and its gradients.

    The derivative of ``|x - p| - p`` by ``p`` is ``-sign(x - p) - 1`` (sign(0) = 0, as torch's
    ``abs``), so with the ``c·(D 1)`` term each (row, column) gets ``-sign(x - p)`` in all, the
    dense step's gradient."""
    n_rows, width = codes.shape
    grad_codes = np.zeros((n_rows, width), dtype=np.float32)
    grad_atoms_t = np.zeros(atoms_t.shape, dtype=np.float32)
    total = 0.0
    for row in range(n_rows):
        for entry in range(indptr[row], indptr[row + 1]):
            column = indices[entry]
            product = np.float32(0.0)
            for k in range(width):
                product += codes[row, k] * atoms_t[column, k]
            difference = data[entry] - product
            total += abs(difference) - product
            slope = np.float32(-2.0) if difference > 0 else (
                np.float32(0.0) if difference < 0 else np.float32(-1.0))
            if slope != 0:
                for k in range(width):
                    grad_codes[row, k] += slope * atoms_t[column, k]
                    grad_atoms_t[column, k] += slope * codes[row, k]
    return total, grad_codes, grad_atoms_t


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().numpy(), dtype=np.float32)


class _SparseTimesDense(torch.autograd.Function):
    """``batch @ M`` for a constant sparse batch; the gradient flows to ``M`` only."""

    @staticmethod
    def forward(ctx: Any, dense: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
        ctx.batch = batch
        return torch.from_numpy(
            _rows_times_dense(batch.indptr, batch.indices, batch.data, _numpy(dense)))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        batch = ctx.batch
        return torch.from_numpy(_rows_transposed_times(
            batch.indptr, batch.indices, batch.data, _numpy(grad), batch.shape[1])), None


class _SparseResidual(torch.autograd.Function):
    """``Σ_{(i, j) ∈ supp} |x_ij - (cD)_ij| - (cD)_ij``, gradients computed in the same pass."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, atoms: torch.Tensor,
                batch: SparseBatch) -> torch.Tensor:
        total, grad_codes, grad_atoms_t = _residual_at_nonzeros(
            batch.indptr, batch.indices, batch.data, _numpy(codes), _numpy(atoms.T))
        ctx.gradients = (torch.from_numpy(grad_codes), torch.from_numpy(grad_atoms_t).T)
        return codes.new_tensor(total)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        grad_codes, grad_atoms = ctx.gradients
        return grad * grad_codes, grad * grad_atoms, None


def sparse_times_dense(batch: SparseBatch, dense: torch.Tensor) -> torch.Tensor:
    """``batch @ dense`` (differentiable in ``dense``), shape (n_rows, dense.shape[1])."""
    return _SparseTimesDense.apply(dense, batch)


def sparse_residual(batch: SparseBatch, codes: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """``Σ_i ‖x_i - c_i D‖_1`` for non-negative ``codes`` (n_rows, K) and ``atoms`` (K, n_columns),
    differentiable in both, reading ``codes @ atoms`` at the batch's nonzeros only."""
    off_support = codes @ atoms.sum(dim=1)
    return off_support.sum() + _SparseResidual.apply(codes, atoms, batch)
