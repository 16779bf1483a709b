"""Few-shot AnomalyCLIP: a handful of known-good images as a memory bank of patches.

The zero-shot map compares every patch with two learned text prompts; a user who has a
few good parts can say more: a patch unlike every patch of the good parts is suspect.
This is the few-shot mode of AprilGAN (github.com/ByChelsea/VAND-APRIL-GAN, ``test.py``
and ``few_shot.py``), the code AnomalyCLIP's own code grew from, on AnomalyCLIP's
embeddings:

* **Bank.** For each feature layer, the L2-normalised patch embeddings of the reference
  images (the same embeddings the zero-shot map compares with the text), class tokens
  dropped: (references x patches, width).
* **Reference map.** For each test patch and layer, ``1 - max cosine`` over that layer's
  bank (the distance to the nearest good patch); each layer's (grid x grid) map is
  upsampled bilinearly to the input size like the zero-shot layer maps, and the layers
  are summed. The pixel map is the zero-shot raw map plus the reference map, then the
  model's Gaussian smoothing (summing before upsampling equals upsampling each layer:
  bilinear interpolation is linear).
* **Image score.** ``(z + r / (1 + r)) / 2``, the peaks of the map's two terms: ``z``
  the zero-shot map's maximum (smoothed, as shown) divided by the number of layers (a
  mean layer probability, in [0, 1]), and ``r = m / m_ref``: ``m`` is the maximum of the
  test image's (unsmoothed) reference map and ``m_ref`` the largest such maximum among
  the references themselves, each scored against the other references (leave one out);
  with a single reference, against its own patches outside a 3 x 3 neighbourhood. Why
  ``r``: a raw distance has no fixed scale (it depends on the layers, the backbone and
  the product), while ``m_ref`` is how far from the bank a *normal* part of this very
  product gets, so ``r = 1`` is the edge of normal variation and maps to 0.5, the same
  middle as a probability; the score stays in [0, 1] and a single image can be scored
  with no other test images. Why the map's peak and not the zero-shot global probability
  (the earlier rule; :data:`IMAGE_SCORE_RULE` names the current): the global embedding
  judges the whole input at once, so a small defect barely moves it, and under tiles it
  judges a crop at another scale; the maximum over tiles of that noise outweighed the
  reference term (AnomalyCLIP with references on wide metal-plate parts, tiled: image
  AUROC 0.667 against 0.778 untiled while the pixel AUROC rose; the global term alone:
  0.69, the zero-shot map's peak alone: 1.00). The score now rests on the evidence the
  map shows, which tiles sharpen. Image thresholds calibrated under the earlier rule are
  not applied (the pixel map is unchanged, so pixel thresholds still are).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomalyclip.maps import gaussian_smooth, upsample
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.methods.nearest import bfloat16_pays, nearest_rows
from anomalyclip.methods.references import (
    ReferenceError,
    bank_dtype,
    identity_differences,
    load_references,
)
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import ImageSource, PreProcessor, describe
from anomalyclip.utils.atomic import atomic_open
from anomalyclip.utils.cancellation import checkpoint
from anomalyclip.utils.quoting import quoted
from anomalyclip.utils.safe_load import refuse_non_finite, safe_torch_load

logger = logging.getLogger(__name__)

BANK_FORMAT = "anomalyclip-reference-bank"
BANK_VERSION = 1
# How the image score is made from the map (see the module notes); recorded with thresholds
# calibrated with references, so that an image threshold for another rule is not applied.
IMAGE_SCORE_RULE = "map-peaks"
# Patches outside this square around a patch count as "elsewhere" for a single reference.
SELF_EXCLUSION = 1


@dataclass
class ReferenceBank:
    """Patch embeddings of known-good images, per layer, and the scale they imply.

    ``identity`` ties the bank to what made it (backbone checksum, image size, layers,
    DPAM settings): embeddings of another model are not comparable, and
    :meth:`check_fits` refuses them naming the difference. :attr:`digest` names the bank
    by its content (embeddings as stored, grid, count and scale), computed from it, never
    read from a file: a bank with other embeddings or another scale is another bank.
    """

    patches: dict[int, Tensor]  # layer -> (references * patches, width), L2-normalised
    grid: tuple[int, int]
    count: int
    reference_max: float  # m_ref: the largest leave-one-out maximum of the references
    identity: dict[str, Any]
    sources: list[str]
    digest: str = field(init=False)
    embeddings_digest: str = field(init=False)  # what checkpoints before 0.3 recorded

    def __post_init__(self) -> None:
        self.digest = content_digest(self.patches, self.grid, self.count, self.reference_max)
        self.embeddings_digest = embeddings_digest(self.patches)

    def matches(self, recorded: str) -> bool:
        """Whether a checkpoint's recorded digest names this bank: its content digest,
        or for checkpoints calibrated before 0.3 the digest of its float32 embeddings
        alone (recomputed too, so other embeddings never match)."""
        return recorded in (self.digest, self.embeddings_digest)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.patches.values())

    def to(self, dtype: torch.dtype) -> ReferenceBank:
        """The bank stored in ``dtype`` (float16 halves its size; distances are computed
        in float32 all the same). Its content, hence its digest, is the stored one."""
        return ReferenceBank(
            {k: v.to(dtype) for k, v in self.patches.items()},
            self.grid,
            self.count,
            self.reference_max,
            dict(self.identity),
            list(self.sources),
        )

    def check_fits(self, model: AnomalyCLIP) -> None:
        differences = identity_differences(self.identity, bank_identity(model))
        if differences:
            raise ReferenceError(
                "the reference bank was made for another model (" + "; ".join(differences) + ")"
            )

    def save(self, path: str | Path) -> Path:
        """Written atomically: an interrupted save leaves the previous file or none."""
        target = Path(path)
        record = {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "patches": {str(k): v.cpu() for k, v in self.patches.items()},
            "grid": list(self.grid),
            "count": self.count,
            "reference_max": self.reference_max,
            "identity": self.identity,
            "sources": self.sources,
            "digest": self.digest,  # for people reading the file: loading recomputes it
        }
        with atomic_open(target, "wb") as handle:
            torch.save(record, handle)
        logger.info(
            "reference bank of %d images written to %s (%.1f MB)",
            self.count,
            target,
            target.stat().st_size / 1e6,
        )
        return target

    @classmethod
    def load(cls, path: str | Path) -> ReferenceBank:
        """The bank in ``path``, checked whole: every field's type, the embeddings'
        shapes, dtypes and values, and a scale in the range a bank can have; one line
        naming the file and the field otherwise."""
        data = safe_torch_load(path, "reference bank")
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            raise ReferenceError(f"{path} is not a reference bank written by anomalyclip")
        version = data.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ReferenceError(f"{path}: version is not a number")
        if version > BANK_VERSION:
            raise ReferenceError(f"{path} was written by a newer anomalyclip; upgrade it")
        grid, count = _checked_layout(path, data)
        patches = _checked_patches(path, data.get("patches"), grid, count)
        reference_max = _checked_scale(path, data.get("reference_max"))
        identity, sources = data.get("identity"), data.get("sources")
        if not isinstance(identity, dict):
            raise ReferenceError(f"{path}: identity is a {type(identity).__name__}, not a mapping")
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise ReferenceError(f"{path}: sources is not a list of file names")
        return cls(patches, grid, count, reference_max, dict(identity), list(sources))


# The range of a bank's scale: build_bank writes at least MIN_REFERENCE_MAX (identical
# references), and a scale of MAX_REFERENCE_MAX or more would flatten every image's
# reference term to 0 (it is a sum of patch distances over a few layers).
MIN_REFERENCE_MAX = 1e-6
MAX_REFERENCE_MAX = 1e6


def _checked_layout(path: str | Path, data: dict[str, Any]) -> tuple[tuple[int, int], int]:
    grid, count = data.get("grid"), data.get("count")
    if (
        not isinstance(grid, (list, tuple))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ReferenceError(f"{path}: grid is {quoted(grid)}, not two positive whole numbers")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ReferenceError(f"{path}: count is {quoted(count)}, not a positive whole number")
    return (int(grid[0]), int(grid[1])), int(count)


def _checked_patches(
    path: str | Path, patches: Any, grid: tuple[int, int], count: int
) -> dict[int, Tensor]:
    """The embeddings: layer -> (count * grid cells, width) floating tensors, finite."""
    if not isinstance(patches, dict) or not patches:
        raise ReferenceError(f"{path}: patches is not a mapping of layers to embeddings")
    rows = count * grid[0] * grid[1]
    checked: dict[int, Tensor] = {}
    for key, value in patches.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ReferenceError(f"{path}: patches has a layer named {quoted(key)}") from None
        where = f"{path}: patches.{layer}"
        if not isinstance(value, Tensor):
            raise ReferenceError(f"{where} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise ReferenceError(f"{where} holds {value.dtype}, not floating-point embeddings")
        if value.dim() != 2 or value.shape[0] != rows:
            raise ReferenceError(
                f"{where} has shape {tuple(value.shape)}; {count} references of a "
                f"{grid[0]} x {grid[1]} grid need ({rows}, width)"
            )
        checked[layer] = value
    widths = {t.shape[1] for t in checked.values()}
    if len(widths) > 1:
        raise ReferenceError(f"{path}: patches has layers of different widths {sorted(widths)}")
    refuse_non_finite({f"patches.{k}": v for k, v in checked.items()}, f"{path}: ")
    return checked


def _checked_scale(path: str | Path, value: Any) -> float:
    """``reference_max``: a positive distance in the range scores stay meaningful in (a
    negative one made scores of 41; 1e-30 or 1e30 make every score 1 or 0)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ReferenceError(f"{path}: reference_max is {quoted(value)}, not a number")
    if not math.isfinite(value) or not MIN_REFERENCE_MAX <= value <= MAX_REFERENCE_MAX:
        raise ReferenceError(
            f"{path}: reference_max is {value!r}, outside the range a bank can have "
            f"({MIN_REFERENCE_MAX:g} to {MAX_REFERENCE_MAX:g}); it is damaged"
        )
    return float(value)


