"""AnomalyDINO's numerics, step by step as the authors' code computes them.

Each function is one step of ``run_anomalydino.py`` / ``run_anomalydino_batched.py``
(github.com/dammsi/AnomalyDINO, commit b3435f0), reproduced to float32 rounding; the
docstrings say where the official code's choice matters (and differs from the obvious
one). Nothing here knows about files or the :class:`~anomalyclip.predictor.Predictor`
seam: see :mod:`anomalyclip.methods.anomalydino.model`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import Tensor

from anomalyclip.methods.nearest import centred_forms

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ROTATION_ANGLES",
    "anomaly_map",
    "background_mask",
    "batched_distances",
    "first_component",
    "mean_top1p",
    "morphology_1d",
    "nearest_distances",
    "nearest_distances_bfloat16",
    "preprocess",
    "resized_size",
    "rotate",
    "stretch_grid",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROTATION_ANGLES = tuple(range(0, 360, 45))
MASK_THRESHOLD = 10.0  # on the first principal component, tuned for the real ViT-S/14
CENTRE_KEPT = 0.35  # at most this share of the centre window kept: the mask is flipped
SIGMA = 4.0
# Similarities held at once by the blocked nearest-patch search (float32: 64 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """An (H, W, 3) uint8 image rotated ``angle`` degrees counter-clockwise about (W/2, H/2).

    OpenCV itself, as the authors: its uint8 bilinear warp quantises to 1/32 px and
    rounds, which a float rotation does not reproduce. The size is kept and the corners
    filled by reflection (BORDER_REFLECT_101). The centre is (W/2, H/2), not
    ((W-1)/2, (H-1)/2): the 90-degree image is ``np.rot90`` moved by one row.
    """
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), float(angle), 1.0)
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(shorter)``: the shorter side becomes
    ``shorter``, the longer ``int(shorter * long / short)`` (floor)."""
    width, height = size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def preprocess(image: np.ndarray, shorter: int, patch: int = 14) -> Tensor:
    """(3, H', W') float32 from an (H, W, 3) uint8 RGB image, as the authors' transform.

    Shorter side to ``shorter`` with PIL's bicubic (what torchvision's antialiased
    ``Resize`` does to a PIL image), /255, ImageNet normalisation, then a crop at the
    **top-left** to multiples of the patch: the bottom and right remainders are dropped.
    """
    pil = Image.fromarray(np.ascontiguousarray(image))
    resized = pil.resize(resized_size(pil.size, shorter), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tensor = (array - mean) / std
    height, width = tensor.shape[1:]
    return tensor[:, : height - height % patch, : width - width % patch].contiguous()


def first_component(features: np.ndarray) -> np.ndarray:
    """(n,) float32 first principal-component scores of an image's (n, D) features.

    The centred features times the unit first component, exact SVD (scikit-learn's
    randomized solver agrees to 2e-4, far from the threshold's margins). Sign: the
    component's entry of largest magnitude is positive, scikit-learn >= 1.5's rule (1.4
    made the largest |score| positive instead; the masks differ).
    """
    data = np.asarray(features, dtype=np.float64)
    centred = data - data.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    component = vt[0]
    if component[np.argmax(np.abs(component))] < 0:
        component = -component
    return (centred @ component).astype(np.float32)


def morphology_1d(mask: np.ndarray) -> np.ndarray:
    """``cv2.dilate`` then ``MORPH_CLOSE`` (3 x 3) applied, as the authors apply them, to
    the (n, 1) column of flattened patches, not the grid: a 1-D operation along the
    row-major index (a row's last patch touches the next row's first), the array's ends
    adding nothing. That is erode(dilate(dilate(raw))) in 1-D."""

    def shifted(values: np.ndarray, fill: bool) -> tuple[np.ndarray, np.ndarray]:
        before = np.concatenate(([fill], values[:-1]))
        after = np.concatenate((values[1:], [fill]))
        return before, after

    result = np.asarray(mask, dtype=bool).ravel()
    for _ in range(2):
        before, after = shifted(result, False)
        result = before | result | after
    before, after = shifted(result, True)
    return before & result & after


def background_mask(
    features: np.ndarray, grid: tuple[int, int], threshold: float = MASK_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """(mask (n,) bool, PC1 (n,) float32): the patches AnomalyDINO searches.

    ``PC1 > threshold``; if at most 35 % of the centre window (rows ``int(0.2 gh) :
    int(0.8 gh)``, columns likewise) is kept, ``-PC1 > threshold`` instead; then the 1-D
    morphology (:func:`morphology_1d`).
    """
    pc1 = first_component(features)
    rows, columns = grid
    mask = pc1 > threshold
    window = mask.reshape(rows, columns)[
        int(rows * 0.2) : int(rows * 0.8), int(columns * 0.2) : int(columns * 0.8)
    ]
    if window.sum() <= window.size * CENTRE_KEPT:
        mask = -pc1 > threshold
    return morphology_1d(mask), pc1


def _chunks(total: int, step: int) -> Iterator[tuple[int, int]]:
    for low in range(0, total, step):
        yield low, min(low + step, total)


def nearest_distances(
    queries: Tensor,
    bank: Tensor,
    neighbours: int = 1,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """(n,) float64 mean of the ``neighbours`` smallest cosine distances of each unit
    query to the unit bank rows, and (n,) int64 bank row of the nearest.

    faiss' squared L2 between unit vectors, halved, is 1 - cos: the largest products are
    the nearest patches. Computed as blocked matrix products, a block of queries against
    a chunk of the bank at a time, keeping a running top-k, so that memory stays bounded
    by ``block_elements`` similarities whatever the bank (131k patches for 16 shots x 8
    rotations at 448 px).
    """
    count, rank = len(queries), len(bank)
    if not 1 <= neighbours <= rank:
        raise ValueError(f"neighbours must lie in 1..{rank} (the bank's size), got {neighbours}")
    bank_rows = max(neighbours, min(rank, block_elements // max(1, min(count, 1024))))
    query_rows = max(1, min(count, block_elements // bank_rows))
    distances = torch.empty(count, dtype=torch.float64)
    nearest = torch.empty(count, dtype=torch.long)
    bank = bank.float()
    for low, high in _chunks(count, query_rows):
        block = queries[low:high].float()
        best = torch.full((high - low, neighbours), -math.inf)
        where = torch.zeros((high - low, neighbours), dtype=torch.long)
        for start, stop in _chunks(rank, bank_rows):
            products = block @ bank[start:stop].T
            top = products.topk(min(neighbours, stop - start), dim=1)
            merged = torch.cat((best, top.values), dim=1)
            indices = torch.cat((where, top.indices + start), dim=1)
            best, order = merged.topk(neighbours, dim=1)
            where = indices.gather(1, order)
        distances[low:high] = (1.0 - best.double()).mean(dim=1)
        nearest[low:high] = where[:, 0]
    return distances, nearest


def bank_form(bank: Tensor) -> Tensor:
    """The bank's bfloat16 reference form for :func:`nearest_distances_bfloat16`
    (centred by its own mean; computed once per bank)."""
    return centred_forms(bank.float().mean(dim=0), bank)[1]


def nearest_distances_bfloat16(
    queries: Tensor,
    bank: Tensor,
    form: Tensor,
    neighbours: int = 1,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """:func:`nearest_distances` with the neighbours chosen from bfloat16 products
    (oneDNN: AVX-512 BF16, AMX) and their distances computed in float32.

    ``form`` is :func:`bank_form` of ``bank``. The products are d^2/2 = 1 - cos
    themselves (:func:`anomalyclip.methods.nearest.centred_forms`), so their bfloat16
    output rounds relative to the distance, and the ``neighbours`` smallest are taken
    from their int16 bit patterns (same order, 3 to 7x faster reductions). Only the
    choice is low precision: each chosen row's ``1 - q.b`` is float32, so a distance can
    only grow, and only where rounding picks a near-tie.
    """
    count, rank = len(queries), len(bank)
    if not 1 <= neighbours <= rank:
        raise ValueError(f"neighbours must lie in 1..{rank} (the bank's size), got {neighbours}")
    bank_rows = max(neighbours, min(rank, block_elements // max(1, min(count, 1024))))
    query_rows = max(1, min(count, block_elements // bank_rows))
    queries = queries.float()
    query_form = centred_forms(bank.float().mean(dim=0), queries)[0]
    distances = torch.empty(count, dtype=torch.float64)
    nearest = torch.empty(count, dtype=torch.long)
    for low, high in _chunks(count, query_rows):
        best = torch.full((high - low, neighbours), torch.iinfo(torch.int16).max, dtype=torch.int16)
        where = torch.zeros((high - low, neighbours), dtype=torch.long)
        for start, stop in _chunks(rank, bank_rows):
            keys = (query_form[low:high] @ form[start:stop].T).view(torch.int16)
            if neighbours == 1:
                values, indices = keys.min(dim=1, keepdim=True)
            else:
                values, indices = keys.topk(min(neighbours, stop - start), dim=1, largest=False)
            merged = torch.cat((best, values), dim=1)
            rows = torch.cat((where, indices + start), dim=1)
            best, order = merged.topk(neighbours, dim=1, largest=False)
            where = rows.gather(1, order)
        exact = 1.0 - torch.einsum("nc,nkc->nk", queries[low:high], bank[where].float())
        distances[low:high] = exact.double().mean(dim=1)
        nearest[low:high] = where.gather(1, exact.argmin(dim=1, keepdim=True))[:, 0]
    return distances, nearest


def mean_top1p(values: np.ndarray) -> float:
    """The image score: the mean of the ``int(0.01 n)`` largest of all n patch values
    (masked zeros included), or the maximum when that is 0 (n < 100)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    count = int(0.01 * flat.size)
    if count == 0:
        return float(flat.max())
    return float(np.sort(flat)[-count:].mean())


def stretch_grid(distances: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float64: the (gh, gw) grid through ``cv2.resize(INTER_LINEAR)`` to the
    (width, height) ``size`` (half-pixel centres, no antialias). The grid covers only the
    top-left of the resized image (the crop) yet is stretched over the whole original:
    the authors' rule, kept."""
    grid = np.ascontiguousarray(distances, dtype=np.float64)
    return cv2.resize(grid, size, interpolation=cv2.INTER_LINEAR)


def anomaly_map(distances: np.ndarray, size: tuple[int, int], sigma: float = SIGMA) -> np.ndarray:
    """(H, W) float32 map at the original (width, height) ``size``: :func:`stretch_grid`,
    then a Gaussian (``scipy.ndimage``, truncate 4, mode "reflect")."""
    return gaussian_filter(stretch_grid(distances, size), sigma=sigma).astype(np.float32)


def batched_distances(
    features: list[Tensor], index: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS
) -> Tensor:
    """(n,) float32 zero-shot patch scores of image ``index`` against all other images.

    Cosine distances (float32, unit vectors, 1 - product) to the M patches of the other
    images, none masked; k = ``int(0.001 M)``; the score is the mean of the distances
    strictly below the k-th smallest (k - 1 values, fewer on ties), as the official code.
    Where it has no answer this one decides: k is at least 1, and when no distance lies
    below the k-th smallest (k = 1, or ties; the official code gives 0/0 = NaN, and
    fails for M < 1000) the score is the k-th smallest itself. The k smallest are kept
    as a running top-k over blocks (memory bounded by ``block_elements``).
    """
    if len(features) < 2:
        raise ValueError(
            f"batched zero-shot AnomalyDINO scores images against each other; a set of "
            f"{len(features)} image(s) has nothing to be compared with (give at least 2)"
        )
    queries = F.normalize(features[index].float(), dim=-1)
    others = [F.normalize(f.float(), dim=-1) for i, f in enumerate(features) if i != index]
    total = sum(len(f) for f in others)
    keep = max(1, int(0.001 * total))
    smallest = torch.full((len(queries), keep), math.inf)
    for other in others:
        rows = max(keep, min(len(other), block_elements // max(1, len(queries))))
        for start, stop in _chunks(len(other), rows):
            distances = 1 - queries @ other[start:stop].T
            merged = torch.cat((smallest, distances), dim=1)
            smallest = merged.topk(keep, dim=1, largest=False).values
    kth = smallest.max(dim=1, keepdim=True).values
    below = smallest < kth
    counts = below.sum(dim=1)
    sums = torch.where(below, smallest, torch.zeros_like(smallest)).sum(dim=1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), kth[:, 0])
