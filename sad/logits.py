"""A teacher's logits where a loss reads them: fp32 at the generated positions, as its own forward gives them.

Shared by the top-k cache (:mod:`sad.teacher_cache`) and the training loop's online teacher and dev loss
(:mod:`sad.training`); only torch here, so that neither imports the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_head_matches_forward", "generated_logits", "generated_mask", "model_logit_processing"]


def generated_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1] bool: logit positions whose next token is generated (REASON or ACT) in a collated batch."""
    return (batch["reason_mask"][:, 1:] + batch["act_mask"][:, 1:]) > 0


@torch.no_grad()
def generated_logits(model, input_ids: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """fp32 logits [n, V] at the ``generated`` positions [B, T-1] (row-major) of ``input_ids`` [B, T].

    The decoder runs in the model's dtype; the output head runs in fp32 on the selected positions only,
    so a bf16 teacher's log-probs are not rounded to bf16's 8-bit mantissa (a logit near 20 would move
    in steps of 0.125) and no logits are computed where no loss reads them. The top-k cache and the
    online teacher of a training loop both read their targets here."""
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state[:, :-1][generated]  # [n, H]
    head = model.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.float()
    with torch.autocast(hidden.device.type, enabled=False):  # in a training loop's bf16 autocast too
        return model_logit_processing(model.config, F.linear(hidden.float(), head.weight.float(), bias))


def model_logit_processing(config, logits: torch.Tensor) -> torch.Tensor:
    """What some architectures' own forward does after the output head (transformers' code): Cohere's
    ``logit_scale``, Granite's ``logits_scaling``, Gemma 2/3's ``final_logit_softcapping``; Llama (the
    default teachers) does nothing. :func:`check_head_matches_forward` catches any other."""
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def check_head_matches_forward(model, input_ids: torch.Tensor, generated: torch.Tensor) -> None:
    """Refuse a teacher whose forward changes its logits in a way :func:`generated_logits` does not
    reproduce (the cache would hold another distribution than the teacher's): compared on one window
    [1, T] against the model's own logits, within the rounding of its dtype."""
    own = model(input_ids=input_ids).logits[:, :-1][generated].float()  # [n, V]
    ours = generated_logits(model, input_ids, generated)
    if own.numel() == 0:
        return
    # bf16's rounding (2^-8 relative; SmolLM2 in bf16: 0.125 at logits up to 45) with room; a scale, a divisor
    # or a soft cap moves large logits by far more
    limit = 2 ** -7 * (1.0 + float(own.abs().max()))
    gap = float((own - ours).abs().max())
    if gap > limit:
        raise ValueError(
            f"teacher: {type(model).__name__}'s forward post-processes its logits in a way the fp32 "
            f"output head does not reproduce (largest difference {gap:.3g} > {limit:.3g}); the cached targets would "
            f"not be the teacher's distribution. Merge an adapter on the output layer into the weights, or add the "
            f"processing to sad.logits.model_logit_processing")
