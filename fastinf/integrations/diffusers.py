"""diffusers: the per-example denoising loss with fixed, seeded timesteps and noise (see ``DenoisingLoss``)."""

from ..gradients.losses import DenoisingLoss

__all__ = ["DenoisingLoss"]