def embeddings_digest(patches: dict[int, Tensor]) -> str:
    """SHA-256 of the embeddings in float32, layer by layer (the digest before 0.3)."""
    digest = hashlib.sha256()
    for layer in sorted(patches):
        digest.update(patches[layer].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def content_digest(
    patches: dict[int, Tensor], grid: tuple[int, int], count: int, reference_max: float
) -> str:
    """SHA-256 of what a bank's scores depend on: its embeddings as stored (in float32
    bytes), layer numbers and shapes, grid, count and scale."""
    digest = hashlib.sha256(b"anomalyclip-reference-bank/2")
    for layer in sorted(patches):
        tensor = patches[layer]
        digest.update(f"{layer}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    digest.update(f"{grid[0]}x{grid[1]};{count};{float(reference_max)!r}".encode())
    return digest.hexdigest()


def bank_identity(model: AnomalyCLIP) -> dict[str, Any]:
    """What a bank's embeddings depend on."""
    config = model.config
    return {
        "backbone_sha256": model.backbone.sha256,
        "image_size": config.image_size,
        "features": [int(layer) for layer in config.features],
        "dpam_layers": config.dpam_layers,
        "dpam_mode": config.dpam_mode,
    }


def nearest_distances(
    tokens: Tensor,
    bank: Tensor,
    excluded: Tensor | None = None,
    block: int = 4096,
    low_precision: bool = False,
) -> Tensor:
    """(B, P) ``1 - max cosine`` of each patch to the bank, in float32, in blocks of the
    bank so memory stays bounded with many references. ``excluded``: (B, M) bank rows
    each image may not match (its own patches, for leave-one-out). ``low_precision``
    (a bfloat16 model; the tokens reach here as float32 unit vectors whatever the
    model's dtype): the nearest row from bfloat16 products where they are native
    (:func:`anomalyclip.methods.nearest.nearest_rows`), its cosine in float32."""
    if low_precision and excluded is None and bfloat16_pays(tokens.device):
        # a bfloat16 model: bfloat16 products, the nearest candidates compared in float32
        flat = tokens.reshape(-1, tokens.shape[-1])
        best = torch.full((flat.shape[0],), -math.inf, device=tokens.device)
        for start in range(0, bank.shape[0], block):
            part = bank[start : start + block].to(tokens.device)
            best = torch.maximum(best, nearest_rows(flat, part)[0])
        return 1.0 - best.reshape(tokens.shape[:2])
    best = torch.full(tokens.shape[:2], -math.inf, device=tokens.device)
    tokens = tokens.float()
    for start in range(0, bank.shape[0], block):
        part = bank[start : start + block].to(tokens.device, torch.float32)
        similarity = tokens @ part.T
        if excluded is not None:
            mask = excluded[:, None, start : start + block].to(tokens.device)
            similarity = similarity.masked_fill(mask, -math.inf)
        best = torch.maximum(best, similarity.amax(dim=-1))
    return 1.0 - best


def own_rows(patch_tokens: dict[int, Tensor], bank: ReferenceBank) -> Tensor:
    """(B, M) True on the bank rows of the reference each image *is* (all its patches
    equal to that reference's, position by position), for leave-one-out scoring."""
    layer = min(patch_tokens)
    tokens = patch_tokens[layer][:, 1:].float()  # (B, P, C)
    per_image = tokens.shape[1]
    stored = bank.patches[layer].float().reshape(bank.count, per_image, -1)
    agreement = torch.einsum("bpc,npc->bn", tokens, stored) / per_image
    same = agreement > 1 - 1e-3
    return same.repeat_interleave(per_image, dim=1)


def reference_maps(
    patch_tokens: dict[int, Tensor],
    bank: ReferenceBank,
    grid: tuple[int, int],
    leave_one_out: bool = False,
    low_precision: bool = False,
) -> Tensor:
    """(B, grid_h, grid_w) reference map at patch resolution, summed over layers; with
    ``leave_one_out``, a reference is compared with the other references only;
    ``low_precision`` (a bfloat16 model) picks nearest patches from bfloat16 products."""
    excluded = own_rows(patch_tokens, bank) if leave_one_out else None
    total: Tensor | None = None
    for layer, tokens in patch_tokens.items():
        distances = nearest_distances(
            tokens[:, 1:], bank.patches[layer], excluded, low_precision=low_precision
        )
        layer_map = distances.reshape(tokens.shape[0], *grid)
        total = layer_map if total is None else total + layer_map
    assert total is not None, "no feature layers"
    return total


def _leave_one_out_maxima(
    patches: dict[int, Tensor], count: int, grid: tuple[int, int]
) -> list[float]:
    """Each reference's reference-map maximum against the others (one reference: against
    its own patches outside a (2 * SELF_EXCLUSION + 1)^2 neighbourhood)."""
    per_image = grid[0] * grid[1]
    maxima = []
    for index in range(count):
        own = slice(index * per_image, (index + 1) * per_image)
        total = torch.zeros(per_image)
        for bank in patches.values():
            tokens = bank[own].float()
            if count > 1:
                others = torch.cat([bank[: own.start], bank[own.stop :]]).float()
                total += 1.0 - (tokens @ others.T).amax(dim=-1)
            else:
                similarity = tokens @ tokens.T
                rows = torch.arange(per_image) // grid[1]
                columns = torch.arange(per_image) % grid[1]
                near = ((rows[:, None] - rows[None]).abs() <= SELF_EXCLUSION) & (
                    (columns[:, None] - columns[None]).abs() <= SELF_EXCLUSION
                )
                total += 1.0 - similarity.masked_fill(near, -math.inf).amax(dim=-1)
        maxima.append(float(total.max()))
    return maxima


def build_bank(
    model: AnomalyCLIP, references: Sequence[ImageSource], batch_size: int = 8
) -> ReferenceBank:
    """Encode the references once; an empty or unreadable set is a :class:`ReferenceError`."""
    images = load_references(references)
    preprocessor = model.preprocessor
    collected: dict[int, list[Tensor]] = {}
    grid: tuple[int, int] = (0, 0)
    for start in range(0, len(images), batch_size):
        checkpoint()  # a service's abandoned request stops between batches
        batch = torch.stack(
            [preprocessor.tensor(image) for image in images[start : start + batch_size]]
        )
        embeddings = model.encode_image(batch.to(model.device))
        grid = embeddings.grid
        for layer, tokens in embeddings.patch_tokens.items():
            collected.setdefault(layer, []).append(
                tokens[:, 1:].reshape(-1, tokens.shape[-1]).cpu()
            )
    patches = {layer: torch.cat(parts) for layer, parts in collected.items()}
    maxima = _leave_one_out_maxima(patches, len(images), grid)
    return ReferenceBank(
        patches,
        grid,
        len(images),
        max(max(maxima), MIN_REFERENCE_MAX),
        bank_identity(model),
        [describe(source) for source in references],
    )


class FewShotAnomalyCLIP(Predictor):
    """AnomalyCLIP with a reference bank: zero-shot map plus distance to good patches.

    ``leave_one_out`` scores each of the references against the others (used to
    calibrate on the references alone): an image found in the bank does not match its
    own patches. Needs two references at least.
    """

    method = "anomalyclip"

    def __init__(
        self, model: AnomalyCLIP, bank: ReferenceBank, leave_one_out: bool = False
    ) -> None:
        bank.check_fits(model)
        if leave_one_out and bank.count < 2:
            raise ReferenceError(
                "scoring the references against each other needs two of them at least; give "
                "known-good images to calibrate on as well"
            )
        self.model = model
        self.bank = bank
        self.leave_one_out = leave_one_out
        calibrated = model.config.extra.get("calibrated_with") or {}
        rule = calibrated.get("reference_image_score")
        if bank.matches(str(calibrated.get("reference_bank"))) and rule != IMAGE_SCORE_RULE:
            logger.warning(
                "the image threshold was calibrated on image scores of an earlier rule (%s) "
                "and is not applied (pixel thresholds are); calibrate again for verdicts",
                rule or "the zero-shot global probability",
            )

    @classmethod
    def from_images(
        cls, model: AnomalyCLIP, references: Sequence[ImageSource], batch_size: int = 8
    ) -> FewShotAnomalyCLIP:
        return cls(model, build_bank(model, references, batch_size))

    @classmethod
    def load(cls, model: AnomalyCLIP, path: str | Path) -> FewShotAnomalyCLIP:
        """The few-shot model for a bank saved earlier (``calibrate --reference`` or
        :meth:`ReferenceBank.save`)."""
        return cls(model, ReferenceBank.load(path))

    def reference_bytes(self) -> int:
        return self.bank.nbytes

    @property
    def preprocessor(self) -> PreProcessor:
        return self.model.preprocessor

    @property
    def postprocessor(self) -> PostProcessor:
        """The zero-shot model's thresholds do not carry over: the map gains a term (up to
        one per layer), so only thresholds calibrated with references apply."""
        post = self.model.postprocessor
        low, high = post.map_range
        layers = len(self.model.config.features)
        calibrated = self.model.config.extra.get("calibrated_with") or {}
        with_references = self.bank.matches(str(calibrated.get("reference_bank")))
        same_score = calibrated.get("reference_image_score") == IMAGE_SCORE_RULE
        return PostProcessor.calibrated(
            (low, high + layers),
            post.image_threshold if with_references and same_score else None,
            post.pixel_threshold if with_references else None,
            post.false_alarm if with_references and same_score else None,
        )

    def settings(self) -> dict[str, Any]:
        return {
            **self.model.settings(),
            "references": {
                "count": self.bank.count,
                "digest": self.bank.digest,
                "embeddings_digest": self.bank.embeddings_digest,
                "reference_max": self.bank.reference_max,
                "sources": self.bank.sources,
            },
        }

    def score_tensors(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        model = self.model
        size = (model.config.image_size, model.config.image_size)
        with torch.no_grad():
            embeddings = model.encode_image(images.to(model.device))
            zero_shot = model.score(embeddings, model.text_features())
            coarse = reference_maps(
                embeddings.patch_tokens,
                self.bank,
                embeddings.grid,
                self.leave_one_out,
                low_precision=model.dtype == torch.bfloat16,
            )
            reference = upsample(coarse, size)
            maps = gaussian_smooth(zero_shot.raw_maps + reference, model.config.sigma)
            ratio = reference.flatten(1).amax(dim=1) / self.bank.reference_max
            layers = len(model.config.features)
            peak = zero_shot.anomaly_maps.flatten(1).amax(dim=1).float() / layers
            scores = (peak + ratio / (1 + ratio)) / 2
        return scores.float().cpu().numpy(), maps.float().cpu().numpy()


def _bare(predictor: Predictor) -> AnomalyCLIP:
    """The method under a reference mode (new references replace the old ones); anything
    else of this name (an exported model) has no reference mode."""
    bare = predictor.model if isinstance(predictor, FewShotAnomalyCLIP) else predictor
    if not isinstance(bare, AnomalyCLIP):
        raise ReferenceError(f"references need the torch {predictor.method} model")
    return bare


def checkpoint_parts(predictor: Predictor) -> tuple[AnomalyCLIP, ReferenceBank | None]:
    """The model a calibrated checkpoint saves and the bank its thresholds were
    calibrated with (None: zero-shot), for ``calibrate`` (the registry's entry)."""
    if isinstance(predictor, FewShotAnomalyCLIP):
        return predictor.model, predictor.bank
    if not isinstance(predictor, AnomalyCLIP):
        raise ValueError(f"a calibrated checkpoint needs the torch {predictor.method} model")
    return predictor, None


def references_for(predictor: Predictor, references: Sequence[ImageSource]) -> FewShotAnomalyCLIP:
    """The reference mode of ``predictor`` for these known-good images (the registry's
    entry point: :mod:`anomalyclip.methods`)."""
    return FewShotAnomalyCLIP.from_images(_bare(predictor), references)


def bank_for(predictor: Predictor, path: str | Path) -> FewShotAnomalyCLIP:
    """The reference mode of ``predictor`` for a bank saved earlier."""
    return FewShotAnomalyCLIP.load(_bare(predictor), path)


def save_bank(predictor: Predictor, path: str | Path, dtype: str = "float32") -> Path:
    """Write the bank a reference-mode predictor scores with (float16 halves it)."""
    if not isinstance(predictor, FewShotAnomalyCLIP):
        raise ReferenceError(f"{predictor.method} has no reference bank here: give --reference")
    return predictor.bank.to(getattr(torch, bank_dtype(dtype))).save(path)
