"""A torch ``Dataset`` over an :class:`~anomalyclip.data.core.AnomalyDataset`."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from anomalyclip.data.core import AnomalyDataset
from anomalyclip.preprocess import image_to_tensor, load_image, load_mask


class AnomalyTorchDataset(Dataset):
    """Items ``(image, mask, label, index)`` at model resolution, as the original trains.

    ``image`` is (3, size, size) normalised for CLIP, ``mask`` (size, size) in {0, 1}:
    all zeros for a normal image and for an anomalous one without a mask (use
    ``dataset.has_pixel_truth(dataset[index])`` to leave those out of pixel metrics).
    ``index`` points back into ``dataset.samples``.
    """

    def __init__(self, dataset: AnomalyDataset, image_size: int) -> None:
        self.dataset = dataset
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        sample = self.dataset.samples[index]
        image = image_to_tensor(load_image(sample.image), self.image_size)
        mask = load_mask(sample.mask if sample.label == 1 else None, self.image_size)
        return image, mask, sample.label, index
