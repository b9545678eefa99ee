"""Distillation losses as pure functions.

Shapes: ``B`` sequences, ``T`` positions, ``V`` vocabulary. Logits at position ``t`` predict
token ``t+1``; callers pass logits and masks already aligned (see :func:`shift`).

* SAD: ``λ_r · D(reason tokens) + λ_a · D(act tokens)`` with D = forward KL(teacher ‖ student)
  at temperature τ (scaled by τ², as in Hinton et al.).
* token-level KD: one D over all generated tokens (``m_r ∪ m_a``).
* SFT / imitation: cross-entropy on the teacher's tokens over the same positions.

Normalisation (``normalisation``):

* ``per_kind_mean`` - each kind's mean over its own tokens, then weighted by λ: a kind counts
  by λ whatever its length;
* ``token_sum`` - the λ-weighted sum over all generated tokens, divided by the number of
  generated tokens in the batch: each token counts alike, so the longer kind dominates.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Normalisation = Literal["per_kind_mean", "token_sum"]


def shift(logits: torch.Tensor, *masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Align next-token logits [B, T, V] with masks/targets [B, T]: drop the last logit and first mask entry."""
    return (logits[:, :-1, :], *(m[:, 1:] for m in masks))


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(p_T ‖ p_S) at temperature τ, times τ².

    student_logits, teacher_logits: [B, T, V] -> [B, T].
    """
    t = float(temperature)
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1) * (t * t)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, T] over positions where mask [B, T] is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def sad_loss(
    per_token: torch.Tensor,
    reason_mask: torch.Tensor,
    act_mask: torch.Tensor,
    lambda_reason: float = 1.0,
    lambda_act: float = 1.0,
    normalisation: Normalisation = "per_kind_mean",
) -> torch.Tensor:
    """Segment-weighted loss from a per-token divergence [B, T] and the two masks [B, T]."""
    r = reason_mask.to(per_token.dtype)
    a = act_mask.to(per_token.dtype)
    if normalisation == "per_kind_mean":
        return lambda_reason * masked_mean(per_token, r) + lambda_act * masked_mean(per_token, a)
    if normalisation == "token_sum":
        weighted = (lambda_reason * r + lambda_act * a) * per_token
        return weighted.sum() / (r + a).sum().clamp(min=1.0)
    raise ValueError(f"unknown normalisation {normalisation!r}; use 'per_kind_mean' or 'token_sum'")


def token_kd_loss(per_token: torch.Tensor, generated_mask: torch.Tensor) -> torch.Tensor:
    """One divergence over all generated tokens: per_token, generated_mask [B, T] -> scalar."""
    return masked_mean(per_token, generated_mask)


def token_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position CE of the teacher's tokens: logits [B, T, V], targets [B, T] -> [B, T]."""
    return F.cross_entropy(student_logits.float().transpose(1, 2), targets, reduction="none")


def sft_loss(student_logits: torch.Tensor, targets: torch.Tensor, generated_mask: torch.Tensor) -> torch.Tensor:
    """Imitation: mean CE over generated tokens. logits [B, T, V], targets/mask [B, T] -> scalar."""
    return masked_mean(token_cross_entropy(student_logits, targets), generated_mask)
