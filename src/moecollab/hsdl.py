"""Hierarchical sparse dictionary learning (HSDL), flat baselines and coverage.

`HSDL` is the paper's method (Tang et al., arXiv:2504.12359, Eq. 4-7, revised version's
optimisation) as a scikit-learn style estimator; `hsdl_loss` is its objective as a plain function;
`fit_flat_baseline` fits scikit-learn's `NMF` or `MiniBatchDictionaryLearning` on the same matrix;
the coverage functions (paper Eq. 8) live in `moecollab.hsdl_coverage` and are re-exported here.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator
from sklearn.decomposition import NMF, MiniBatchDictionaryLearning
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from tqdm import tqdm

from moecollab.hsdl_coverage import (
    atom_top_experts,
    coverage_at,
)
from moecollab.hsdl_params import check_hsdl_params
from moecollab.hsdl_sparse import SparseBatch, sparse_residual, sparse_times_dense
from moecollab.models import resolve_device

__all__ = [
    "HSDL",
    "atom_top_experts",
    "check_activation_matrix",
    "dictionary_metrics",
    "load_hsdl",
    "save_hsdl",
    "coverage_at",
    "fit_flat_baseline",
    "hsdl_loss",
    "mean_l1_error",
]

logger = logging.getLogger(__name__)

# Dictionary entries initialised from NMF are clipped to [EPS, 1 - EPS] before the logit, so an
# expert absent from an atom starts at sigmoid(-6.9) = 0.001, not at an infinite logit.
_INIT_EPS = 1e-3
# The NMF initialiser sees at most this many rows (a random subsample), densified; this bounds its
# memory and time on token-level matrices with hundreds of thousands of rows.
_INIT_MAX_SAMPLES = 8192
# Rows densified at a time by transform / reconstruction_error.
_EVAL_BATCH = 4096
# An atom is "active" when it holds at least this share of its level's total usage.
_ACTIVE_USAGE_RATIO = 1e-3

ArrayLike = Any  # ndarray, torch.Tensor or scipy sparse matrix/array


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def check_activation_matrix(X: ArrayLike, *, name: str = "X") -> np.ndarray | sparse.csr_matrix:
    """Validate a non-negative activation matrix and return it as float32 ndarray or CSR.

    Parameters
    ----------
    X : ndarray, torch.Tensor or scipy sparse, shape (n_samples, n_experts)
    name : str
        Name used in error messages.

    Returns
    -------
    ndarray of float32 or scipy CSR matrix of float32, shape (n_samples, n_experts)
        Sparse input stays sparse (never densified here).

    Raises
    ------
    ValueError
        Wrong ndim, empty, NaN/inf, or negative entries; one line naming ``name``.
    """
    if isinstance(X, torch.Tensor):
        if X.layout != torch.strided:
            coo = X.detach().to("cpu").to_sparse_coo().coalesce()
            indices = coo.indices().numpy()
            if indices.shape[0] != 2:
                raise ValueError(f"{name} must be 2-D (n_samples, n_experts); got ndim={X.ndim}")
            X = sparse.csr_matrix(
                (coo.values().numpy(), (indices[0], indices[1])), shape=tuple(coo.shape)
            )
        else:
            X = X.detach().to("cpu").numpy()
    if np.iscomplexobj(X):  # np.asarray(..., float32) would drop the imaginary part
        raise ValueError(f"Complex data not supported: {name} must hold real, non-negative "
                         f"activations; got dtype {X.dtype}")
    if sparse.issparse(X):
        if X.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n_samples, n_experts); got ndim={X.ndim}")
        X = sparse.csr_matrix(X, dtype=np.float32)
        values = X.data
    else:
        try:
            X = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a numeric array; got {type(X).__name__}") from error
        if X.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n_samples, n_experts); got ndim={X.ndim}")
        values = X
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one sample and one expert; got shape {tuple(X.shape)}"
        )
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinity; HSDL needs finite activations")
    if values.size and values.min() < 0:
        raise ValueError(f"{name} must be non-negative; got minimum {float(values.min())!r}")
    return X


def _iter_dense_rows(
    X: np.ndarray | sparse.csr_matrix, batch_size: int = _EVAL_BATCH
) -> Iterator[np.ndarray]:
    """Dense float32 row blocks of X; sparse X is densified one block at a time."""
    for start in range(0, X.shape[0], batch_size):
        block = X[start : start + batch_size]
        yield block.toarray() if sparse.issparse(block) else block


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def hsdl_loss(
    X: ArrayLike,
    dictionaries: Sequence[ArrayLike],
    codes: Sequence[ArrayLike],
    *,
    lambda_sparse: float = 1.0,
    lambda_codes: float = 1.0,
    lambda_recon: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The HSDL objective (paper Eq. 4-7) on a batch, in scikit-learn orientation.

    Parameters
    ----------
    X : array or tensor, shape (n_samples, n_experts)
        The data (level 0, ``D_0``); ``n_samples`` plays the paper's ``N``.
    dictionaries : list of L arrays, level ``l`` of shape (K_l, n_experts)
        ``D_1 … D_L``, one atom per row, in expert space.
    codes : list of L arrays
        ``codes[0]`` of shape (n_samples, K_1): each sample's code on level-1 atoms;
        ``codes[l]`` of shape (K_l, K_{l+1}) for ``l >= 1``: each level-l atom's code on
        level-(l+1) atoms. So ``X ≈ codes[0] @ D_1`` and ``D_l ≈ codes[l] @ D_{l+1}``.
    lambda_sparse, lambda_codes, lambda_recon : float
        Weights of the three terms in ``total``.

    Returns
    -------
    dict of str to 0-d torch.Tensor
        ``sparse``, ``hier``, ``recon`` and ``total`` (differentiable when inputs are).

    Notes
    -----
    With ``A_0 = X``, ``A_k = D_k`` and ``C_k = codes[k-1]``, and per-item weights
    ``w_0 = 1/N`` for every sample, ``w_1(j) = mean_s C_1[s, j] = u_1(j) / N`` (the paper's
    usage of level-1 atom ``j`` divided by ``N``) and, for ``k >= 2``, ``w_k = w_{k-1} C_k`` (usage
    propagated from the data, so every term stays a per-sample mean):

    - ``sparse = Σ_k Σ_j max_i C_k[i, j]`` — the paper's row-wise L∞ of ``R_k``: for each atom,
      its largest code over the samples (k = 1) or over the level-(k-1) atoms (k ≥ 2). For
      k = 1 on a mini-batch this is the batch maximum, a (downward biased) estimate of the
      maximum over all samples.
    - ``hier = Σ_{k=0}^{L-1} Σ_j w_k(j) ‖C_{k+1}[j, :]‖_1`` — usage-weighted L1 of codes.
    - ``recon = Σ_{k=0}^{L-1} Σ_j w_k(j) ‖A_k[j] - C_{k+1}[j] A_{k+1}‖_1`` — usage-weighted L1
      reconstruction; at k = 0 the mean L1 reconstruction error of the samples.
    - ``total = lambda_sparse·sparse + lambda_codes·hier + lambda_recon·recon``.

    The usage weights are not detached: as in the paper, the objective is minimised jointly over
    codes and dictionaries, weights included. For two levels ``w_k`` is exactly the paper's
    ``u_k / N``; the propagated reading for k ≥ 2 is this project's decision (the literal
    ``‖R_k[j, :]‖_1 / N`` would shrink with ``N``).

    Examples
    --------
    >>> X = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> terms = hsdl_loss(X, [np.eye(2)], [np.array([[1.0, 0.0], [0.0, 2.0]])])
    >>> [round(float(terms[k]), 3) for k in ("sparse", "hier", "recon")]
    [3.0, 1.5, 0.0]
    """

    def as_tensor(value: ArrayLike) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        return torch.as_tensor(np.asarray(value, dtype=np.float32))

    if len(dictionaries) != len(codes) or len(dictionaries) == 0:
        raise ValueError(
            f"dictionaries and codes must be non-empty lists of equal length; got "
            f"{len(dictionaries)} and {len(codes)}"
        )
    data = as_tensor(X)
    atoms = [as_tensor(d) for d in dictionaries]
    level_codes = [as_tensor(c) for c in codes]
    inputs = [data, *atoms]  # A_0 = X, A_k = D_k

    sparse_term = data.new_zeros(())
    hier_term = data.new_zeros(())
    recon_term = data.new_zeros(())
    weights = data.new_full((data.shape[0],), 1.0 / data.shape[0])  # w_0
    for k, code in enumerate(level_codes):
        sparse_term = sparse_term + code.max(dim=0).values.sum()
        hier_term = hier_term + (weights * code.sum(dim=1)).sum()
        residual = (inputs[k] - code @ atoms[k]).abs().sum(dim=1)
        recon_term = recon_term + (weights * residual).sum()
        weights = code.mean(dim=0) if k == 0 else weights @ code
    total = lambda_sparse * sparse_term + lambda_codes * hier_term + lambda_recon * recon_term
    return {"sparse": sparse_term, "hier": hier_term, "recon": recon_term, "total": total}


