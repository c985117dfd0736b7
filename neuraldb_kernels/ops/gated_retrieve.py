"""`gated_retrieve`: the NeuralDB gated retrieval op (paper Eq. 11), its autograd rule and its
registration as the torch.library custom op `neuraldb::gated_retrieve`.

For every query row q (..., d1) against keys K (m, d1) and residuals R (m, d2):
    score = max_i cos(q, K_i),  index = argmax_i cos(q, K_i) (lowest i on exact ties),
    out   = R[index] if score > gamma[index] else 0,
where gamma is one number for every key or a (m,) float32 tensor of per-key thresholds: the
argmax is taken first (ties to the lowest index), then the winner's own threshold decides.
A query row with NaN/Inf never matches (score NaN, index -1); a key with NaN/Inf never wins
(its cosine counts as -inf).
Gradients: out is a gathered row of R, so d out / d R is an index_add of the upstream gradient
onto the selected rows. The gate and the argmax are piecewise constant in q and K, so their
gradient is zero almost everywhere: no gradient flows to q or K (they receive None).
"""

import math
from typing import Optional, Tuple

import torch

from .contract import Gamma, check_inputs, check_key_gamma_values
from .dispatch import check_backend_name, get_backend, resolve_backend
from .key_index import KeyIndex
from .key_index import retrieve as retrieve_through_index

_OP = "neuraldb::gated_retrieve"


