"""Training losses of ResAD (docs/method.md §4).

* :func:`occ_loss`: the log-barrier bidirectional one-class loss of the feature
  constraintor, with abnormal invariance;
* :func:`flow_loss`: maximum likelihood of the flows, plus in stage 2 the
  abnormal likelihood, a focal loss on ``softmax([logp, logp_a])`` and the
  boundary-guided semi-push-pull (BG-SPP) loss;
* :class:`BoundaryAverager`: the per-level moving average of the normal
  log-likelihood boundary used by BG-SPP.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

OCC_RADIUS = 0.4          # default normal radius r_max
OCC_INNER_RATIO = 0.99    # r_min = 0.99 * r_max
OCC_ABNORMAL_MARGIN = 0.1  # anomalies are pushed beyond r_max + 0.1


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    """Mean of a possibly empty tensor; an empty selection contributes 0 (not NaN)."""
    return values.mean() if values.numel() else values.new_zeros(())


def _barrier(violation: torch.Tensor) -> torch.Tensor:
    """Log-barrier penalty of positive violations, weighted by exp(violation) (weight detached)."""
    return _mean_or_zero(-F.logsigmoid(-violation) * violation.detach().exp())


def occ_radius(rows: torch.Tensor) -> torch.Tensor:
    """A = sqrt(||e|| + 1) - 1 per row."""
    return torch.sqrt(rows.norm(dim=1) + 1.0) - 1.0


def occ_loss(constrained: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-barrier bidirectional OCC loss on (N, C) rows with a (N,) 0/1 mask.

    ``constrained`` is the constraintor output e, ``target`` the unconstrained
    residual t (detached).  Normal radii are pulled into [r_min, r_max];
    anomalous rows keep their residual (MSE + cosine) and are pushed beyond
    r_max + 0.1.
    """
    radius = occ_radius(constrained)
    abnormal = mask.reshape(-1) > 0
    loss = constrained.new_zeros(())
    r_max = OCC_RADIUS
    if abnormal.any():
        r_max = min(0.9 * radius[abnormal].min().item(), OCC_RADIUS)
    r_min = OCC_INNER_RATIO * r_max
    normal_radius = radius[~abnormal]
    if normal_radius.numel():
        outer = normal_radius[normal_radius > r_max] - r_max
        inner = r_min - normal_radius[normal_radius < r_min]
        loss = loss + _barrier(outer) + _barrier(inner)
    if abnormal.any():
        e, t = constrained[abnormal], target[abnormal].detach()
        invariance = F.mse_loss(e, t) + (1.0 - F.cosine_similarity(e, t, dim=1)).mean()
        boundary = r_max + OCC_ABNORMAL_MARGIN
        abnormal_radius = radius[abnormal]
        loss = loss + invariance + _barrier(boundary - abnormal_radius[abnormal_radius < boundary])
    return loss


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on two-class probabilities (N, 2) with label smoothing, as in the authors' code.

    The one-hot target is clamped to [smooth, 1 - smooth]; p_t = <target, p> + smooth;
    loss = mean(-(1 - p_t)^gamma * log p_t).  (torchvision's ``sigmoid_focal_loss``
    works on logits of independent sigmoids, not on these softmax probabilities.)
    """
    one_hot = F.one_hot(target.reshape(-1).long(), num_classes=probs.shape[1]).to(probs.dtype)
    one_hot = one_hot.clamp(smooth / (probs.shape[1] - 1), 1.0 - smooth)
    p_t = (one_hot * probs).sum(dim=1) + smooth
    return (-(1.0 - p_t).pow(gamma) * p_t.log()).mean()


def normal_boundary(logp: torch.Tensor, mask: torch.Tensor, beta: float = 0.05) -> Optional[torch.Tensor]:
    """The ``beta`` quantile (lower tail) of the normal log-likelihoods; None without normal rows."""
    normal = logp[mask.reshape(-1) == 0].detach()
    if normal.numel() == 0:
        return None
    return normal.sort().values[int(normal.numel() * beta)]


def bgspp_loss(logp: torch.Tensor, mask: torch.Tensor, b_normal: torch.Tensor, b_abnormal: torch.Tensor) -> torch.Tensor:
    """Boundary-guided semi-push-pull: normal logp below b_n are pulled up, anomalous
    logp above b_a are pushed down, each with mean -logsigmoid(violation)."""
    mask = mask.reshape(-1)
    normal, abnormal = logp[mask == 0], logp[mask > 0]
    pull = b_normal - normal[normal <= b_normal]
    push = abnormal[abnormal >= b_abnormal] - b_abnormal
    return _mean_or_zero(-F.logsigmoid(-pull)) + _mean_or_zero(-F.logsigmoid(-push))


def flow_loss(logp: torch.Tensor, logp_a: torch.Tensor, mask: torch.Tensor,
              boundaries: Optional[tuple] = None, bgspp_lambda: float = 1.0) -> torch.Tensor:
    """Flow loss for one mini-batch of positions.

    Without anomalous rows (stage 1, or a stage-2 batch of normals only) it is
    mean(-logsigmoid(logp)).  With anomalous rows and ``boundaries = (b_n, b_a)``:
    -logsigmoid(logp) on normal rows + -logsigmoid(logp_a) on anomalous rows +
    focal loss on softmax([logp, logp_a]) + lambda * BG-SPP.
    """
    mask = mask.reshape(-1)
    abnormal = mask > 0
    if boundaries is None or not abnormal.any():
        return -F.logsigmoid(logp).mean()
    likelihood = _mean_or_zero(-F.logsigmoid(logp[~abnormal])) + _mean_or_zero(-F.logsigmoid(logp_a[abnormal]))
    focal = focal_loss(torch.softmax(torch.stack([logp, logp_a], dim=-1), dim=-1), abnormal)
    return likelihood + focal + bgspp_lambda * bgspp_loss(logp, mask, *boundaries)


class BoundaryAverager:
    """Exponential moving average (momentum 0.9) of the normal boundary, per level, starting at 0."""

    def __init__(self, num_levels: int, momentum: float = 0.9):
        self.momentum = momentum
        self.values: List[float | torch.Tensor] = [0.0] * num_levels

    def update(self, level: int, boundary: Optional[torch.Tensor]) -> None:
        if boundary is not None:
            self.values[level] = self.values[level] * self.momentum + (1.0 - self.momentum) * boundary

    def get(self, level: int) -> float | torch.Tensor:
        return self.values[level]

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "values": [float(v) for v in self.values]}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = state["momentum"]
        self.values = list(state["values"])