def mean_l1_error(X: ArrayLike, codes: np.ndarray, dictionary: np.ndarray) -> float:
    """Mean over samples of ``‖x - code @ dictionary‖_1``, without densifying all of X.

    Parameters
    ----------
    X : array, tensor or sparse, shape (n_samples, n_experts)
    codes : ndarray, shape (n_samples, n_atoms)
    dictionary : ndarray, shape (n_atoms, n_experts)

    Returns
    -------
    float
    """
    X = check_activation_matrix(X)
    codes = np.asarray(codes, dtype=np.float32)
    dictionary = np.asarray(dictionary, dtype=np.float32)
    total = 0.0
    for start, block in zip(range(0, X.shape[0], _EVAL_BATCH), _iter_dense_rows(X), strict=True):
        approx = codes[start : start + block.shape[0]] @ dictionary
        total += float(np.abs(block - approx).sum(dtype=np.float64))
    return total / X.shape[0]


# --------------------------------------------------------------------------------------------
# Initialisation helpers
# --------------------------------------------------------------------------------------------


def _nmf_factors(
    matrix: np.ndarray, n_components: int, n_init: int, random_state: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Best of ``n_init`` NMF runs (lowest Frobenius error), rescaled so each atom's max is 1.

    The first run starts from NNDSVDa, the others from random factors. On planted hierarchies
    single NMF runs stop in local optima that merge or split patterns (about 1 run in 3); the
    planted solution had the lowest Frobenius error whenever a run found it.
    """
    matrix = matrix.astype(np.float64)
    best = None
    for run in range(n_init):
        # nndsvd* needs n_components <= min(matrix.shape)
        use_svd = run == 0 and n_components <= min(matrix.shape)
        model = NMF(
            n_components=n_components,
            init="nndsvda" if use_svd else "random",
            max_iter=400,
            tol=1e-4,
            random_state=int(random_state.randint(2**31 - 1)),
        )
        with warnings.catch_warnings():
            # An initialiser need not converge: training continues from wherever NMF stops.
            warnings.filterwarnings("ignore", category=ConvergenceWarning)
            run_codes = model.fit_transform(matrix)
        if best is None or model.reconstruction_err_ < best[0]:
            best = (model.reconstruction_err_, run_codes, model.components_)
    _, codes, atoms = best
    scale = atoms.max(axis=1)
    dead = scale <= 1e-12
    scale[dead] = 1.0
    return codes * scale, atoms / scale[:, None]


def _ridge_encoder(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares ``inputs @ W.T + b ≈ targets`` with a tiny ridge (scale-aware).

    Returns W of shape (n_targets, n_inputs) and b of shape (n_targets,).
    """
    design = np.hstack([inputs, np.ones((inputs.shape[0], 1))]).astype(np.float64)
    gram = design.T @ design
    ridge = 1e-4 * max(np.trace(gram) / gram.shape[0], 1e-12)
    solution = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), design.T @ targets)
    return solution[:-1].T, solution[-1]


