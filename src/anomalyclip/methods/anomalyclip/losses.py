"""AnomalyCLIP's glocal objective: image cross-entropy plus focal and dice on every layer.

Exactly the original's ``FocalLoss`` (gamma 2, no class weights, smooth 1e-5) and
``BinaryDiceLoss`` (smooth 1), with the local term weighted by lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from anomalyclip.methods.anomalyclip.model import AnomalyCLIP, ImageEmbeddings

FOCAL_SMOOTH = 1e-5


def focal_loss(probabilities: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean focal loss over all pixels of (B, C, H, W) probabilities and (B, H, W) labels."""
    classes = probabilities.shape[1]
    flat = probabilities.permute(0, 2, 3, 1).reshape(-1, classes)
    one_hot = F.one_hot(target.reshape(-1).long(), classes).to(flat.dtype)
    one_hot = one_hot.clamp(FOCAL_SMOOTH / (classes - 1), 1.0 - FOCAL_SMOOTH)
    pt = (one_hot * flat).sum(dim=1) + FOCAL_SMOOTH
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """1 - soft dice per image (smooth 1), averaged over the batch."""
    batch = target.shape[0]
    prediction = prediction.reshape(batch, -1)
    target = target.reshape(batch, -1)
    dice = (2 * (prediction * target).sum(1) + 1) / (prediction.sum(1) + target.sum(1) + 1)
    return 1 - dice.sum() / batch


@dataclass
class GlocalLoss:
    image: Tensor  # cross-entropy of the global embedding
    local: Tensor  # lambda * sum over layers of focal + both dice terms (0 without masks)

    @property
    def total(self) -> Tensor:
        return self.image + self.local


def local_loss(layer_probabilities: dict[int, Tensor], masks: Tensor) -> Tensor:
    """Sum over layers of focal + dice(abnormal, mask) + dice(normal, 1 - mask)."""
    total = masks.new_zeros(())
    for probabilities in layer_probabilities.values():
        total = total + focal_loss(probabilities, masks)
        total = total + dice_loss(probabilities[:, 1], masks)
        total = total + dice_loss(probabilities[:, 0], 1 - masks)
    return total


def glocal_loss(
    model: AnomalyCLIP,
    embeddings: ImageEmbeddings,
    labels: Tensor,
    masks: Tensor | None,
    lam: float = 4.0,
    text: Tensor | None = None,
) -> GlocalLoss:
    """One step's loss from (possibly cached) image embeddings.

    ``masks`` (B, S, S) in {0, 1}; None means an image-level dataset: global loss only.
    The text features are recomputed with gradients unless given.
    """
    text = model.compute_text_features() if text is None else text
    image = F.cross_entropy(model.image_logits(embeddings, text), labels.long())
    if masks is None or lam == 0:
        return GlocalLoss(image, image.new_zeros(()))
    size = (masks.shape[-2], masks.shape[-1])
    probabilities = model.layer_probabilities(embeddings, text, size)
    return GlocalLoss(image, lam * local_loss(probabilities, masks.to(image.dtype)))