def _retrieve(
    q: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma, backend: str, check_values: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated inputs -> (out (..., d2), index (...), score (...)): check per-key threshold
    values (unless check_values is False: the caller checked them), resolve the backend, handle
    empty inputs, flatten the query rows and run the backend's kernel. A 2-D q, the decode case,
    goes to the kernel as it is: no reshapes (each costs microseconds of host time)."""
    per_key = isinstance(gamma, torch.Tensor)
    if per_key and check_values:
        check_key_gamma_values(gamma)
    name = resolve_backend(backend, q.device, (q.dtype, K.dtype, R.dtype))
    lead = q.shape[:-1]
    n, m, d2 = math.prod(lead), K.shape[0], R.shape[1]
    if n == 0 or m == 0:
        out = torch.zeros(*lead, d2, dtype=R.dtype, device=q.device)
        index = torch.full(lead, -1, dtype=torch.int64, device=q.device)
        score = torch.full(lead, float("-inf"), dtype=torch.float32, device=q.device)
        if m == 0 and n > 0:
            nonfinite = ~torch.isfinite(q).all(dim=-1)
            score = score.masked_fill(nonfinite, float("nan"))
        return out, index, score
    rows = q.dim() == 2
    q2d = q.contiguous() if rows else q.reshape(n, q.shape[-1]).contiguous()
    gamma = gamma.contiguous() if per_key else gamma
    out, index, score = get_backend(name).run(q2d, K.contiguous(), R.contiguous(), gamma)
    if rows:
        return out, index, score
    if not lead:  # q was one (d1,) row
        return out.reshape(d2), index.reshape(()), score.reshape(())
    return out.reshape(*lead, d2), index.reshape(*lead), score.reshape(*lead)


@torch.library.custom_op(_OP, mutates_args=())
def _gated_retrieve_op(
    q: torch.Tensor,
    K: torch.Tensor,
    R: torch.Tensor,
    gamma: float,
    backend: str,
    key_gamma: Optional[torch.Tensor] = None,
    check_key_gamma: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_retrieve` as the custom op: the threshold is key_gamma (m,) float32 when given (gamma is
    then ignored), else gamma. The backend is resolved and the per-key values checked inside
    (unless check_key_gamma is False), so that torch.compile treats the whole dispatch as one
    opaque call (no graph break on them)."""
    return _retrieve(q, K, R, gamma if key_gamma is None else key_gamma, backend, check_key_gamma)


@_gated_retrieve_op.register_fake
def _(q, K, R, gamma, backend, key_gamma=None, check_key_gamma=True):
    lead = q.shape[:-1]
    return (
        q.new_empty((*lead, R.shape[1]), dtype=R.dtype),
        q.new_empty(lead, dtype=torch.int64),
        q.new_empty(lead, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    R = inputs[2]
    ctx.save_for_backward(output[1])
    ctx.residual_shape = R.shape
    ctx.residual_dtype = R.dtype


def _backward(ctx, grad_out, grad_index, grad_score):
    (index,) = ctx.saved_tensors
    grad_R = None
    if ctx.needs_input_grad[2]:
        d2 = ctx.residual_shape[1]
        flat_index = index.reshape(-1)
        fired = (flat_index >= 0)[:, None]
        rows = torch.where(fired, grad_out.reshape(-1, d2), torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
        grad_R = torch.zeros(ctx.residual_shape, dtype=ctx.residual_dtype, device=grad_out.device)
        grad_R.index_add_(0, flat_index.clamp_min(0), rows.to(ctx.residual_dtype))
    return None, None, grad_R, None, None, None, None


_gated_retrieve_op.register_autograd(_backward, setup_context=_setup_context)


def _retrieve_through_index(q, index: KeyIndex, R, gamma, backend: str):
    """The compressed path (key_index.py), with the gradient to R of the full op: out is re-gathered
    from R differentiably (the same rows bit for bit) when R requires grad."""
    with torch.no_grad():
        result = retrieve_through_index(q, index, R, gamma, backend=backend)
    out = result.out
    if torch.is_grad_enabled() and R.requires_grad:
        fired = (result.index >= 0)[..., None]
        rows = R.index_select(0, result.index.reshape(-1).clamp_min(0)).reshape(out.shape)
        out = torch.where(fired, rows, torch.zeros((), dtype=R.dtype, device=R.device))
    return out, result.index, result.score


def gated_retrieve(q, K, R, gamma, *, backend: str = "auto", return_index: bool = False):
    """Gated nearest-key retrieval (NeuralDB, Eq. 11-12).

    q: (..., d1) float tensor of queries (any leading dims, any strides).
    K: (m, d1) keys; R: (m, d2) residuals; m may be 0. float32/float16/bfloat16 (float64 on the
    "cpu" and "torch" backends); q, K and R may differ in dtype but share one device.
    K may instead be a `KeyIndex` of the keys (compressed codes, key_index.py): the same out,
    index and score, from a scan of the codes and an exact rescoring of certified candidates;
    q, R and a per-key gamma must then be on the index's device (its full-precision keys may be
    elsewhere). Candidate counts: `key_index.retrieve`. That path runs eagerly (no custom op,
    not traceable by torch.compile); the gradient to R is the full op's.
    gamma: gate threshold: a finite number in [-1, 1], or a float32 tensor (m,) on K's device
    holding one threshold in [-1, 1] per key row. A row fires when its best cosine > the threshold
    of its best key (index = argmax, lowest index on exact ties, then that key's threshold). The
    per-key values are checked on every call: one reduction over the m thresholds (and, on a GPU,
    a synchronisation; `gated_retrieve_prechecked` skips it for thresholds checked beforehand).
    backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns out (..., d2) in R.dtype: the best key's residual row (bit for bit) where the gate
    fires, zeros elsewhere. With return_index=True also index (...) int64 (-1 where the gate is
    closed, m == 0 or the query row has NaN/Inf) and score (...) float32 (the best cosine even
    below gamma; -inf when m == 0; NaN for NaN/Inf query rows).

    Under autograd (an input requires grad) or torch.compile this calls the custom op
    `torch.ops.neuraldb.gated_retrieve`; in eager inference it runs the same code directly.
    """
    if isinstance(K, KeyIndex):
        out, index, score = _retrieve_through_index(q, K, R, gamma, backend)
        return (out, index, score) if return_index else out
    out, index, score = _dispatch(q, K, R, check_inputs(q, K, R, gamma), backend, check_values=True)
    return (out, index, score) if return_index else out


def gated_retrieve_prechecked(q, K, R, key_gamma: torch.Tensor, *, backend: str = "auto"):
    """`gated_retrieve(q, K, R, key_gamma, backend=backend, return_index=True)` for per-key
    thresholds whose values the caller has already checked (every one in [-1, 1]), when it wrote
    them: the per-call check of the m values, a host synchronisation on a GPU, is skipped, so the
    call can be captured in a CUDA graph. Everything else is checked as by `gated_retrieve`
    (types, shapes, devices: metadata only, read on the host without touching the values).
    Thresholds outside [-1, 1] are not detected here; the graph-safe attachment checks them at
    its sync (integration/graph_safe.py). Returns (out, index, score)."""
    key_gamma = check_inputs(q, K, R, key_gamma)
    if not isinstance(key_gamma, torch.Tensor):
        raise TypeError(f"gated_retrieve_prechecked: key_gamma must be a (m,) float32 tensor, got {type(key_gamma).__name__}")
    return _dispatch(q, K, R, key_gamma, backend, check_values=False)


def _dispatch(q, K, R, gamma: Gamma, backend: str, check_values: bool):
    """Checked inputs -> (out, index, score) through the custom op (autograd, torch.compile) or
    directly (eager inference)."""
    check_backend_name(backend)
    needs_graph = torch.is_grad_enabled() and (q.requires_grad or K.requires_grad or R.requires_grad)
    if needs_graph or torch.compiler.is_compiling():
        per_key = isinstance(gamma, torch.Tensor)
        return _gated_retrieve_op(q, K, R, 0.0 if per_key else gamma, backend, gamma if per_key else None,
                                  check_values)
    # eager inference (decode): the same computation, without the custom-op dispatch cost
    return _retrieve(q, K, R, gamma, backend, check_values)
