"""Closed-form single-layer weight edits: MEMIT and AlphaEdit, fed the keys and residuals NeuralDB
stores (paper section 3: linear locate-and-edit read as a key-value database).

Shapes, with keys and residuals as rows (the store's layout):
    K1 (n, d1)   keys of the n edited facts: the down-projection's input at the subject's last token
    R  (n, d2)   residuals: what the down-projection's output must gain at those tokens
    C0 (d1, d1)  K0ᵀ K0 (or its mean K0ᵀ K0 / N) over N preserved tokens, K0 (N, d1)
    W  (d2, d1)  the down-projection weight (nn.Linear layout: y = W k)
    Δ  (d2, d1)  the update, W ← W + Δ, so that (W + Δ) k_i = W k_i + r_i

MEMIT (Meng et al. 2023, batch, one layer). Minimise over Δ
    Σ_i ‖Δ k_i − r_i‖² + λ Σ_j ‖Δ k0_j‖²  =  ‖K1 Δᵀ − R‖²_F + λ ‖K0 Δᵀ‖²_F.
Setting the gradient with respect to Δᵀ to zero: K1ᵀ (K1 Δᵀ − R) + λ K0ᵀ K0 Δᵀ = 0, so
    (λ C0 + K1ᵀ K1) Δᵀ = K1ᵀ R,     Δ = Rᵀ K1 (λ C0 + K1ᵀ K1)⁻¹        (d2, n)(n, d1)(d1, d1).
This is the paper's Eq. 8 (written there with keys as columns, Δ = R1 K1ᵀ (K1 K1ᵀ + β1 K0 K0ᵀ)⁻¹).
λ C0 + K1ᵀ K1 is symmetric positive definite when C0 is (or when λ C0 + K1ᵀ K1 has full rank), so
Δᵀ is found by one Cholesky factorisation and two triangular solves, never an explicit inverse.
With λ → 0 and n ≤ d1 linearly independent keys, Δ k_i → r_i exactly. The original MEMIT uses
C0 = E[k kᵀ] (the mean over tokens) with λ = mom2_update_weight (1.5e4-2e4 for GPT-J / GPT-2 XL).

AlphaEdit (Fang et al., ICLR 2025, one batch, no earlier edits). Δ is restricted to Δ = δ P, where
P = U Uᵀ (d1, d1) projects onto the eigenvectors U of C0 whose eigenvalues fall below a threshold
(the approximate null space of K0: ‖K0 P‖ ≈ 0), so Δ k0 = δ P k0 ≈ 0 for every preserved key.
The preservation term then vanishes and δ minimises ‖K1 P δᵀ − R‖²_F + λ ‖P δᵀ‖²_F; with the
unknown Z = P δᵀ (d1, d2) confined to range(P), the normal equations are
    (P K1ᵀ K1 P + λ I) Z = P K1ᵀ R,      Δ = Zᵀ = Rᵀ K1 P (P K1ᵀ K1 P + λ I)⁻¹ P,
the paper's Eq. 10 (with keys as columns: R1 K1ᵀ Pᵀ (P K1 K1ᵀ Pᵀ + β2 I)⁻¹ P). Because P² = P,
P (K1ᵀ K1 P + λ I) = (P K1ᵀ K1 P + λ I) P, so this equals the form in AlphaEdit's paper and code,
Δ = Rᵀ K1 P (K1ᵀ K1 P + λ I)⁻¹ (their Eq. 14 without the earlier-edit term Kp Kpᵀ). The matrix
P K1ᵀ K1 P + λ I is symmetric positive definite for λ > 0, so again Cholesky. A key's component
in range(C0) is invisible to Δ: a key maps to its residual only through its null-space part P k.
AlphaEdit's defaults: C0 = E[k kᵀ], threshold 2e-2 on its eigenvalues, λ = 10.

All arithmetic is float64 on the inputs' device; every function returns float64.
"""

from __future__ import annotations

import torch


def _float64_matrix(name: str, value, rows=None, cols=None) -> torch.Tensor:
    """`value` as a 2-D float64 tensor; a ValueError naming `name` and the shapes when it is not
    2-D, has the wrong size, or holds NaN/Inf."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if (rows is not None and value.shape[0] != rows) or (cols is not None and value.shape[1] != cols):
        want = (rows if rows is not None else "*", cols if cols is not None else "*")
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected ({want[0]}, {want[1]})")
    value = value.detach().to(torch.float64)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return value


def _keys_and_residuals(keys: torch.Tensor, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K1 (n, d1), R (n, d2)) in float64, with matching row counts (a ValueError naming both shapes)."""
    K1 = _float64_matrix("keys", keys)
    R = _float64_matrix("residuals", residuals)
    if K1.shape[0] != R.shape[0]:
        raise ValueError(f"keys {tuple(K1.shape)} and residuals {tuple(R.shape)} must have the same number "
                         "of rows (one key and one residual per fact)")
    if K1.shape[0] == 0:
        raise ValueError("no facts: keys and residuals have 0 rows")
    return K1, R.to(K1.device)


