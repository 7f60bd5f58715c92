"""Adversarial losses of codec training: hinge GAN and feature matching over the discriminator's resolutions.

`real` and `fake` are the discriminator's outputs: per resolution, (logits, feature maps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_hinge_loss(real: list, fake: list) -> torch.Tensor:
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real, fake))


def generator_hinge_loss(fake: list) -> torch.Tensor:
    return sum(F.relu(1 - f).mean() for f, _ in fake)


def feature_matching_loss(real: list, fake: list) -> torch.Tensor:
    """Mean L1 between real and generated feature maps, averaged over layers, summed over resolutions."""
    total = 0.0
    for (_, real_features), (_, fake_features) in zip(real, fake):
        total = total + sum(F.l1_loss(f, r.detach()) for r, f in zip(real_features, fake_features)) / len(real_features)
    return total
