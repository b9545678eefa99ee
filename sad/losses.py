"""Distillation losses as pure functions.

Shapes: ``B`` sequences, ``T`` positions, ``V`` vocabulary, ``N`` selected positions, ``K``
bins of a distribution. Logits at position ``t`` predict token ``t+1``; callers align logits
and masks with :func:`shift`.

Divergences ``D(p_T, p_S)`` between the teacher's and the student's next-token
distributions at temperature τ, each scaled by τ² (Hinton et al.):

* ``forward_kl`` - KL(p_T ‖ p_S), mode-covering (the paper's choice);
* ``reverse_kl`` - KL(p_S ‖ p_T), mode-seeking;
* ``jsd`` - generalised Jensen-Shannon with ``β``: β·KL(p_T ‖ m) + (1-β)·KL(p_S ‖ m),
  m = β·p_T + (1-β)·p_S (symmetric at β = 0.5);
* ``skew_kl`` - KL(p_T ‖ α·p_T + (1-α)·p_S) (DistiLLM's skew KL; α = 0 is forward KL).

They take log-probabilities over the same K bins: the full vocabulary (online teacher
logits) or a cached top-k plus one tail bin holding the remaining mass (:func:`topk_bins`).

Objectives (``normalisation``):

* ``per_kind_mean`` - SAD = λ_r·mean(D over REASON tokens) + λ_a·mean(D over ACT tokens):
  each kind counts by λ whatever its length;
* ``token_sum`` - Σ (λ_r·m_r + λ_a·m_a)·D / (number of generated tokens): each token counts
  alike, so the longer kind dominates.

Token-level KD is one D over all generated tokens; SFT is the cross-entropy of the teacher's
tokens over the same positions. ``counts`` arguments let a caller normalise by token counts
over a whole (distributed, accumulated) batch instead of the local one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Normalisation = Literal["per_kind_mean", "token_sum"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl")


def shift(logits: torch.Tensor, *masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Align next-token logits [B, T, V] with masks/targets [B, T]: drop the last logit and first mask entry."""
    return (logits[:, :-1, :], *(m[:, 1:] for m in masks))


