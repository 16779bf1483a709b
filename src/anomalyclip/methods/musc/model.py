"""MuSc: zero-shot anomaly scoring by mutual scoring of the unlabeled images of a set.

Li, Huang, Xue, Zhou, "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation
with Mutual Scoring of the Unlabeled Images", ICLR 2024 (official code
github.com/xrli-U/MuSc, MIT). No prompts and no training: a normal patch finds close
matches in the other images of the set and an anomalous one does not, so the images of
one call score each other. The steps, as the official code computes them:

1. Preprocessing: open_clip's evaluation transform (shorter side to S, centre crop).
2. Backbone: the plain CLIP visual tower (positional table resized bicubically); patch
   features are the raw residual stream after each feature layer, class token dropped.
3. LNAMD (:func:`lnamd`): per layer and aggregation degree r, layer-normalise the
   (C, g, g) feature map as a whole, average every r x r neighbourhood (zero padding,
   divided by r^2 also at the borders), L2-normalise every patch vector.
4. MSM (:func:`mutual_scores`): a patch's distance to another image is the Euclidean
   distance to its nearest patch there; its score is the mean of the smallest
   ``interval`` fraction of those distances over the other images.
5. Patch scores: mean over layers, then over degrees; bilinear upsampling
   (align_corners True) to S x S gives the map; its maximum the raw image score.
6. RsCIN (:func:`rscin`): the raw scores, min-max normalised over the set, are smoothed
   over each image's nearest neighbours by CLIP image embedding.

Where the official code has no answer, this one decides (see :func:`neighbour_count`
and :func:`rscin`): a set needs at least two images; with fewer than five, each patch
is scored by its single nearest image instead of by the mean of nothing (the official
``int((N - 1) * 0.3)`` is 0 there).

Scores are relative to the set: the same image scores differently in another set, and
RsCIN's min-max step puts the set's least anomalous image near 0 and its most anomalous
near 1. Thresholds are therefore only meaningful for sets like the one they were set on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from anomalyclip import distributed
from anomalyclip.backbone.clip import CLIP
from anomalyclip.backbone.identity import BackboneIdentity
from anomalyclip.input_settings import ResizeMode
from anomalyclip.inputs import expand_sources
from anomalyclip.methods.nearest import centred_forms, nearest_columns
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import AnomalyPrediction, ErrorPolicy, Predictor, SkippedImage
from anomalyclip.preprocess import ImageSource, PreProcessor
from anomalyclip.utils.cancellation import checkpoint
from anomalyclip.utils.precision import PrecisionChoice

__all__ = [
    "MAP_RANGE",
    "MuSc",
    "MuScConfig",
    "MuScOutput",
    "PreprocessedSet",
    "apply_precision",
    "divide_indices",
    "lnamd",
    "mutual_scores",
    "neighbour_count",
    "rscin",
]

logger = logging.getLogger(__name__)

# A map value is a mean of Euclidean distances between unit vectors, so it lies in [0, 2]
# (bilinear upsampling only averages). The bound, not the range one call happens to
# produce, so that one colour means one value on every image of every set. Real maps use
# a small part of it (CLIP ViT-L/14: roughly 0.1 to 0.8).
MAP_RANGE = (0.0, 2.0)
# Elements of the largest similarity block MSM holds at once (float32: 4 MiB). Small
# enough that the maxima are taken while the block is still in the CPU's cache: on 2 EPYC
# cores 1.4x faster than 64 MiB blocks (32 images of 37 x 37 x 128: 3.3 s against 4.8 s),
# with identical results.
DEFAULT_BLOCK_ELEMENTS = 1 << 20
# Bytes of nearest-patch distances MSM may keep for the whole set, to multiply each pair
# of images once (N (N - 1) L float32: 1 GiB is 440 images of 37 x 37 patches).
DEFAULT_DISTANCE_BUDGET = 1 << 30
# Nearest-patch candidates kept from a float16/bfloat16 product, their float32 distances
# compared (float32 keeps 1: its largest product is the nearest patch).
LOW_PRECISION_CANDIDATES = 4
# dtypes the similarity products may run in (MuScConfig.similarity_dtype).
SIMILARITY_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# how much of each image MuSc scores (MuScConfig.coverage)
COVERAGES = ("auto", "center-crop", "whole")
# a centre crop that loses at most this share of an image's area counts as losing nothing
CROP_LOSS_TOLERANCE = 0.01


@dataclass
class MuScConfig:
    """MuSc's settings; the defaults are the official ``configs/musc.yaml`` (MVTec AD).

    backbone: a registered CLIP name or a weights file (what ``--clip-weights`` takes).
    features: 1-based visual layers (the official config's 0-based 5, 11, 17, 23).
    degrees: LNAMD aggregation degrees r, odd (an r x r neighbourhood centred on a patch).
    rscin_k: RsCIN's neighbour counts (the official code uses 1, 8, 9 on VisA); empty
    disables RsCIN, leaving the raw image scores (the official code's ``0`` in the list).
    interval: the upper end of MSM's interval average (the official ``topmin_max``; its
    lower end ``topmin_min`` is 0): the fraction of the other images whose distances
    are averaged.
    divide_num: the set is split into this many random disjoint subsets (seeded by
    ``seed``), each scored on its own, as the official ``divide_num``; RsCIN still runs
    over the whole set. Only one subset's features are held at a time, so it also bounds
    memory: 1 / divide_num of the set's features.
    batch_size: images per backbone forward pass; block_elements: the largest similarity
    block MSM holds. Both bound memory only; they do not change the results.
    similarity_dtype: the dtype of MSM's similarity products ("float32", "float16",
    "bfloat16"). The low-precision ones run at several times the float32 rate on GPUs
    (tensor cores) and, bfloat16, on CPUs with AVX-512 BF16 or AMX (oneDNN); they only
    choose each patch's nearest patch, whose distance is still computed in float32, so
    a score moves only where rounding picks a near-tie (see :func:`mutual_scores` and
    the README for the measured deviation).
    image_threshold / pixel_threshold: verdict thresholds (see the module's note on
    scores being relative to the set), or None.
    coverage: "center-crop" (the paper's: the centre square of each image, the rest not
    scored), "whole" (the whole image resized to S x S), or "auto" (default): the
    paper's crop where it loses nothing (square images), else the whole image, said in
    the log. A 2.46:1 part loses 59 % of its area to the crop, defects included.
    """

    backbone: str = "ViT-L/14@336px"
    image_size: int = 518
    features: tuple[int, ...] = (6, 12, 18, 24)
    degrees: tuple[int, ...] = (1, 3, 5)
    rscin_k: tuple[int, ...] = (1, 2, 3)
    interval: float = 0.3
    divide_num: int = 1
    seed: int = 0
    batch_size: int = 8
    block_elements: int = DEFAULT_BLOCK_ELEMENTS
    similarity_dtype: str = "float32"
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    coverage: str = "auto"

    def __post_init__(self) -> None:
        self.features = tuple(int(v) for v in self.features)
        self.degrees = tuple(int(v) for v in self.degrees)
        self.rscin_k = tuple(int(v) for v in self.rscin_k)
        self.interval = float(self.interval)
        problems = []
        if self.image_size <= 0:
            problems.append(f"image_size must be positive, got {self.image_size}")
        if not self.features or min(self.features) < 1:
            problems.append(f"features must be 1-based layer numbers, got {self.features}")
        if not self.degrees or any(r < 1 or r % 2 == 0 for r in self.degrees):
            problems.append(f"degrees must be odd numbers >= 1, got {self.degrees}")
        if any(k < 1 for k in self.rscin_k):
            problems.append(
                f"rscin_k must be counts >= 1 (empty disables RsCIN), got {self.rscin_k}"
            )
        if self.similarity_dtype not in SIMILARITY_DTYPES:
            problems.append(
                f"similarity_dtype must be one of {', '.join(SIMILARITY_DTYPES)}, "
                f"got {self.similarity_dtype!r}"
            )
        if not 0.0 < self.interval <= 1.0:
            problems.append(f"interval must lie in (0, 1], got {self.interval}")
        if self.coverage not in COVERAGES:
            problems.append(
                f"coverage must be one of {', '.join(COVERAGES)}, got {self.coverage!r}"
            )
        for name in ("divide_num", "batch_size", "block_elements"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid MuSc configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("features", "degrees", "rscin_k"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MuScConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown MuSc configuration keys: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class MuScOutput:
    """Everything one :meth:`MuSc.run` computed, as CPU numpy arrays, in input order.

    ``msm``: (degree, layer) -> (N, L) float64 MSM patch scores. ``patch_tokens``
    (layer -> (N, 1 + L, C) raw tokens) and ``lnamd`` ((degree, layer) -> (N, L, C))
    are filled only when asked for (``keep_features``): they are the bulk of the memory.
    """

    grid: int
    subsets: list[np.ndarray]
    class_tokens: np.ndarray  # (N, E) float32, L2-normalised CLIP image embeddings
    msm: dict[tuple[int, int], np.ndarray]
    patch_scores: np.ndarray  # (N, L) float64
    anomaly_maps: np.ndarray  # (N, S, S) float32
    image_scores_raw: np.ndarray  # (N,) float64, the maps' maxima
    image_scores: np.ndarray  # (N,) float32, after RsCIN
    patch_tokens: dict[int, np.ndarray] = field(default_factory=dict)
    lnamd: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


def lnamd(tokens: Tensor, degree: int) -> Tensor:
    """(B, L, C) float32 unit vectors from raw tokens (B, 1 + L, C) with a square grid.

    The class token is dropped; each image's (C, g, g) map is layer-normalised as one
    tensor (mean and biased variance of all of it, eps 1e-5, no affine), then every
    r x r neighbourhood averaged with zero padding, dividing by r^2 at the borders too
    (the official unfold + adaptive average pool from C r^2 to C values), then each
    patch vector L2-normalised.
    """
    if degree < 1 or degree % 2 == 0:
        raise ValueError(f"the aggregation degree must be odd and >= 1, got {degree}")
    batch, count, channels = tokens.shape
    side = math.isqrt(count - 1)
    if side * side != count - 1:
        raise ValueError(f"{count} tokens are not a class token plus a square grid")
    x = tokens[:, 1:].float().reshape(batch, side, side, channels).permute(0, 3, 1, 2)
    x = F.layer_norm(x, x.shape[1:], eps=1e-5)
    if degree > 1:
        x = F.avg_pool2d(x, degree, stride=1, padding=degree // 2, count_include_pad=True)
    return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)


def neighbour_count(images: int, interval: float = 0.3) -> int:
    """How many of the other images MSM averages over: ``int((N - 1) * interval)``, at least 1.

    The official code takes ``int((N - 1) * interval)`` alone, which is 0 for N < 5 with
    0.3 (a mean of nothing, NaN); here such sets use the nearest image. A set of one
    image has nothing to be compared with and is refused.
    """
    if images < 2:
        raise ValueError(
            f"MuSc scores the images of a set against each other; a set of {images} "
            "image(s) has nothing to be compared with (give at least 2)"
        )
    return max(1, int((images - 1) * interval))


def _ranges(start: int, stop: int, step: int) -> Iterator[tuple[int, int]]:
    for low in range(start, stop, step):
        yield low, min(low + step, stop)


def mutual_scores(
    vectors: Tensor,
    interval: float = 0.3,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    distance_budget: int = DEFAULT_DISTANCE_BUDGET,
    *,
    similarity_dtype: torch.dtype = torch.float32,
    shard: bool = False,
    advance: Callable[[float], object] | None = None,
) -> Tensor:
    """MSM: (N, L) float64 scores of every patch of every image against the others.

    ``vectors`` (N, L, C) are L2-normalised (LNAMD's output). For image i, patch p and
    every other image j, d_j(p) = min over patches q of j of ||v_ip - v_jq||; the score
    is the mean of the smallest ``neighbour_count(N, interval)`` of the N - 1 values.

    For unit vectors ||a - b||^2 = 2 - 2 a.b, so the nearest patch is the largest dot
    product: matrix products find it. The distance to it is then computed directly,
    ||a - b|| on the one pair, not as sqrt(max(0, 2 - 2 a.b)): near a match the dot
    product is close to 1, and the square root magnifies its float32 rounding to some
    1e-4, while the direct difference stays at 1e-7 (the official cdist: 2e-5).

    One product of image i against image j answers both ways: its row maxima give i's
    patches against j, its column maxima j's against i. So when every image's (N - 1, L)
    distances fit in ``distance_budget`` bytes, each pair is multiplied once (half the
    arithmetic); above that, image by image (each pair twice), so that memory stays
    bounded whatever N. Blocks hold at most ``block_elements`` similarities (at least
    one query patch against one image).

    ``similarity_dtype`` float16 or bfloat16 runs the products at the GPU's
    low-precision rate; they only pick the nearest patch, whose distance is computed in
    float32 as above, so a distance can only grow, and only where rounding prefers a
    near-tie (a patch almost as close). bfloat16 on a CPU (whose products round their
    output to bfloat16) multiplies centred, augmented vectors whose product is d^2/2
    itself (:func:`anomalyclip.methods.nearest.centred_forms`), so the rounding is
    relative to the distance, and takes one candidate (:func:`_score_pairs_centred`).

    ``shard`` (under ``torchrun``, every rank calling with the same vectors): the loop
    over images is shared, step ``i`` on rank ``i mod world``, and the distances (or
    scores) summed across ranks, each value coming from exactly one rank, so every
    rank returns the one-process result to the last bit. ``advance(n)`` is called as
    the loop passes images (``N`` in all per call), ``n`` in proportion to the pairs
    compared (image ``i`` of the symmetric loop compares N - 1 - i pairs, not one
    image's worth): a progress bar's hook, whose time estimate then holds.
    """
    if vectors.dim() != 3:
        raise ValueError(f"vectors must be (N, L, C), got shape {tuple(vectors.shape)}")
    count, patches, _ = vectors.shape
    keep = neighbour_count(count, interval)
    vectors = vectors.float().contiguous()
    score_pairs: Callable[..., None] = _score_pairs
    if similarity_dtype == torch.bfloat16 and vectors.device.type == "cpu":
        # oneDNN/AMX bfloat16 products of centred, augmented vectors (centred_forms)
        score_pairs = functools.partial(
            _score_pairs_centred, centred_forms(vectors.mean(dim=(0, 1)), vectors)
        )
        similarity_dtype = torch.float32  # one candidate, taken from d^2/2 itself
    pair = (vectors, _rounded(vectors, similarity_dtype))
    candidates = 1 if similarity_dtype == torch.float32 else LOW_PRECISION_CANDIDATES
    world = distributed.world_size() if shard else 1
    rank = distributed.rank() if shard else 0
    step = advance or (lambda _: None)
    device = vectors.device
    symmetric = count * (count - 1) * patches * 4 <= distance_budget
    if symmetric:
        # distances[i, slot] with slot j for j < i and j - 1 for j > i; zeros where
        # another rank writes, so that the sum across ranks is exact
        make = torch.zeros if world > 1 else torch.empty
        distances = make(count, count - 1, patches, device=device)
        for index in range(count - 1):
            if distributed.owner(index, world) == rank:
                score_pairs(pair, index, index + 1, count, distances, block_elements, candidates)
            step(2 * (count - 1 - index) / (count - 1))  # its share of the pairs
        if world > 1:
            distributed.sum_tensor_across_ranks(distances)
        scores = torch.empty(count, patches, dtype=torch.float64, device=device)
        for index in range(count):
            scores[index] = _mean_of_smallest(distances[index], keep)
        return scores
    scores = torch.zeros(count, patches, dtype=torch.float64, device=device)
    row = torch.empty(count - 1, patches, device=device)
    for index in range(count):
        if distributed.owner(index, world) == rank:
            row_of = (row[None], block_elements, candidates, False)
            score_pairs(pair, index, 0, index, *row_of)
            score_pairs(pair, index, index + 1, count, *row_of, offset=index)
            scores[index] = _mean_of_smallest(row, keep)
        step(1)
    if world > 1:
        distributed.sum_tensor_across_ranks(scores)
    return scores


def _rounded(vectors: Tensor, dtype: torch.dtype) -> Tensor:
    """The vectors as the low-precision product sees them: rounded to ``dtype``; kept in
    it on CUDA, whose products take it at tensor-core rate with float32 accumulation and
    output (:func:`_dots`), and held in float32 elsewhere (float16 on a CPU: float32
    products of the rounded values, the same arithmetic). bfloat16 on a CPU does not
    come here: plain bfloat16 products of unit vectors round their output near 1 to 8
    bits, which on the official eight images moved maps by 0.027 (issue 23); the
    centred form (:func:`_score_pairs_centred`) rounds relative to the distance."""
    if dtype == torch.float32:
        return vectors
    rounded = vectors.to(dtype)
    return rounded if vectors.device.type == "cuda" else rounded.float()


def _dots(queries: Tensor, references: Tensor) -> Tensor:
    """``queries @ references.T``: float32 from float32 or (CUDA) low-precision inputs;
    bfloat16 from bfloat16 inputs on a CPU (no float32 output there in torch 2.13)."""
    if queries.dtype == torch.float32 or queries.device.type != "cuda":
        return queries @ references.T
    try:
        return torch.mm(queries, references.T, out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # a torch without it: correct, at float32 speed
        return queries.float() @ references.float().T


def _dots_dtype(products: Tensor) -> torch.dtype:
    """The dtype :func:`_dots` returns for these product inputs."""
    return products.dtype if products.device.type != "cuda" else torch.float32


def _mean_of_smallest(distances: Tensor, keep: int) -> Tensor:
    nearest = distances.topk(keep, dim=0, largest=False, sorted=False).values
    return nearest.double().mean(dim=0)


def _score_pairs(
    pair: tuple[Tensor, Tensor],
    index: int,
    first: int,
    stop: int,
    distances: Tensor,
    block_elements: int,
    candidates: int = 1,
    both: bool = True,
    offset: int = 0,
) -> None:
    """Nearest-patch distances between image ``index`` and images ``first..stop-1``.

    Writes ``distances[0 if not both else index, offset + (j - first) ...]``: with
    ``both`` (symmetric mode, ``first > index``) the full (N, N - 1, L) table gets
    index's row (slots j - 1) and each j's row (slot ``index``); otherwise the (1, N - 1,
    L) row of ``index`` gets slots ``offset + j - first``. ``pair``: the float32 unit
    vectors, for the distances, and the same in the products' dtype, for the nearest
    patches. With ``candidates`` > 1 (low-precision products) the largest products are
    kept and the one nearest in float32 taken: rounded inputs can reorder patches that
    are almost as near.
    """
    if stop <= first:
        return
    vectors, products = pair
    patches, channels = vectors.shape[1:]
    candidates = min(candidates, patches)
    query_rows = max(1, min(patches, block_elements // patches))
    images_per_block = max(1, block_elements // (query_rows * patches * candidates))
    own = distances[index] if both else distances[0]
    device = vectors.device
    for low_image, high_image in _ranges(first, stop, images_per_block):
        width = high_image - low_image
        references = vectors[low_image:high_image].reshape(-1, channels)
        reference_products = products[low_image:high_image].reshape(-1, channels)
        # running column maxima over the query row blocks: j's patches against index
        column_best = torch.full(
            (candidates, width, patches), -math.inf, dtype=_dots_dtype(products), device=device
        )
        column_at = torch.zeros((candidates, width, patches), dtype=torch.long, device=device)
        for low, high in _ranges(0, patches, query_rows):
            queries = vectors[index, low:high]
            dots = _dots(products[index, low:high], reference_products)
            dots = dots.view(high - low, width, patches)
            # (rows, width, candidates): the nearest patches of each j
            if candidates == 1:
                best = dots.max(dim=2, keepdim=True).indices
            else:
                best = dots.topk(candidates, dim=2).indices
            flat = best + torch.arange(width, device=device)[:, None] * patches
            gaps = (references[flat] - queries[:, None, None]).norm(dim=3).amin(dim=2)
            slots = slice(offset + low_image - first, offset + high_image - first)
            if both:
                slots = slice(low_image - 1, high_image - 1)
            own[slots, low:high] = gaps.T
            if not both:
                continue
            if candidates == 1:
                values, where = dots.max(dim=0, keepdim=True)  # over these query rows
                better = values > column_best
                column_best = torch.where(better, values, column_best)
                column_at = torch.where(better, where + low, column_at)
            else:
                kept = min(candidates, high - low)
                values, where = dots.topk(kept, dim=0)
                merged = torch.cat((column_best, values))
                top = merged.topk(candidates, dim=0)
                column_best = top.values
                column_at = torch.cat((column_at, where + low)).gather(0, top.indices)
        if both:
            nearest = vectors[index][column_at]  # (candidates, width, patches, C)
            gaps = (nearest - vectors[low_image:high_image]).norm(dim=3).amin(dim=0)
            distances[low_image:high_image, index] = gaps


def _score_pairs_centred(
    forms: tuple[Tensor, Tensor],
    pair: tuple[Tensor, Tensor],
    index: int,
    first: int,
    stop: int,
    distances: Tensor,
    block_elements: int,
    candidates: int = 1,
    both: bool = True,
    offset: int = 0,
) -> None:
    """:func:`_score_pairs` with the nearest patches from bfloat16 products of
    :func:`centred_forms` (``forms``), one candidate each, its distance in float32.

    Both directions are row minima of a product: image ``index``'s patches against each
    j from query(index) . reference(j)^T, j's against index from query(j) .
    reference(index)^T (the form is symmetric: both are d^2/2), since a column minimum
    of a bfloat16 block costs as much as a second bfloat16 product (profiled on AMX).
    ``candidates`` is ignored (one).
    """
    del candidates
    if stop <= first:
        return
    vectors = pair[0]
    query, reference = forms
    patches, channels = vectors.shape[1:]
    images_per_block = max(1, block_elements // (patches * patches))
    own = distances[index] if both else distances[0]
    mine = vectors[index]
    for low_image, high_image in _ranges(first, stop, images_per_block):
        width = high_image - low_image
        others = vectors[low_image:high_image]
        products = query[index] @ reference[low_image:high_image].reshape(-1, query.shape[-1]).T
        at = nearest_columns(products.view(patches, width, patches))  # (patches, width)
        gaps = (others[torch.arange(width)[None], at] - mine[:, None]).norm(dim=2)
        if both:
            own[low_image - 1 : high_image - 1] = gaps.T
            back = query[low_image:high_image].reshape(-1, query.shape[-1]) @ reference[index].T
            nearest = mine[nearest_columns(back)].view(width, patches, channels)
            distances[low_image:high_image, index] = (nearest - others).norm(dim=2)
        else:
            start = offset + low_image - first
            own[start : start + width] = gaps.T


def rscin(scores: np.ndarray, embeddings: np.ndarray, k_list: Sequence[int]) -> np.ndarray:
    """RsCIN: (N,) float32 image scores smoothed over each image's nearest neighbours.

    The scores are min-max normalised over the set to s; W = E E^T from the L2-normalised
    embeddings E (N, D); for each k, every row of W keeps its k largest entries (the
    image itself among them), the rest set to 0, rows are normalised to sum 1 and W_k s
    is taken; the result is the mean over ``k_list``. Decisions the official code leaves
    open: an empty ``k_list`` returns the raw scores unchanged (its ``0`` in the list); a
    k above N keeps the whole row (it would fail); scores all equal normalise to 0 (it
    would divide by zero).
    """
    raw = np.asarray(scores, dtype=np.float64)
    if not len(k_list):
        return raw.astype(np.float32)
    low, high = raw.min(), raw.max()
    normalised = (raw - low) / (high - low) if high > low else np.zeros_like(raw)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    similarity = embeddings @ embeddings.T
    order = np.argsort(-similarity, axis=1, kind="stable")
    smoothed = np.zeros_like(normalised)
    for k in k_list:
        kept = np.zeros_like(similarity)
        columns = order[:, : min(int(k), len(raw))]
        rows = np.arange(len(raw))[:, None]
        kept[rows, columns] = similarity[rows, columns]
        smoothed += (kept / kept.sum(axis=1, keepdims=True)) @ normalised
    return (smoothed / len(k_list)).astype(np.float32)


def divide_indices(
    count: int, divide_num: int, seed: int = 0, groups: Sequence[Hashable] | None = None
) -> list[np.ndarray]:
    """The official ``divide_num`` split: ``divide_num`` disjoint subsets covering 0..count-1.

    Within each group (in order of first appearance; one group when ``groups`` is None)
    the indices are shuffled with ``random.Random(seed)`` and dealt out in turn: the
    m-th of every run of ``divide_num`` goes to subset m. The official code groups by
    anomaly type (the image's folder), which keeps every type in every subset; pass
    ``groups`` to do the same. Each subset is returned sorted.
    """
    if divide_num < 1:
        raise ValueError(f"divide_num must be >= 1, got {divide_num}")
    if divide_num == 1:
        return [np.arange(count)]
    labels = [0] * count if groups is None else list(groups)
    if len(labels) != count:
        raise ValueError(f"{len(labels)} groups given for {count} images")
    members: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(label, []).append(index)
    generator = random.Random(seed)
    subsets: list[list[int]] = [[] for _ in range(divide_num)]
    for indices in members.values():
        generator.shuffle(indices)
        for position, index in enumerate(indices):
            subsets[position % divide_num].append(index)
    return [np.array(sorted(subset), dtype=np.int64) for subset in subsets]


class MuSc(Predictor):
    """MuSc on a frozen CLIP; every call to :meth:`score_tensors` scores one set.

    ``progress``: a progress bar over the scoring of each set (images x layers x
    degrees), off by default so that library use stays quiet; the CLI turns it on
    unless ``--no-progress``. It is shown by rank 0 only.

    ``shard``: under ``torchrun`` (an initialised process group of several ranks), the
    backbone batches and the mutual scoring are shared between the ranks, and every
    rank gets the whole set's results, identical to one process's. Every rank must then
    call :meth:`run` with the same images (as evaluation does); set it to False to score
    on one rank alone inside a process group.
    """

    method = "musc"
    scores_sets = True
    progress: bool = False
    shard: bool = True
    resize: ResizeMode = "center-crop"  # this set's: see MuScConfig.coverage
    # the precision chosen through --precision / PredictorSpec (None: float32, as built)
    precision: PrecisionChoice | None = None

    def __init__(
        self,
        clip: CLIP,
        config: MuScConfig | None = None,
        backbone: BackboneIdentity | None = None,
    ) -> None:
        self.config = config or MuScConfig()
        self.clip = clip.requires_grad_(False).eval()
        self.backbone = backbone or BackboneIdentity(self.config.backbone)
        visual = clip.visual
        if max(self.config.features) > visual.num_layers:
            raise ValueError(
                f"feature layers {list(self.config.features)} exceed the backbone's "
                f"{visual.num_layers} visual layers"
            )
        if self.config.image_size % visual.patch_size:
            raise ValueError(
                f"image_size {self.config.image_size} is not a multiple of the patch size "
                f"{visual.patch_size}"
            )

    @classmethod
    def from_pretrained(
        cls,
        clip_weights: str | Path | CLIP | None = None,
        *,
        config: MuScConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        **settings: Any,
    ) -> MuSc:
        """MuSc on a CLIP found as ``create_model`` finds one: a registered name, a file
        or folder, or a CLIP in memory (default: ``config.backbone``, MuSc's published
        ViT-L/14@336px); the results record its name and SHA-256. ``settings`` are
        :class:`MuScConfig` fields. DINOv2 weights: :func:`anomalyclip.create_musc`."""
        from anomalyclip.methods.anomalyclip.factory import load_backbone

        config = configured(config, settings)
        clip, identity = load_backbone(clip_weights, config.backbone, device=device, dtype=dtype)
        return cls(clip, dataclasses.replace(config, backbone=identity.name), identity)

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    @property
    def grid(self) -> int:
        return self.config.image_size // self.clip.visual.patch_size

    @property
    def preprocessor(self) -> PreProcessor:
        return PreProcessor(self.config.image_size, self.resize)

    def predict_images(self, images: Sequence[Image.Image]) -> list[AnomalyPrediction]:
        """The set scored with the coverage its images need (:meth:`cover`)."""
        self.resize = self.cover([image.size for image in images])
        return super().predict_images(images)

    def cover(self, sizes: Sequence[tuple[int, int]]) -> ResizeMode:
        """How a set of images of these (width, height) is fitted to S x S, said in the
        log when the paper's centre crop would lose (or, asked for, loses) part of them."""
        lost = [1 - min(size) / max(size) for size in sizes] or [0.0]
        cropped = sum(share > CROP_LOSS_TOLERANCE for share in lost)
        coverage = self.config.coverage
        if coverage == "whole" or not cropped:
            return "squash" if coverage == "whole" else "center-crop"
        if coverage == "center-crop":
            logger.warning(
                "MuSc (coverage center-crop, the paper's): %d of %d images are not square; up "
                "to %.0f %% of each lies outside the centre square, is not scored and is left "
                "uncoloured on the overlays",
                cropped,
                len(lost),
                100 * max(lost),
            )
            return "center-crop"
        logger.warning(
            "MuSc: %d of %d images are not square; the paper's centre crop would leave up to "
            "%.0f %% of each unscored, so the whole images are scored, resized to %d x %d "
            "(--musc-coverage center-crop for the paper's crop)",
            cropped,
            len(lost),
            100 * max(lost),
            self.config.image_size,
            self.config.image_size,
        )
        return "squash"

    @property
    def postprocessor(self) -> PostProcessor:
        return PostProcessor.calibrated(
            MAP_RANGE, self.config.image_threshold, self.config.pixel_threshold
        )

    def settings(self) -> dict[str, Any]:
        recorded = {**self.config.to_dict(), "backbone_identity": self.backbone.to_dict()}
        if self.precision is not None:
            recorded["precision"] = self.precision.to_dict()
        return recorded

    def score_tensors(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        output = self.run(images)
        return output.image_scores, output.anomaly_maps

    def score_decoded(
        self, images: Sequence[Image.Image], preprocessor: PreProcessor
    ) -> tuple[np.ndarray, np.ndarray]:
        """The set scored subset by subset, each preprocessed only when it is scored."""
        output = self.run(PreprocessedSet(images, preprocessor))
        return output.image_scores, output.anomaly_maps

    def score_set(
        self,
        sources: str | Path | Sequence[ImageSource],
        progress: bool = False,
        errors: ErrorPolicy = "raise",
    ) -> list[AnomalyPrediction | SkippedImage]:
        """Score a folder, glob, CSV list or list of images as one set: the notebook entry
        point. Folders are expanded by the rule ``anomalyclip predict`` uses (recursive,
        annotation folders skipped), so a folder is the same set in both."""
        items = expand_sources([sources] if isinstance(sources, (str, Path)) else sources)
        return self.predict(items, batch_size=max(1, len(items)), progress=progress, errors=errors)

    def feature_shape(self) -> tuple[int, int, int]:
        """Tokens per image (class token included), their channels, the embedding size."""
        visual = self.clip.visual
        return self.grid**2 + 1, visual.conv1.weight.shape[0], visual.proj.shape[1]

    def feature_batches(
        self, images: Tensor | PreprocessedSet, shard: bool = False
    ) -> Iterator[tuple[int, dict[int, Tensor], Tensor]]:
        """(first row, raw tokens layer -> (B, 1 + L, C), unit embeddings (B, E)), float32,
        for each batch of ``config.batch_size`` images in order. With ``shard`` only the
        batches this rank computes (batch ``k`` on rank ``k mod world``)."""
        world = distributed.world_size() if shard else 1
        rank = distributed.rank() if shard else 0
        visual = self.clip.visual
        with torch.no_grad():
            for number, (start, stop) in enumerate(_ranges(0, len(images), self.config.batch_size)):
                if distributed.owner(number, world) != rank:
                    continue
                checkpoint()  # a service's abandoned request stops here
                batch = self.batch_of(images, start, stop).to(self.device)
                hidden, embedding = visual.residual_stream(batch, self.config.features, "bicubic")
                assert embedding is not None  # residual_stream was asked for it
                tokens = {layer: values.float() for layer, values in hidden.items()}
                yield start, tokens, F.normalize(embedding.float(), dim=-1)

    def batch_of(self, images: Tensor | PreprocessedSet, start: int, stop: int) -> Tensor:
        """Images ``start..stop-1`` as a (B, 3, S, S) tensor, its shape checked."""
        if isinstance(images, Tensor):
            batch = images[start:stop]
        else:
            batch = images.subset(np.arange(start, stop))
        size = self.config.image_size
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(
                f"MuSc takes images of shape (N, 3, {size}, {size}), got {tuple(batch.shape)}"
            )
        return batch

    def features(
        self, images: Tensor | PreprocessedSet, shard: bool = False
    ) -> tuple[dict[int, Tensor], Tensor]:
        """Raw tokens (layer -> (N, 1 + L, C)) and image embeddings (N, E), float32.

        Computed once per image, in batches of ``config.batch_size``, and shared by every
        degree and layer. With ``shard`` (every rank of a launch calling with the same
        images) batch ``k`` is computed by rank ``k mod world`` and the results summed
        across ranks into zeros: the same batches as one process, so the same bits, on
        every rank.
        """
        if isinstance(images, Tensor):
            self.batch_of(images, 0, 0)  # the shape checked even for an empty set
        count = len(images)
        length, channels, embedding_size = self.feature_shape()
        tokens = {
            layer: torch.zeros(count, length, channels, device=self.device)
            for layer in self.config.features
        }
        embeddings = torch.zeros(count, embedding_size, device=self.device)
        for start, hidden, embedding in self.feature_batches(images, shard):
            for layer, values in hidden.items():
                tokens[layer][start : start + len(values)] = values
            embeddings[start : start + len(embedding)] = embedding
        if shard and distributed.world_size() > 1:
            for values in (*tokens.values(), embeddings):
                distributed.sum_tensor_across_ranks(values)
        return tokens, embeddings

    def _sharded(self) -> bool:
        return self.shard and distributed.is_distributed()

    def run(
        self,
        images: Tensor | PreprocessedSet,
        keep_features: bool = False,
        groups: Sequence[Hashable] | None = None,
    ) -> MuScOutput:
        """Score a set of preprocessed images (N, 3, S, S) and return every intermediate.

        ``groups`` (one label per image) makes the ``divide_num`` subsets stratified as
        the official code's are (see :func:`divide_indices`); it has no effect otherwise.

        The subsets are scored one after the other, each from its own features, so the
        features held at once are one subset's: memory grows with the subset, not the
        set. Only the class tokens (RsCIN's input) and patch scores are kept for every
        image. ``images`` may be a :class:`PreprocessedSet`, which preprocesses each
        subset's images when it is scored, so no (N, 3, S, S) tensor is built either.
        """
        config = self.config
        count = len(images)
        neighbour_count(count, config.interval)  # refuses a set of one, naming why
        subsets = divide_indices(count, config.divide_num, config.seed, groups)
        for subset in subsets:
            neighbour_count(len(subset), config.interval)
        output = MuScOutput(
            grid=self.grid,
            subsets=subsets,
            class_tokens=np.empty(0, np.float32),
            msm={},
            patch_scores=np.empty(0),
            anomaly_maps=np.empty(0, np.float32),
            image_scores_raw=np.empty(0),
            image_scores=np.empty(0, np.float32),
        )
        bar = self._progress_bar(count * len(config.features) * len(config.degrees))

        def advance(steps: float) -> None:
            checkpoint()  # between the images of a set: an abandoned request stops here
            bar.update(steps)

        shard = self._sharded()
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            spill: SpilledFeatures | None = None
            if len(subsets) == 1:  # the whole set at once: nothing to hold back
                whole, embeddings = self.features(images, shard=shard)
            else:
                spill = stack.enter_context(SpilledFeatures(config.features, count, self))
                embeddings = self._spill_features(images, spill, shard)
            extracted = time.perf_counter()
            for subset in subsets:
                tokens = whole if spill is None else spill.read(subset, shard)
                self._score_subset(output, subset, count, tokens, keep_features, advance)
                del tokens
        bar.close()
        scored = time.perf_counter()
        output.class_tokens = embeddings.cpu().numpy()
        per_degree = [
            np.mean([output.msm[(degree, layer)] for layer in config.features], axis=0)
            for degree in config.degrees
        ]
        output.patch_scores = np.mean(per_degree, axis=0)
        output.anomaly_maps, output.image_scores_raw = self.maps_from_patch_scores(
            output.patch_scores
        )
        output.image_scores = rscin(output.image_scores_raw, output.class_tokens, config.rscin_k)
        logger.info(
            "MuSc: %d images in %d subset(s), features %.1f ms/image, LNAMD+MSM %.1f ms/image",
            count,
            len(subsets),
            1000 * (extracted - started) / count,
            1000 * (scored - extracted) / count,
        )
        return output

    def _spill_features(
        self, images: Tensor | PreprocessedSet, spill: SpilledFeatures, shard: bool
    ) -> Tensor:
        """Every image's tokens written to ``spill`` in the batches :meth:`features` uses
        (so the same bits), only one batch in memory; the (N, E) embeddings returned."""
        embeddings = torch.zeros(len(images), self.feature_shape()[2], device=self.device)
        for start, hidden, embedding in self.feature_batches(images, shard):
            for layer, values in hidden.items():
                spill.write(layer, start, values)
            embeddings[start : start + len(embedding)] = embedding
        if shard and distributed.world_size() > 1:
            distributed.sum_tensor_across_ranks(embeddings)
        return embeddings

    def _score_subset(
        self,
        output: MuScOutput,
        subset: np.ndarray,
        count: int,
        tokens: dict[int, Tensor],
        keep_features: bool,
        advance: Callable[[float], object],
    ) -> None:
        """One subset's MSM scores for every layer and degree, written into ``output``'s
        whole-set arrays at the subset's rows; each layer's tokens freed once scored."""
        config = self.config
        for layer in config.features:
            layer_tokens = tokens.pop(layer)
            if keep_features:
                kept = output.patch_tokens.get(layer)
                output.patch_tokens[layer] = _into_rows(kept, subset, count, layer_tokens)
            for degree in config.degrees:
                vectors = self._lnamd(layer_tokens, degree)
                if keep_features:
                    kept = output.lnamd.get((degree, layer))
                    output.lnamd[(degree, layer)] = _into_rows(kept, subset, count, vectors)
                scores = mutual_scores(
                    vectors,
                    config.interval,
                    config.block_elements,
                    similarity_dtype=SIMILARITY_DTYPES[config.similarity_dtype],
                    shard=self._sharded(),
                    advance=advance,
                )
                del vectors
                kept = output.msm.get((degree, layer))
                output.msm[(degree, layer)] = _into_rows(kept, subset, count, scores)
            del layer_tokens

    def _progress_bar(self, total: int) -> Any:
        """The bar over one set's mutual scoring (each image once per layer and degree):
        the long part of a big set, minutes on a CPU, so the CLI shows how far it is."""
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc="MuSc scoring",
            unit="img",
            leave=False,
            # the time left, stated: minutes to an hour on a CPU (the count is in image
            # passes, advanced by the pairs compared, so the rate is steady)
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, about "
            "{remaining} left",
            disable=not (self.progress and distributed.is_main_process()),
        )

    def _lnamd(self, tokens: Tensor, degree: int) -> Tensor:
        """:func:`lnamd` in batches, into one preallocated tensor (bounded temporaries)."""
        count, length, channels = tokens.shape
        vectors = torch.empty(count, length - 1, channels, device=tokens.device)
        for start in range(0, count, self.config.batch_size):
            stop = start + self.config.batch_size
            vectors[start:stop] = lnamd(tokens[start:stop], degree)
        return vectors

    def maps_from_patch_scores(self, patch_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S) float32 maps (bilinear, align_corners True) and their float64 maxima."""
        size, grid = self.config.image_size, self.grid
        maps = np.empty((len(patch_scores), size, size), dtype=np.float32)
        maxima = np.empty(len(patch_scores))
        for start in range(0, len(patch_scores), self.config.batch_size):
            chunk = torch.from_numpy(patch_scores[start : start + self.config.batch_size])
            upsampled = F.interpolate(
                chunk.view(-1, 1, grid, grid),
                size=(size, size),
                mode="bilinear",
                align_corners=True,
            )[:, 0]
            maps[start : start + len(chunk)] = upsampled.float().numpy()
            maxima[start : start + len(chunk)] = upsampled.flatten(1).amax(dim=1).numpy()
        return maps, maxima


class PreprocessedSet:
    """The decoded images of a set, preprocessed a subset at a time when :meth:`MuSc.run`
    scores it: the whole set's (N, 3, S, S) float32 tensor (0.6 MB per image at 224 px)
    is never built."""

    def __init__(self, images: Sequence[Image.Image], preprocessor: PreProcessor) -> None:
        self.images = images
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> Tensor:
        return torch.stack([self.preprocessor.tensor(self.images[i]) for i in indices])


class SpilledFeatures:
    """Every image's raw tokens of every layer in an anonymous temporary file (deleted
    when closed; in ``TMPDIR``), read back one subset at a time, so that MuSc holds one
    subset's features instead of the set's (the file: N x layers x (1 + L) x C x 4
    bytes, 0.5 MB per image with the reference CLIP at 224 px, 22 MB with ViT-L/14 at
    518 px). Read with plain file reads, not a memory map, whose pages would count as
    the process's resident memory. Rows another rank computed (``shard``) are holes
    in this rank's file, read as zeros and summed across ranks, as :meth:`MuSc.features`
    sums its zeros."""

    def __init__(self, layers: Sequence[int], count: int, musc: MuSc) -> None:
        length, channels, _ = musc.feature_shape()
        self.row_shape = (length, channels)
        self.row_bytes = length * channels * 4  # float32
        self.layer_index = {layer: number for number, layer in enumerate(layers)}
        self.count = count
        self.device = musc.device
        # closed by __exit__: MuSc.run holds this object in a with block
        self.file = tempfile.TemporaryFile(prefix="anomalyclip-musc-features-")  # noqa: SIM115
        self.file.truncate(len(layers) * count * self.row_bytes)  # unwritten rows read 0

    def __enter__(self) -> SpilledFeatures:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def _offset(self, layer: int, row: int) -> int:
        return (self.layer_index[layer] * self.count + row) * self.row_bytes

    def write(self, layer: int, start: int, values: Tensor) -> None:
        """Rows ``start..`` of ``layer``: (B, 1 + L, C) float32."""
        self.file.seek(self._offset(layer, start))
        self.file.write(values.detach().cpu().contiguous().numpy().tobytes())

    def read(self, subset: np.ndarray, shard: bool) -> dict[int, Tensor]:
        """Layer -> (len(subset), 1 + L, C) float32 tokens of these rows, on the device."""
        tokens = {}
        for layer in self.layer_index:
            rows = np.empty((len(subset), *self.row_shape), dtype=np.float32)
            for number, row in enumerate(subset):
                self.file.seek(self._offset(layer, int(row)))
                if self.file.readinto(memoryview(rows[number]).cast("B")) != self.row_bytes:
                    raise OSError(f"MuSc's feature file {self.file.name} was cut short")
            tokens[layer] = torch.from_numpy(rows).to(self.device)
            if shard and distributed.world_size() > 1:
                distributed.sum_tensor_across_ranks(tokens[layer])
        return tokens


def _into_rows(
    whole: np.ndarray | None, subset: np.ndarray, count: int, values: Tensor
) -> np.ndarray:
    """``values`` (one subset's rows) written at ``subset``'s rows of ``whole``, a
    whole-set numpy array of their dtype and row shape, made when None (the first subset)."""
    array = values.detach().cpu().numpy()
    if whole is None:
        whole = np.empty((count, *array.shape[1:]), dtype=array.dtype)
    whole[subset] = array
    return whole


def apply_precision(predictor: Predictor, choice: PrecisionChoice) -> Predictor:
    """MuSc in ``choice``'s precision: bfloat16 picks each nearest patch from bfloat16
    products (``similarity_dtype``; the distance still float32): tensor-core speed on a
    GPU, oneDNN's AVX-512 BF16/AMX rate on a CPU (the centred form, see
    :func:`mutual_scores`). The backbone stays float32. Recorded with every result.

    ``auto`` takes bfloat16 where it is native (``resolve_precision`` decides: CPU flags
    avx512_bf16 or amx_bf16, or a GPU with bfloat16) because it holds the accuracy bound
    there: on 16 good + 16 defect metal plates with the reference CLIP, image scores
    within 1e-3 of float32 and maps correlating above 0.9999 (benchmarks/
    bench_precision.py; the README's table). Where bfloat16 is emulated it keeps float32.
    """
    if not isinstance(predictor, MuSc):
        raise ValueError(f"precision {choice.precision} needs the torch MuSc model")
    if choice.precision not in ("float32", "bfloat16"):
        raise ValueError(f"MuSc offers float32 and bfloat16, not {choice.precision}")
    predictor.config = dataclasses.replace(predictor.config, similarity_dtype=choice.precision)
    predictor.precision = choice
    logger.info("MuSc similarity products in %s (%s)", choice.precision, choice.reason)
    return predictor


def configured(config: MuScConfig | None, overrides: dict[str, Any] | None) -> MuScConfig:
    """``config`` (default: the official configs/musc.yaml) with the fields given; None
    values mean "not given", an unknown name is refused."""
    config = config or MuScConfig()
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(MuScConfig)})
    if unknown:
        raise ValueError(f"MuSc has no setting {', '.join(map(repr, unknown))}")
    return dataclasses.replace(config, **changes)
