"""A torch ``Dataset`` over an :class:`~anomalyclip.data.core.AnomalyDataset`."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from anomalyclip.data.core import AnomalyDataset
from anomalyclip.preprocess import PreProcessor


class AnomalyTorchDataset(Dataset):
    """Items ``(image, mask, label, index)`` at model resolution, as the original trains.

    ``image`` is (3, size, size) normalised for CLIP, ``mask`` (size, size) in {0, 1}:
    all zeros for a normal image and for an anomalous one without a mask (use
    ``dataset.has_pixel_truth(dataset[index])`` to leave those out of pixel metrics).
    ``index`` points back into ``dataset.samples``. ``preprocessor`` is the model's
    (``model.preprocessor``); a bare size means AnomalyCLIP's whole-image resize.
    """

    def __init__(self, dataset: AnomalyDataset, preprocessor: PreProcessor | int) -> None:
        self.dataset = dataset
        self.preprocessor = (
            preprocessor if isinstance(preprocessor, PreProcessor) else PreProcessor(preprocessor)
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        sample = self.dataset.samples[index]
        image = self.preprocessor.load(sample.image)
        mask = self.preprocessor.load_mask(sample.mask if sample.label == 1 else None)
        return image, mask, sample.label, index