def _check_regularisation(name: str, value: float, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value == float("inf"):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    return value


def _solve_spd(A: torch.Tensor, B: torch.Tensor, described: str) -> torch.Tensor:
    """X with A X = B for symmetric positive definite A (d, d), by Cholesky; a ValueError when A is
    not positive definite in float64."""
    factor, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        raise ValueError(f"{described} is not positive definite (Cholesky failed at column {info.item()}); "
                         "collect the key statistics over more tokens or raise the regularisation")
    return torch.cholesky_solve(B, factor)


def memit_delta(keys: torch.Tensor, residuals: torch.Tensor, covariance: torch.Tensor, weight: float) -> torch.Tensor:
    """MEMIT's single-layer batch update Δ = Rᵀ K1 (λ C0 + K1ᵀ K1)⁻¹ (see the module docstring).

    keys: K1 (n, d1); residuals: R (n, d2); covariance: C0 (d1, d1), symmetric positive
    semi-definite; weight: λ >= 0 (the preservation weight; 0 only when K1ᵀ K1 alone is invertible).
    Returns Δ (d2, d1) float64, to be added to the down-projection weight (nn.Linear layout).
    """
    K1, R = _keys_and_residuals(keys, residuals)
    d1 = K1.shape[1]
    C0 = _float64_matrix("covariance", covariance, d1, d1).to(K1.device)
    lam = _check_regularisation("weight", weight, positive=False)
    A = lam * C0 + K1.T @ K1
    A = (A + A.T) / 2  # exact symmetry for the factorisation
    return _solve_spd(A, K1.T @ R, f"λ C0 + K1ᵀ K1 (λ={lam}, d1={d1}, n={K1.shape[0]})").T


def null_space_projection(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's projection P = U Uᵀ (d1, d1) float64, U the eigenvectors of the symmetric matrix
    C0 whose eigenvalues are below `threshold` (absolute, in C0's units: AlphaEdit uses 2e-2 on
    the mean E[k kᵀ]). K0 P ≈ 0 for the preserved keys K0. A ValueError when no eigenvalue is below
    the threshold (the null space is empty, so AlphaEdit could change nothing)."""
    C0 = _float64_matrix("covariance", covariance)
    if C0.shape[0] != C0.shape[1]:
        raise ValueError(f"covariance must be square (d1, d1), got shape {tuple(C0.shape)}")
    threshold = _check_regularisation("threshold", threshold, positive=True)
    eigenvalues, eigenvectors = torch.linalg.eigh((C0 + C0.T) / 2)
    U = eigenvectors[:, eigenvalues < threshold]
    if U.shape[1] == 0:
        raise ValueError(f"no eigenvalue of the covariance is below the threshold {threshold} (smallest "
                         f"{eigenvalues[0].item():.3g}): the null space is empty")
    return U @ U.T


def alphaedit_delta(keys: torch.Tensor, residuals: torch.Tensor, projection: torch.Tensor,
                    regularisation: float) -> torch.Tensor:
    """AlphaEdit's update Δ = Rᵀ K1 P (P K1ᵀ K1 P + λ I)⁻¹ P (see the module docstring).

    keys: K1 (n, d1); residuals: R (n, d2); projection: P (d1, d1) from `null_space_projection`;
    regularisation: λ > 0. Returns Δ (d2, d1) float64 with Δ = Δ P, so Δ k0 ≈ 0 for preserved keys.
    """
    K1, R = _keys_and_residuals(keys, residuals)
    d1 = K1.shape[1]
    P = _float64_matrix("projection", projection, d1, d1).to(K1.device)
    lam = _check_regularisation("regularisation", regularisation, positive=True)
    projected = K1 @ P  # (n, d1): each key's null-space part (P is symmetric)
    A = projected.T @ projected + lam * torch.eye(d1, dtype=torch.float64, device=K1.device)
    Z = _solve_spd(A, projected.T @ R, f"P K1ᵀ K1 P + λ I (λ={lam}, d1={d1})")
    return (P @ Z).T  # the leading P keeps Δ exactly in the null space against rounding