def _logit(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, _INIT_EPS, 1.0 - _INIT_EPS)
    return np.log(values) - np.log1p(-values)


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------


class HSDL(BaseEstimator):
    """Hierarchical sparse dictionary learning of expert collaboration patterns.

    Learns ``L`` levels of dictionaries in expert space: ``X ≈ C_1 D_1`` and, for each deeper
    level, ``D_l ≈ C_{l+1} D_{l+1}``, where every atom (row of ``D_l``) is a weighted set of
    experts with weights in ``[0, 1]`` and all codes are non-negative.

    Parameters
    ----------
    n_atoms : tuple or list of int, default=(32, 16)
        Atoms per level, ``(K_1, K_2, …)``; the paper uses two levels. A level should not have
        more atoms than the one above: level ``l+1`` is initialised by NMF of level ``l``'s
        ``K_l`` atoms, which identifies at most ``K_l`` building blocks (the study's runner
        refuses a growing list).
    lambda_codes : float, default=0.02
        Weight of ``L_hier``, the usage-weighted L1 of the codes (the paper's ``λ1``).
    lambda_recon : float, default=1.0
        Weight of ``L_rec``, the usage-weighted L1 reconstruction (the paper's ``λ2``).
    lambda_sparse : float, default=1e-3
        Weight of ``L_sparse``, the row-wise L∞ of the codes (1 in the paper, whose scale of
        ``λ2`` is not given; see Notes for why it is small here).
    n_epochs : int, default=60
        Passes over the data.
    lr : float, default=2e-3
        Adam learning rate.
    lr_halving_epochs : int, default=500
        The learning rate is halved every this many epochs (paper: 500).
    batch_size : int, default=256
        Samples per mini-batch. On the CPU, sparse ``X`` is never densified: each step runs on
        the mini-batch's nonzeros (`moecollab.hsdl_sparse`); on a GPU it is densified one
        mini-batch at a time on the device (see `_TrainingRows`).
    init : {"nmf", "random"}, default="nmf"
        ``"nmf"``: level 1 from scikit-learn NMF on (a subsample of at most 8,192 rows of) ``X``,
        level ``l+1`` from NMF of the level-``l`` dictionary; each atom is scaled to a maximum
        of 1 and set through the logit, each encoder by ridge least squares onto the NMF codes.
        ``"random"``: small random logits and encoder weights (a plain implementation; it tends
        to collapse or learn unions of patterns, kept for comparison).
    n_init : int, default=3
        NMF runs per level for ``init="nmf"`` (NNDSVDa, then random starts); the run with the
        lowest Frobenius error initialises the level. Ignored by ``init="random"``.
    device : str, default="auto"
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    random_state : int, RandomState or None, default=None
        Seeds the NMF initialiser, the random initial values and the batch order through local
        generators (nothing global is seeded).
    n_jobs : int or None, default=1
        CPU threads torch may use during fit (set for the fit, restored after); ``None`` keeps
        torch's current setting, ``-1`` uses every core. Mini-batches of a few hundred rows are
        fastest on one thread: thread synchronisation costs more than it saves, and much more
        when the cores are shared with other work (measured 2-3x on 2 cores, dense step). The
        sparse step's kernels run on one thread whatever this says; its other work gained from
        a second thread at the paper's size (8.7 s an epoch of 604k rows against 10.7 s, best
        of two runs each on a shared 2-core machine, 2026-12-02).
    distributed : bool or "auto", default="auto"
        Train data-parallel with torch.distributed (DistributedDataParallel) when a process
        group is initialised with more than one process (``"auto"``), e.g. under ``torchrun``:
        every rank passes the same ``X`` and ``random_state``, draws the same batch order and
        trains on its share of each mini-batch; rank 0's NMF start is broadcast. The objective
        is summed over the whole mini-batch (its ``L_sparse`` maximum too), so the fit equals
        the one-process fit up to floating-point summation order (a two-process gloo test
        bounds the difference). ``True`` requires a group, ``False`` ignores it.
    verbose : bool, default=False
        Log the loss every epoch and show a tqdm bar.

    Attributes
    ----------
    dictionaries_ : list of ndarray, level l of shape (K_l, n_experts)
        ``D_l = sigmoid(Θ_l)``, rows are atoms in expert space.
    hierarchy_codes_ : list of ndarray, entry l of shape (K_l, K_{l+1})
        How each level-l atom is composed of level-(l+1) atoms: ``D_l ≈ hierarchy_codes_[l-1]
        @ D_{l+1}`` (length ``L - 1``).
    encoder_weights_ : list of ndarray, level l of shape (K_l, n_experts)
    encoder_biases_ : list of ndarray, level l of shape (K_l,)
        The amortised encoders ``ReLU(W input + b)``: level 1 encodes samples, level ``l+1``
        encodes the level-``l`` atoms.
    loss_history_ : dict of str to list of float
        Per epoch, the mean over mini-batches of ``sparse``, ``hier``, ``recon`` and ``total``
        (``pandas.DataFrame(loss_history_)`` gives a table).
    atom_usage_ : list of ndarray, level l of shape (K_l,)
        Mean code of the training samples on each level-l atom (composed codes for l ≥ 2).
    active_atoms_ : list of int
        Per level, atoms holding at least 0.1% of the level's total usage.
    n_iter_ : int
        Epochs run.
    n_features_in_ : int
        ``n_experts`` seen in fit.
    device_ : torch.device
        Where the fit ran.

    Notes
    -----
    *Orientation.* The paper writes ``X ∈ R^{N_e × N_s}`` (experts × samples), ``D_k`` as
    ``N_e × K_k`` and ``R_k`` as ``K_k × K_{k-1}``. Here samples are rows, as in scikit-learn:
    every array is the transpose of the paper's (``dictionaries_[l] = D_{l+1}ᵀ``, codes
    ``= R_kᵀ``).

    *Objective* (see `hsdl_loss` for each term):
    ``lambda_sparse·L_sparse + lambda_codes·L_hier + lambda_recon·L_rec`` with
    ``D_l = sigmoid(Θ_l)``, level-1 codes ``ReLU(X W_1ᵀ + b_1)`` and level-(l+1) codes
    ``ReLU(D_l W_{l+1}ᵀ + b_{l+1})``, all levels trained jointly by Adam on mini-batches.
    ``L_sparse`` at level 1 is the maximum over the mini-batch, so its size grows with
    ``batch_size``.

    *Defaults.* Chosen on planted hierarchies (`moecollab.synthetic.make_planted_hierarchy`,
    96 experts, 4,000 samples, seeds 0-2) by a small sweep. ``L_sparse`` puts its whole gradient
    on one sample per atom: at ``lambda_sparse=1`` (the paper's weight, with
    ``lambda_recon=1``; the paper gives no value for its ``λ2``) every code collapsed to zero
    even from the NMF start; 1e-3 keeps it a tie-breaker (0, 1e-3 and 1e-2 gave the same
    recovery). ``lambda_codes`` in [0.005, 0.1] gave the same recovery and ~1.6 nonzeros per
    code; 0.02 is mid-range. With the NMF start, 60 epochs at lr 2e-3 and batch 256 converge
    in a few seconds on 2 CPU cores (the paper's 2,000 epochs at 4e-4 start from scratch);
    ``lr_halving_epochs=500`` keeps the paper's schedule for long runs, and never fires in a
    run of fewer than 500 epochs. ``init="random"`` collapsed to all-zero codes on every
    planted seed tried (60 and 300 epochs): the objective alone does not find the patterns,
    and which patterns are found is decided by the NMF start; training sparsifies the codes
    (about 7.7 to 1.6 nonzeros per sample) and fits the hierarchy under L1.

    *transform.* Level-l codes of samples are composed: ``C_1 @ H_1 @ … @ H_{l-1}`` with
    ``H = hierarchy_codes_``, so every level gives an ``(n_samples, K_l)`` code and
    ``reconstruct(X, level=l)`` is that code times ``dictionaries_[l-1]``.

    Examples
    --------
    >>> from moecollab.synthetic import make_planted_hierarchy, match_patterns
    >>> planted = make_planted_hierarchy(n_samples=2000, n_experts=96, random_state=0)
    >>> model = HSDL(n_atoms=(12, 8), n_epochs=20, random_state=0).fit(planted.X)
    >>> [d.shape for d in model.dictionaries_]
    [(12, 96), (8, 96)]
    """

    def __init__(
        self,
        n_atoms: Sequence[int] = (32, 16),
        *,
        lambda_codes: float = 0.02,
        lambda_recon: float = 1.0,
        lambda_sparse: float = 1e-3,
        n_epochs: int = 60,
        lr: float = 2e-3,
        lr_halving_epochs: int = 500,
        batch_size: int = 256,
        init: Literal["nmf", "random"] = "nmf",
        n_init: int = 3,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        n_jobs: int | None = 1,
        distributed: bool | Literal["auto"] = "auto",
        verbose: bool = False,
    ) -> None:
        self.n_atoms = n_atoms
        self.lambda_codes = lambda_codes
        self.lambda_recon = lambda_recon
        self.lambda_sparse = lambda_sparse
        self.n_epochs = n_epochs
        self.lr = lr
        self.lr_halving_epochs = lr_halving_epochs
        self.batch_size = batch_size
        self.init = init
        self.n_init = n_init
        self.device = device
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.distributed = distributed
        self.verbose = verbose

    # ---- parameter checks -------------------------------------------------------------------

    def _check_params(self) -> torch.device:
        check_hsdl_params(self.get_params())
        return resolve_device(self.device)

    # ---- initialisation ---------------------------------------------------------------------

    def _initial_values(
        self,
        X: np.ndarray | sparse.csr_matrix,
        random_state: np.random.RandomState,
        generator: torch.Generator,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per level: (theta (K, n_experts), encoder W (K, n_experts), encoder b (K,))."""
        n_samples, n_experts = X.shape
        levels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if self.init == "random":
            bound = 1.0 / math.sqrt(n_experts)  # torch.nn.Linear's default range
            for k in self.n_atoms:
                theta = 0.1 * torch.randn(k, n_experts, generator=generator)
                weight = (torch.rand(k, n_experts, generator=generator) * 2 - 1) * bound
                bias = (torch.rand(k, generator=generator) * 2 - 1) * bound
                levels.append((theta.numpy(), weight.numpy(), bias.numpy()))
            return levels

        if n_samples > _INIT_MAX_SAMPLES:
            rows = np.sort(random_state.choice(n_samples, _INIT_MAX_SAMPLES, replace=False))
            subsample = X[rows]
        else:
            subsample = X
        # Bounded size: at most _INIT_MAX_SAMPLES rows are densified, and dense and sparse input
        # then give identical initial values.
        inputs = subsample.toarray() if sparse.issparse(subsample) else np.asarray(subsample)
        for k in self.n_atoms:
            nmf_codes, nmf_atoms = _nmf_factors(inputs, k, self.n_init, random_state)
            weight, bias = _ridge_encoder(inputs, nmf_codes)
            atoms = np.clip(nmf_atoms, _INIT_EPS, 1.0 - _INIT_EPS)
            levels.append((_logit(atoms), weight, bias))
            inputs = atoms  # the next level decomposes this level's dictionary
        return levels

    # ---- fitting ----------------------------------------------------------------------------

    def fit(self, X: ArrayLike, y: None = None) -> HSDL:
        """Fit all levels jointly.

        Parameters
        ----------
        X : ndarray, torch.Tensor or scipy sparse, shape (n_samples, n_experts)
            Non-negative activations (token- or sample-level routing weights or selections).
        y : None
            Ignored.

        Returns
        -------
        self : HSDL
        """
        device = self._check_params()
        X = check_activation_matrix(X)
        previous_threads = torch.get_num_threads()
        if self.n_jobs is not None:
            torch.set_num_threads((os.cpu_count() or 1) if self.n_jobs == -1 else self.n_jobs)
        try:
            return self._fit(X, device)
        finally:
            torch.set_num_threads(previous_threads)

    def _fit(self, X: np.ndarray | sparse.csr_matrix, device: torch.device) -> HSDL:
        n_samples, n_experts = X.shape
        random_state = check_random_state(self.random_state)
        generator = torch.Generator().manual_seed(int(random_state.randint(2**31 - 1)))

        group = _process_group(self.distributed)
        rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
        start_time = time.perf_counter()
        if rank == 0 or self.init == "random":
            initial = self._initial_values(X, random_state, generator)
        else:  # DDP copies rank 0's start to the others: skip their NMF
            initial = [(np.zeros((k, n_experts)), np.zeros((k, n_experts)), np.zeros(k))
                       for k in self.n_atoms]
        logger.info("HSDL init (%s) took %.2fs", self.init, time.perf_counter() - start_time)

        network = _HSDLNetwork(initial, device, group)
        model: torch.nn.Module = network
        if group is not None:
            # Every rank starts from rank 0's values (DDP broadcasts them) and averages gradients.
            model = torch.nn.parallel.DistributedDataParallel(
                network, device_ids=[device.index] if device.type == "cuda" else None,
                process_group=group)
        # Fused Adam: one kernel for all parameters (0.33 ms a step against 1.15 ms per-tensor on
        # one core, 2026-12-02); the same update up to rounding.
        optimizer = torch.optim.Adam(network.parameters(), lr=self.lr, fused=True)
        rows = _TrainingRows(X, device)
        terms_kwargs = {"lambda_sparse": self.lambda_sparse, "lambda_codes": self.lambda_codes,
                        "lambda_recon": self.lambda_recon}
        history: dict[str, list[float]] = {"sparse": [], "hier": [], "recon": [], "total": []}
        epochs = tqdm(range(self.n_epochs), desc="HSDL", disable=not self.verbose or rank != 0)
        for epoch in epochs:
            for group_settings in optimizer.param_groups:
                group_settings["lr"] = self.lr * 0.5 ** (epoch // self.lr_halving_epochs)
            # Every rank draws the same order; rank r trains on its share of each batch.
            order = torch.randperm(n_samples, generator=generator)
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # one sync per epoch
            n_batches = 0
            for begin in range(0, n_samples, self.batch_size):
                batch_ids = torch.sort(order[begin : begin + self.batch_size]).values
                share = math.ceil(len(batch_ids) / world)
                local_ids = batch_ids[rank * share : (rank + 1) * share]
                terms = model(rows.batch(local_ids), len(batch_ids), **terms_kwargs)
                optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                optimizer.step()
                sums += torch.stack([terms[name].detach() for name in history]).double()
                n_batches += 1
            if group is not None:
                torch.distributed.all_reduce(sums, group=group)
                sums /= world
            for name, value in zip(history, (sums / n_batches).tolist(), strict=True):
                history[name].append(value)
            if self.verbose:
                logger.info(
                    "epoch %d: total %.4f recon %.4f hier %.4f sparse %.4f",
                    epoch + 1,
                    history["total"][-1],
                    history["recon"][-1],
                    history["hier"][-1],
                    history["sparse"][-1],
                )
        thetas, weights, biases = network.thetas, network.weights, network.biases

        with torch.no_grad():
            dictionaries = [torch.sigmoid(theta) for theta in thetas]
            hierarchy = [
                torch.relu(dictionaries[level - 1] @ weights[level].T + biases[level])
                for level in range(1, len(thetas))
            ]
        self.dictionaries_ = [d.cpu().numpy() for d in dictionaries]
        self.hierarchy_codes_ = [h.cpu().numpy() for h in hierarchy]
        self.encoder_weights_ = [w.detach().cpu().numpy() for w in weights]
        self.encoder_biases_ = [b.detach().cpu().numpy() for b in biases]
        self.loss_history_ = history
        self.n_iter_ = self.n_epochs
        self.n_features_in_ = n_experts
        self.device_ = device

        usage = [np.zeros(k, dtype=np.float64) for k in self.n_atoms]
        for level_codes in self._transform_blocks(X):
            for level, code in enumerate(level_codes):
                usage[level] += code.sum(axis=0, dtype=np.float64)
        self.atom_usage_ = [u / n_samples for u in usage]
        self.active_atoms_ = [
            int((u >= _ACTIVE_USAGE_RATIO * max(u.sum(), 1e-30)).sum()) for u in self.atom_usage_
        ]
        if min(self.active_atoms_) == 0:
            logger.warning(
                "HSDL collapsed: a level has no active atom (active_atoms_=%s)", self.active_atoms_
            )
        logger.info("HSDL fit took %.2fs", time.perf_counter() - start_time)
        return self

    def fit_transform(self, X: ArrayLike, y: None = None) -> list[np.ndarray]:
        """``fit(X).transform(X)``."""
        return self.fit(X).transform(X)

    # ---- using the fit ----------------------------------------------------------------------

    def _check_input(self, X: ArrayLike) -> np.ndarray | sparse.csr_matrix:
        check_is_fitted(self, "dictionaries_")
        X = check_activation_matrix(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} experts (columns) but HSDL was fitted with "
                f"{self.n_features_in_}"
            )
        return X

    def _transform_blocks(self, X: np.ndarray | sparse.csr_matrix) -> Iterator[list[np.ndarray]]:
        for start in range(0, X.shape[0], _EVAL_BATCH):
            block = X[start : start + _EVAL_BATCH]
            # Sparse @ dense stays cheap: no densified copy of X is needed for the encoder.
            pre_activation = block @ self.encoder_weights_[0].T + self.encoder_biases_[0]
            code = np.maximum(np.asarray(pre_activation, dtype=np.float32), 0.0)
            level_codes = [code]
            for composition in self.hierarchy_codes_:
                code = code @ composition
                level_codes.append(code)
            yield level_codes

    def transform(self, X: ArrayLike) -> list[np.ndarray]:
        """Codes of the samples at every level.

        Parameters
        ----------
        X : ndarray, torch.Tensor or scipy sparse, shape (n_samples, n_experts)

        Returns
        -------
        list of ndarray of float32, level l of shape (n_samples, K_l)
            Level 1: ``ReLU(X W_1ᵀ + b_1)``; level l: the level-1 code composed with
            ``hierarchy_codes_[0] … hierarchy_codes_[l-2]``.
        """
        X = self._check_input(X)
        blocks = list(self._transform_blocks(X))
        return [np.concatenate([b[level] for b in blocks]) for level in range(len(self.n_atoms))]

    def _check_level(self, level: int) -> None:
        if not isinstance(level, numbers.Integral) or not 1 <= level <= len(self.dictionaries_):
            raise ValueError(
                f"level must be an int in [1, {len(self.dictionaries_)}]; got {level!r}"
            )

    def reconstruct(self, X: ArrayLike, level: int = 1) -> np.ndarray:
        """Reconstruction of X from the level-``level`` atoms.

        Parameters
        ----------
        X : array, tensor or sparse, shape (n_samples, n_experts)
        level : int, default=1
            1-based level.

        Returns
        -------
        ndarray of float32, shape (n_samples, n_experts)
            ``transform(X)[level - 1] @ dictionaries_[level - 1]`` (dense).
        """
        self._check_level(level)
        return self.transform(X)[level - 1] @ self.dictionaries_[level - 1]

    def reconstruction_error(self, X: ArrayLike, level: int = 1) -> float:
        """Mean over samples of the L1 reconstruction error ``‖x - x̂‖_1`` at ``level``.

        Parameters
        ----------
        X : array, tensor or sparse, shape (n_samples, n_experts)
        level : int, default=1

        Returns
        -------
        float
        """
        self._check_level(level)
        X = self._check_input(X)
        codes = self.transform(X)[level - 1]
        return mean_l1_error(X, codes, self.dictionaries_[level - 1])

    def score(self, X: ArrayLike, y: None = None) -> float:
        """Negative mean L1 reconstruction error at level 1 (higher is better)."""
        return -self.reconstruction_error(X, level=1)


class _HSDLNetwork(torch.nn.Module):
    """The trainable parts of HSDL: ``Θ_l``, and each level's encoder ``W_l``, ``b_l``.

    ``forward`` returns the objective's terms on a batch (this rank's share of it under
    torch.distributed), so DistributedDataParallel can wrap it.
    """

    def __init__(self, initial: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 device: torch.device, group: Any = None) -> None:
        super().__init__()
        self.group = group  # torch.distributed group of a data-parallel fit, else None

        def parameter(values: np.ndarray) -> torch.nn.Parameter:
            # Contiguous on every rank: DDP checks that ranks' parameters have the same strides.
            tensor = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float32),
                                     device=device)
            return torch.nn.Parameter(tensor.clone())

        self.thetas = torch.nn.ParameterList([parameter(theta) for theta, _, _ in initial])
        self.weights = torch.nn.ParameterList([parameter(weight) for _, weight, _ in initial])
        self.biases = torch.nn.ParameterList([parameter(bias) for _, _, bias in initial])

    def forward(self, batch: torch.Tensor, n_global: int,
                **lambdas: float) -> dict[str, torch.Tensor]:
        return _batch_terms(batch, n_global, list(self.thetas), list(self.weights),
                            list(self.biases), group=self.group, **lambdas)


def _batch_terms(
    batch: torch.Tensor | SparseBatch,
    n_global: int,
    thetas: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    *,
    group: Any = None,
    lambda_sparse: float,
    lambda_codes: float,
    lambda_recon: float,
) -> dict[str, torch.Tensor]:
    """The terms of `hsdl_loss` on a batch of ``n_global`` rows, this rank holding ``batch``.

    Per-sample terms are divided by ``n_global`` and multiplied by the world size, and the
    batch maximum of ``L_sparse`` is taken over all ranks, so that DistributedDataParallel's
    average of the ranks' gradients is the gradient of the whole batch; with one process these
    are `hsdl_loss`'s terms.

    A `SparseBatch` (sparse ``X`` on the CPU) is never densified: level 1 runs on its nonzeros
    (`moecollab.hsdl_sparse`), the same terms and gradients in another summation order.
    """
    world = group.size() if group is not None else 1
    scale = world / n_global
    dictionaries = [torch.sigmoid(theta) for theta in thetas]
    if isinstance(batch, SparseBatch):
        codes = torch.relu(sparse_times_dense(batch, weights[0].T) + biases[0])
        residual_sum = sparse_residual(batch, codes, dictionaries[0])
    else:
        codes = torch.relu(batch @ weights[0].T + biases[0])
        residual_sum = (batch - codes @ dictionaries[0]).abs().sum()
    # Codes are >= 0, so a zero row changes no maximum and keeps an empty share valid.
    local_max = torch.cat([codes, codes.new_zeros(1, codes.shape[1])]).max(dim=0).values
    sparse_term = _global_max_sum(local_max, group, world)
    hier_term = codes.sum() * scale
    recon_term = residual_sum * scale
    usage = codes.sum(dim=0) * scale  # w_1: the level-1 atoms' mean code
    for level in range(1, len(thetas)):
        code = torch.relu(dictionaries[level - 1] @ weights[level].T + biases[level])
        sparse_term = sparse_term + code.max(dim=0).values.sum()
        hier_term = hier_term + (usage * code.sum(dim=1)).sum()
        level_residual = (dictionaries[level - 1] - code @ dictionaries[level]).abs().sum(dim=1)
        recon_term = recon_term + (usage * level_residual).sum()
        usage = usage @ code
    total = lambda_sparse * sparse_term + lambda_codes * hier_term + lambda_recon * recon_term
    return {"sparse": sparse_term, "hier": hier_term, "recon": recon_term, "total": total}


def _global_max_sum(local_max: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """``Σ_j max over all ranks' rows``, differentiable through the rank(s) holding each max."""
    if group is None:
        return local_max.sum()
    overall = local_max.detach().clone()
    torch.distributed.all_reduce(overall, op=torch.distributed.ReduceOp.MAX, group=group)
    holds = (local_max.detach() == overall).to(local_max.dtype)
    n_holders = holds.clone()
    torch.distributed.all_reduce(n_holders, group=group)
    return world * (local_max * holds / n_holders).sum()


