"""Pure-PyTorch references for the fused vocabulary kernels.

These compute, with plain `log_softmax`, exactly what `pyopd.token_stats` and
`pyopd.reverse_kl` compute in one pass. They are the ground truth of the tests
(run them in float64) and the "eager" baseline of the benchmarks. They are
differentiable with ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from pyopd.ops.types import ReverseKL, TokenStats  # re-exported: their historical home

__all__ = ["ReverseKL", "TokenStats", "reverse_kl_ref", "token_stats_ref"]


def _where_p(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Terms p_j * x_j are 0 where p_j == 0 (a -inf logit). Selecting x before
    # the product keeps autograd free of 0 * inf = NaN as well.
    return torch.where(p > 0, x, torch.zeros_like(x))


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -(p * _where_p(p, logp)).sum(-1)


def _gather(logp: torch.Tensor, tokens: Optional[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    if tokens is None:
        return torch.zeros(logp.shape[:-1], dtype=logp.dtype, device=logp.device)
    safe = torch.where(valid, tokens, torch.zeros_like(tokens)).long()
    return logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def _masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


def _nan_where(bad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(bad, torch.full_like(x, float("nan")), x)


def _log_softmax_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p [..., V], lse [...], bad [...]) with the kernels' non-finite rules.

    lse is logsumexp (+inf for a +inf logit, NaN if the row also has a NaN,
    -inf for an all -inf row); rows whose lse is not finite ("bad") have NaN
    log-probs and entropy.
    """
    lse = torch.logsumexp(x, dim=-1)
    bad = ~torch.isfinite(lse)
    return torch.log_softmax(x, dim=-1), lse, bad


def token_stats_ref(
    logits: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> TokenStats:
    """Reference of `pyopd.token_stats`: logits [..., V], tokens/mask [...]."""
    x = logits.to(compute_dtype) / temperature
    valid = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if mask is None else mask
    logp, lse, bad = _log_softmax_stats(x)
    logprob = _gather(logp, tokens, valid)
    return TokenStats(
        logprob=_masked(logprob if tokens is None else _nan_where(bad, logprob), valid),
        entropy=_masked(_nan_where(bad, _entropy(logp)), valid),
        lse=_masked(lse, valid),
    )


def reverse_kl_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> ReverseKL:
    """Reference of `pyopd.reverse_kl`: student [..., V], teacher [..., Vt >= V].

    The teacher is normalised over all Vt entries; the student has no mass on
    ids >= V, so the KL only sums over the first V entries.
    """
    V = student_logits.shape[-1]
    xs = student_logits.to(compute_dtype) / temperature
    xt = teacher_logits.detach().to(compute_dtype) / temperature
    valid = torch.ones(xs.shape[:-1], dtype=torch.bool, device=xs.device) if mask is None else mask
    logp, lse_s, bad_s = _log_softmax_stats(xs)
    logq_full, lse_t, bad_t = _log_softmax_stats(xt)
    logq = logq_full[..., :V]
    p = logp.exp()
    kl = (p * _where_p(p, logp - logq)).sum(-1)
    # KL = +inf when the student's support is not inside the teacher's: some
    # finite student logit where the teacher's is -inf, even if that p_j
    # underflows. NaN when either log-normaliser is NaN or +inf, or the
    # student's is -inf (an all -inf student row has no distribution).
    hole = ((xs > -torch.inf) & (xt[..., :V] == -torch.inf)).any(-1)
    kl = torch.where(hole, torch.full_like(kl, torch.inf), kl)
    kl = _nan_where(bad_s | torch.isnan(lse_t) | (lse_t == torch.inf), kl)
    lp_s, lp_t = _gather(logp, tokens, valid), _gather(logq, tokens, valid)
    if tokens is not None:
        lp_s, lp_t = _nan_where(bad_s, lp_s), _nan_where(bad_t, lp_t)
    return ReverseKL(
        kl=_masked(kl, valid),
        student_entropy=_masked(_nan_where(bad_s, _entropy(logp)), valid),
        teacher_entropy=_masked(_nan_where(bad_t, _entropy(logq_full)), valid),
        student_logprob=_masked(lp_s, valid),
        teacher_logprob=_masked(lp_t, valid),
        student_lse=_masked(lse_s, valid),
        teacher_lse=_masked(lse_t, valid),
    )
