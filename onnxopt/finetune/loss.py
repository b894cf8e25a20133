"""The distillation losses in torch, defined exactly as the fused graph of pass ``distill`` computes them.

With logits ``s`` (student) and ``t`` (teacher), class axis last:

- KD = T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, averaged over the rest;
- CE = −log softmax(s)[label], averaged (with mixup: lam·CE(label) + (1−lam)·CE(partner's label));
- total = alpha·KD + (1−alpha)·CE; KD alone without labels, CE alone without a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossTerms", "distill_loss"]


@dataclass(frozen=True)
class LossTerms:
    """The three loss values of one batch (scalars; ``total`` is the one to back-propagate)."""

    kd: torch.Tensor
    ce: torch.Tensor
    total: torch.Tensor


def _nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None, *,
                 temperature: float, alpha: float, labels_mixed: torch.Tensor | None = None,
                 lam: torch.Tensor | None = None) -> LossTerms:
    """KD, CE and total loss of a batch, as the fused distillation graph defines them."""
    s = student.float()
    zero = s.new_zeros(())
    kd = zero
    if teacher is not None:
        t = teacher.float()
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
        p = F.softmax(t / temperature, dim=-1)
        kd = (p * (log_p - log_q)).sum(dim=-1).mean() * (temperature * temperature)
    ce = zero
    if labels is not None:
        log_s = F.log_softmax(s, dim=-1)
        nll = _nll(log_s, labels)
        if labels_mixed is not None and lam is not None:
            weight = lam.reshape(-1, *([1] * (nll.ndim - 1)))
            nll = weight * nll + (1 - weight) * _nll(log_s, labels_mixed)
        ce = nll.mean()
    if teacher is None:
        total = ce
    elif labels is None:
        total = kd
    else:
        total = alpha * kd + (1 - alpha) * ce
    return LossTerms(kd, ce, total)