def _process_group(distributed: bool | str) -> Any:
    """The default torch.distributed group when the fit should be data-parallel, else None."""
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is True and not available:
        raise ValueError("distributed=True needs an initialised torch.distributed process "
                         "group (launch with torchrun); got none")
    if distributed is False or not available:
        return None
    group = torch.distributed.group.WORLD
    if distributed == "auto" and torch.distributed.get_world_size(group) == 1:
        return None
    return group


class _TrainingRows:
    """The training matrix, handing out mini-batches for `_batch_terms`.

    On the CPU, sparse ``X`` gives `SparseBatch` es (SciPy row selection) that are never
    densified (`moecollab.hsdl_sparse`). On a GPU, sparse ``X`` is kept as padded (columns,
    values) arrays on the device and a batch is densified there by one scatter, since dense
    products are what a GPU does best; rows of very unequal length (sample-level matrices),
    whose padding could cost more than the dense matrix, are densified by SciPy one batch at a
    time. Dense ``X`` stays dense.
    """

    def __init__(self, X: np.ndarray | sparse.csr_matrix, device: torch.device) -> None:
        self.X = X
        self.device = device
        self.n_experts = X.shape[1]
        self.padded = None
        self.dense = None
        if not sparse.issparse(X):
            self.dense = torch.as_tensor(X, device=device)
            return
        if device.type == "cpu":
            if not X.has_canonical_format:  # one stored entry per (row, column), sorted
                self.X = X = X.copy()
                X.sum_duplicates()
            return
        lengths = np.diff(X.indptr)
        width = max(int(lengths.max()), 1) if len(lengths) else 1
        if width * X.shape[0] <= 1.5 * max(X.nnz, 1):
            columns = np.zeros((X.shape[0], width), dtype=np.int64)
            values = np.zeros((X.shape[0], width), dtype=np.float32)
            slots = np.arange(width)[None, :] < lengths[:, None]
            columns[slots] = X.indices
            values[slots] = X.data
            self.padded = (torch.as_tensor(columns, device=device),
                           torch.as_tensor(values, device=device))

    def batch(self, ids: torch.Tensor) -> torch.Tensor | SparseBatch:
        if self.padded is not None:
            ids = ids.to(self.device)
            columns, values = self.padded[0][ids], self.padded[1][ids]
            block = torch.zeros(len(ids), self.n_experts, device=self.device)
            return block.scatter_add_(1, columns, values)  # padding adds 0 to column 0
        if self.dense is not None:
            return self.dense[ids.to(self.device)]
        rows = self.X[ids.numpy()]
        if self.device.type == "cpu":
            return SparseBatch(rows)
        return torch.as_tensor(rows.toarray(), device=self.device)


