"""The pieces of the two training objectives that are plain arithmetic: the autoencoder's edge-weighted
reconstruction + KL loss, and the Min-SNR-gamma weights of the UNet's noise-prediction errors."""

import torch
import torch.nn.functional as F


def edges(images: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: the largest colour step to a neighbouring pixel, spread over 3x3 (0 in flat areas, up to 2)."""
    dx = F.pad((images[..., :, 1:] - images[..., :, :-1]).abs(), (0, 1, 0, 0))
    dy = F.pad((images[..., 1:, :] - images[..., :-1, :]).abs(), (0, 0, 0, 1))
    return F.max_pool2d(torch.maximum(dx, dy).amax(dim=1, keepdim=True), 3, stride=1, padding=1)


def autoencoder_loss(
    decoded: torch.Tensor,
    images: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    edge_weight: float,
    kl_weight: float,
) -> torch.Tensor:
    """L1 reconstruction, errors near edges weighted up to 1 + 2 edge_weight (flat areas dominate otherwise) and
    normalised by each image's own weights, so that a sample's loss does not depend on the batch it is in (nor
    on how a batch is split over processes), plus kl_weight * KL(N(mean, exp(logvar)) || N(0, I)) per latent
    element."""
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    weight = 1 + edge_weight * edges(images)
    pixels = (1, 2, 3)
    error = ((decoded.to(images.dtype) - images).abs() * weight).mean(pixels) / weight.mean(pixels)
    return error.mean() + kl_weight * kl


def min_snr_weights(a: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) for noise prediction: min(SNR, gamma) / SNR, SNR = a / (1 - a), of each
    sample's alpha_bar a. Low-noise steps have large, conflicting gradients and decide little of the image; capping
    their weight makes training converge in fewer steps."""
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr
