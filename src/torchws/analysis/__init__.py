"""Measurements behind the paper's smoothness argument: loss-landscape probes along the gradient (Santurkar et al.)
and the per-filter gradient-norm identity of a WS layer."""

from .gradients import GradientNormIdentity, gradient_norm_identity, track_standardized_grads
from .smoothness import LandscapeProbe, batch_loss_and_grad, loss_landscape_along_gradient, restored_state

__all__ = [
    "GradientNormIdentity",
    "LandscapeProbe",
    "batch_loss_and_grad",
    "gradient_norm_identity",
    "loss_landscape_along_gradient",
    "restored_state",
    "track_standardized_grads",
]