def _forward(
    batch: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Dictionaries ``sigmoid(Θ_l)`` and codes: samples at level 1, level-l atoms at level l+1."""
    dictionaries = [torch.sigmoid(theta) for theta in thetas]
    codes = [torch.relu(batch @ weights[0].T + biases[0])]
    for level in range(1, len(thetas)):
        codes.append(torch.relu(dictionaries[level - 1] @ weights[level].T + biases[level]))
    return dictionaries, codes


# --------------------------------------------------------------------------------------------
# Flat baselines
# --------------------------------------------------------------------------------------------


def fit_flat_baseline(
    X: ArrayLike,
    n_atoms: int,
    *,
    method: Literal["nmf", "dictionary_learning"] = "nmf",
    random_state: int | None = None,
    alpha: float = 0.1,
    batch_size: int = 256,
    max_iter: int = 400,
) -> tuple[np.ndarray, np.ndarray]:
    """A one-level dictionary from scikit-learn on the same matrix as HSDL.

    Parameters
    ----------
    X : ndarray, torch.Tensor or scipy sparse, shape (n_samples, n_experts)
        Non-negative.
    n_atoms : int
        Atoms (components).
    method : {"nmf", "dictionary_learning"}
        ``"nmf"``: `sklearn.decomposition.NMF` (init ``nndsvda``, Frobenius loss).
        ``"dictionary_learning"``: `MiniBatchDictionaryLearning` with ``positive_dict=True``,
        ``positive_code=True``, coordinate-descent fit and lasso transform.
    random_state : int or None
    alpha : float
        Sparsity weight of dictionary learning (ignored by NMF).
    batch_size : int
        Mini-batch size of dictionary learning.
    max_iter : int
        NMF iterations, or dictionary-learning epochs divided by 20 (at least 1).

    Returns
    -------
    dictionary : ndarray of float32, shape (n_atoms, n_experts)
    codes : ndarray of float32, shape (n_samples, n_atoms)
    """
    X = check_activation_matrix(X)
    if not isinstance(n_atoms, numbers.Integral) or isinstance(n_atoms, bool) or n_atoms < 1:
        raise ValueError(f"n_atoms must be a positive int; got {n_atoms!r}")
    if method == "nmf":
        model = NMF(
            n_components=n_atoms, init="nndsvda", max_iter=max_iter, random_state=random_state
        )
        codes = model.fit_transform(X)
        dictionary = model.components_
    elif method == "dictionary_learning":
        model = MiniBatchDictionaryLearning(
            n_components=n_atoms,
            alpha=alpha,
            batch_size=batch_size,
            max_iter=max(1, max_iter // 20),
            fit_algorithm="cd",
            transform_algorithm="lasso_cd",
            transform_alpha=alpha,
            positive_dict=True,
            positive_code=True,
            random_state=random_state,
        )
        # scikit-learn's dictionary learning takes dense input only.
        dense = X.toarray() if sparse.issparse(X) else X
        codes = model.fit(dense).transform(dense)
        dictionary = model.components_
    else:
        raise ValueError(f"method must be 'nmf' or 'dictionary_learning'; got {method!r}")
    return np.asarray(dictionary, dtype=np.float32), np.asarray(codes, dtype=np.float32)


# ---- saving a fit -----------------------------------------------------------------------------

_FITTED_ARRAYS = ("dictionaries_", "hierarchy_codes_", "encoder_weights_", "encoder_biases_",
                  "atom_usage_")


def save_hsdl(model: HSDL, folder: str | os.PathLike) -> None:
    """Write a fitted HSDL as ``hsdl.safetensors`` (arrays) and ``hsdl.json`` (everything else).

    No pickle: :func:`load_hsdl` rebuilds the estimator from these two files.
    """
    import json

    from safetensors.numpy import save_file

    check_is_fitted(model, "dictionaries_")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {f"{name}{level}": np.ascontiguousarray(array, dtype=np.float32)
               for name in _FITTED_ARRAYS for level, array in enumerate(getattr(model, name))}
    save_file(tensors, os.path.join(folder, "hsdl.safetensors"))
    params = model.get_params()
    params["n_atoms"] = list(params["n_atoms"])
    params["random_state"] = params["random_state"] if isinstance(
        params["random_state"], int | None) else None
    state = {"params": params, "n_iter_": model.n_iter_, "n_features_in_": model.n_features_in_,
             "active_atoms_": model.active_atoms_, "loss_history_": model.loss_history_}
    with open(os.path.join(folder, "hsdl.json"), "w") as handle:
        json.dump(state, handle, indent=1, sort_keys=True)


def load_hsdl(folder: str | os.PathLike) -> HSDL:
    """The estimator written by :func:`save_hsdl`, ready for ``transform``."""
    import json

    from safetensors.numpy import load_file

    folder = os.fspath(folder)
    with open(os.path.join(folder, "hsdl.json")) as handle:
        state = json.load(handle)
    tensors = load_file(os.path.join(folder, "hsdl.safetensors"))
    params = state["params"]
    params["n_atoms"] = tuple(params["n_atoms"])
    model = HSDL(**params)
    for name in _FITTED_ARRAYS:
        levels = sorted(int(key[len(name):]) for key in tensors if key.startswith(name)
                        and key[len(name):].isdigit())
        setattr(model, name, [tensors[f"{name}{level}"] for level in levels])
    model.n_iter_ = state["n_iter_"]
    model.n_features_in_ = state["n_features_in_"]
    model.active_atoms_ = state["active_atoms_"]
    model.loss_history_ = state["loss_history_"]
    model.device_ = torch.device("cpu")
    return model


# Stage 03's fits, by model: the folder names are the contract with stages 04 and 05.
STAGE_FIT_FOLDERS = {"trained": "hsdl", "control": "control_hsdl"}


def save_stage_fit(model: HSDL, hsdl_folder: str | os.PathLike, of: str = "trained") -> None:
    """Save stage 03's fit of ``of``'s routing (``trained`` or ``control``) where 04/05 read it."""
    save_hsdl(model, os.path.join(hsdl_folder, _stage_fit_name(of)))


def load_stage_fit(hsdl_folder: str | os.PathLike, of: str = "trained") -> HSDL | None:
    """Stage 03's fit of ``of``'s routing; None for a control that was not fitted."""
    folder = os.path.join(hsdl_folder, _stage_fit_name(of))
    if of == "control" and not os.path.isdir(folder):
        return None
    return load_hsdl(folder)


def _stage_fit_name(of: str) -> str:
    if of not in STAGE_FIT_FOLDERS:
        raise ValueError(f"of must be one of {sorted(STAGE_FIT_FOLDERS)}; got {of!r}")
    return STAGE_FIT_FOLDERS[of]


def dictionary_metrics(X: ArrayLike, codes: np.ndarray, dictionary: np.ndarray, *,
                       weight_threshold: float = 0.5, code_threshold: float = 1e-6
                       ) -> dict[str, float]:
    """How well and how sparsely a dictionary explains ``X``: the numbers the HSDL chapter compares.

    Parameters
    ----------
    X : array or sparse, shape (n_samples, n_experts)
    codes : ndarray, shape (n_samples, n_atoms)
    dictionary : ndarray, shape (n_atoms, n_experts)
    weight_threshold : an expert belongs to an atom when its weight, relative to the atom's
        largest, is at least this
    code_threshold : a code entry above this counts as used

    Returns
    -------
    dict with ``l1_error`` (mean ‖x − x̂‖₁), ``nonzeros_per_code``, ``active_atoms`` (atoms used
    by at least 0.1% of the total code mass) and ``mean_atom_size`` (experts per active atom).

    Examples
    --------
    >>> X = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    >>> metrics = dictionary_metrics(X, np.eye(2), np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    >>> metrics["l1_error"], metrics["nonzeros_per_code"], metrics["mean_atom_size"]
    (0.0, 1.0, 1.5)
    """
    codes = np.asarray(codes)
    dictionary = np.asarray(dictionary)
    usage = codes.sum(axis=0)
    active = usage >= _ACTIVE_USAGE_RATIO * max(usage.sum(), 1e-30)
    scale = dictionary.max(axis=1, keepdims=True)
    members = dictionary >= weight_threshold * np.where(scale > 0, scale, np.inf)
    return {
        "l1_error": float(mean_l1_error(X, codes, dictionary)),
        "nonzeros_per_code": float((codes > code_threshold).sum(axis=1).mean()),
        "active_atoms": int(active.sum()),
        "mean_atom_size": float(members[active].sum(axis=1).mean()) if active.any() else 0.0,
    }