def _kl_logp(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim from log-probabilities [..., K] -> [...]; 0·log 0 = 0."""
    p = p_logp.exp()
    terms = torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p))
    return terms.sum(-1)


def _mix_logp(p_logp: torch.Tensor, q_logp: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w·p + (1-w)·q) [..., K], computed stably in log space."""
    if weight_p <= 0:
        return q_logp
    if weight_p >= 1:
        return p_logp
    return torch.logaddexp(p_logp + math.log(weight_p), q_logp + math.log1p(-weight_p))


def divergence(
    kind: Divergence,
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """D(p_T, p_S) per position from log-probabilities over the same bins: [..., K] -> [...]."""
    if kind == "forward_kl":
        return _kl_logp(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl_logp(student_logp, teacher_logp)
    if kind == "jsd":
        m = _mix_logp(teacher_logp, student_logp, beta)
        return beta * _kl_logp(teacher_logp, m) + (1 - beta) * _kl_logp(student_logp, m)
    if kind == "skew_kl":
        return _kl_logp(teacher_logp, _mix_logp(teacher_logp, student_logp, alpha))
    raise ValueError(f"unknown divergence {kind!r}; use one of {list(DIVERGENCES)}")


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """D at temperature τ, times τ², from full logits: [..., V] and [..., V] -> [...]."""
    t = float(temperature)
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return divergence(kind, t_logp, s_logp, beta, alpha) * (t * t)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(p_T ‖ p_S) at temperature τ, times τ²: [B, T, V] x2 -> [B, T]."""
    return logit_divergence(student_logits, teacher_logits, "forward_kl", temperature)


LOG_FLOOR = -1e4  # log of an empty bin: exp() is exactly 0 and differences stay finite (no NaN gradients)


def complement_logsumexp(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Σ p over the tokens not in ``indices``: logp [N, V], indices [N, k] -> [N] (LOG_FLOOR if none)."""
    chosen = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, indices.long(), True)
    return torch.logsumexp(logp.masked_fill(chosen, float("-inf")), dim=-1).clamp(min=LOG_FLOOR)


def topk_bins(student_logits: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The student's log-probs on the teacher's top-k tokens plus a tail bin: [N, V], [N, k] -> [N, k+1]."""
    s_logp = F.log_softmax(student_logits.float() / float(temperature), dim=-1)
    return torch.cat([s_logp.gather(-1, indices.long()), complement_logsumexp(s_logp, indices).unsqueeze(-1)], dim=-1)


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_tail_logp: torch.Tensor,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """D against a cached top-k teacher: student [N, V]; teacher top-k log-probs at τ and ids [N, k],
    tail log-mass [N] -> [N].

    Both distributions are reduced to k+1 bins (the teacher's top-k tokens and the rest), so
    the divergence is exact on the top-k and lumps the tail; with k = V it equals
    :func:`logit_divergence`.
    """
    t = float(temperature)
    s = topk_bins(student_logits, teacher_topk_indices, t)
    p = torch.cat([teacher_topk_logp.float(), teacher_tail_logp.float().clamp(min=LOG_FLOOR).unsqueeze(-1)], dim=-1)
    return divergence(kind, p, s, beta, alpha) * (t * t)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: float | torch.Tensor | None = None) -> torch.Tensor:
    """Σ values·mask / count, values and mask [B, T] (or [N]); count defaults to Σ mask (0 if empty)."""
    mask = mask.to(values.dtype)
    denominator = mask.sum() if count is None else torch.as_tensor(count, dtype=values.dtype, device=values.device)
    picked = torch.where(mask > 0, values * mask, torch.zeros_like(values))  # inf/nan outside the mask never leak
    return picked.sum() / denominator.clamp(min=1.0)


def sad_loss(
    per_token: torch.Tensor,
    reason_mask: torch.Tensor,
    act_mask: torch.Tensor,
    lambda_reason: float = 1.0,
    lambda_act: float = 1.0,
    normalisation: Normalisation = "per_kind_mean",
    counts: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Segment-weighted loss from a per-token divergence and the two masks (all [B, T] or [N]).

    ``counts`` = (REASON tokens, ACT tokens) to normalise by (default: those of the masks).
    """
    r = reason_mask.to(per_token.dtype)
    a = act_mask.to(per_token.dtype)
    n_r, n_a = counts if counts is not None else (r.sum(), a.sum())
    if normalisation == "per_kind_mean":
        loss = per_token.new_zeros(())
        if lambda_reason:
            loss = loss + lambda_reason * masked_mean(per_token, r, n_r)
        if lambda_act:
            loss = loss + lambda_act * masked_mean(per_token, a, n_a)
        return loss
    if normalisation == "token_sum":
        weights = lambda_reason * r + lambda_act * a
        weighted = torch.where(weights > 0, weights * per_token, torch.zeros_like(per_token))
        return weighted.sum() / torch.as_tensor(n_r + n_a, dtype=per_token.dtype).clamp(min=1.0)
    raise ValueError(f"unknown normalisation {normalisation!r}; use 'per_kind_mean' or 'token_sum'")


def token_kd_loss(per_token: torch.Tensor, generated_mask: torch.Tensor, count: float | None = None) -> torch.Tensor:
    """One divergence over all generated tokens: per_token, generated_mask [B, T] -> scalar."""
    return masked_mean(per_token, generated_mask, count)


def token_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position CE of the teacher's tokens: logits [..., V], targets [...] -> [...]."""
    flat = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1), reduction="none")
    return flat.reshape(targets.shape)


def sft_loss(student_logits: torch.Tensor, targets: torch.Tensor, generated_mask: torch.Tensor,
             count: float | None = None) -> torch.Tensor:
    """Imitation: mean CE over generated tokens. logits [B, T, V], targets/mask [B, T] -> scalar."""
    return masked_mean(token_cross_entropy(student_logits, targets), generated_mask, count)
