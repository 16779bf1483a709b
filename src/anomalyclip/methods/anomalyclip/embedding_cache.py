"""Image embeddings computed once per image and reused: the frozen backbone makes it exact.

AnomalyCLIP trains only the text prompts and uses no augmentation, so what the visual
encoder makes of an image never changes during training (nor between evaluations of
different prompts). :class:`FeatureCache` keeps each image's embeddings in memory and,
optionally, on disk, in float32, so a cached epoch computes exactly what an uncached one
does.

An entry is found by the SHA-1 of the image file's bytes, inside a namespace whose key
is everything else the embeddings depend on: the backbone's architecture and a
fingerprint of its weights, the model dtype, the image size, the feature layers, the DPAM
settings and the global head. Entries from another backbone, size, layer set or file
content are therefore never used. Disk entries are written atomically with a SHA-256 of
their tensors, verified when read; a damaged one is recomputed, saying why. A disk that
fills up stops the disk cache (with one warning), never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomalyclip.backbone.clip import CLIP
from anomalyclip.decoding import current_settings, decoding_as
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP, ImageEmbeddings
from anomalyclip.preprocess import load_image
from anomalyclip.utils.atomic import WriteFailedError, atomic_torch_save, atomic_write_json
from anomalyclip.utils.hashing import file_digest
from anomalyclip.utils.safe_load import SafeLoadError, safe_torch_load

logger = logging.getLogger(__name__)

ENTRY_FORMAT = "anomalyclip-features"
ENTRY_VERSION = 2  # 2: entries carry a checksum of their tensors
DEFAULT_MEMORY_LIMIT = 4 * 2**30
LOADER_THREADS = min(8, os.cpu_count() or 1)

_weights_fingerprints: weakref.WeakKeyDictionary[CLIP, str] = weakref.WeakKeyDictionary()


def weights_fingerprint(clip: CLIP) -> str:
    """SHA-256 over the visual tower's tensors (names, dtypes, shapes, bytes); memoised."""
    if clip not in _weights_fingerprints:
        _weights_fingerprints[clip] = tensors_sha256(sorted(clip.visual.state_dict().items()))
    return _weights_fingerprints[clip]


def tensors_sha256(tensors: Sequence[tuple[str, Tensor]]) -> str:
    """SHA-256 over named tensors: names, dtypes, shapes and bytes, in the order given."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything besides the image's bytes that its embeddings depend on."""

    architecture: str  # JSON of the CLIPArchitecture
    weights: str
    dtype: str
    image_size: int
    layers: tuple[int, ...]
    dpam_layers: int
    dpam_mode: str
    global_head: str
    storage: str  # dtype entries are stored in

    @classmethod
    def for_model(
        cls, model: AnomalyCLIP, weights: str | None = None, storage: torch.dtype = torch.float32
    ) -> CacheKey:
        config = model.config
        return cls(
            architecture=json.dumps(model.clip.arch.to_dict(), sort_keys=True),
            weights=weights or weights_fingerprint(model.clip),
            dtype=str(model.dtype),
            image_size=config.image_size,
            layers=tuple(sorted(config.features)),
            dpam_layers=config.dpam_layers,
            dpam_mode=config.dpam_mode if config.dpam_layers else "-",
            global_head=config.global_head,
            storage=str(storage),
        )

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    computed: int = 0


class FeatureCache:
    """Per-image embeddings for one model configuration, in memory and/or on disk.

    ``memory_limit`` bounds the in-memory part (bytes; None: unbounded); beyond it,
    images are read from disk or recomputed. ``directory`` None keeps nothing on disk.
    ``storage_dtype`` float16 halves memory and disk at the cost of exactness; it is off
    by default. In-memory entries live on ``memory_device`` (default: the model's, so a
    GPU run does not copy them back every epoch). With ``memory=False`` and no directory
    the cache only loads and encodes, which is what an uncached run does.
    """

    def __init__(
        self,
        model: AnomalyCLIP,
        directory: str | Path | None = None,
        *,
        memory: bool = True,
        memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
        weights: str | None = None,
        storage_dtype: torch.dtype = torch.float32,
        memory_device: str | torch.device | None = None,
    ) -> None:
        if storage_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"storage_dtype must be float32 or float16, got {storage_dtype}")
        self.model = model
        self.memory = memory
        self.memory_limit = memory_limit
        self.storage_dtype = storage_dtype
        self.memory_device = torch.device(memory_device) if memory_device is not None else None
        self.stats = CacheStats()
        self._entries: dict[str, dict[str, Any]] = {}
        self._memory_bytes = 0
        self._memory_full_logged = False
        self._disk_writable = True
        self.key: CacheKey | None = None
        self.directory: Path | None = None
        if directory is not None:
            root = Path(directory)
            if root.exists() and not root.is_dir():
                raise NotADirectoryError(
                    f"the feature cache {root} is a file, not a folder: give a folder "
                    "(its entries are files kept inside it)"
                )
            self.key = CacheKey.for_model(model, weights, storage_dtype)
            self.directory = root / self.key.digest[:20]
            description = self.directory / "key.json"
            if not description.is_file():
                try:
                    atomic_write_json(description, {**asdict(self.key), "digest": self.key.digest})
                except WriteFailedError as error:
                    self._stop_writing(error)

    @property
    def enabled(self) -> bool:
        return self.memory or self.directory is not None

    def _entry_path(self, content: str) -> Path:
        assert self.directory is not None
        return self.directory / content[:2] / f"{content}.pt"

    # one entry ------------------------------------------------------------------------

    def _read_disk(self, content: str) -> dict[str, Any] | None:
        assert self.key is not None  # a disk cache is only made with a key
        path = self._entry_path(content)
        if not path.is_file():
            return None
        try:  # the shared safe loader: no pickled code, bounded unpickling, one-line reasons
            data = safe_torch_load(path, "feature cache entry")
        except SafeLoadError as error:
            logger.warning("%s; recomputing", error)
            return None
        try:
            valid = (
                isinstance(data, dict)
                and data.get("format") == ENTRY_FORMAT
                and data.get("key") == self.key.digest
                and data.get("content") == content
                and sorted(int(k) for k in data["patch"]) == list(self.key.layers)
            )
            intact = valid and data.get("checksum") == entry_checksum(data)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
            valid = intact = False  # the right format's name on the wrong structure
        if not valid:
            logger.warning("feature cache entry %s does not match its key; recomputing", path)
            return None
        if not intact:
            logger.warning("feature cache entry %s: checksum mismatch; recomputing", path)
            return None
        return data

    def _write_disk(self, content: str, entry: dict[str, Any]) -> None:
        if not self._disk_writable:
            return
        assert self.key is not None  # a disk cache is only made with a key
        record = {"format": ENTRY_FORMAT, "version": ENTRY_VERSION, "key": self.key.digest}
        record.update(content=content, **_moved(entry, torch.device("cpu")))
        record["checksum"] = entry_checksum(record)
        try:
            atomic_torch_save(record, self._entry_path(content))
        except WriteFailedError as error:  # a full disk included, whatever torch's writer said
            self._stop_writing(error)

    def _stop_writing(self, error: WriteFailedError) -> None:
        """A failed write ends the disk cache for this run, never the run: one warning."""
        self._disk_writable = False
        logger.warning(
            "feature cache disabled for the rest of this run: %s; embeddings are computed "
            "as needed (cached entries are still read)",
            error,
        )

    def _remember(self, content: str, entry: dict[str, Any]) -> None:
        if not self.memory:
            return
        size = sum(t.numel() * t.element_size() for t in _tensors(entry))
        if self.memory_limit is not None and self._memory_bytes + size > self.memory_limit:
            if not self._memory_full_logged:
                logger.warning(
                    "in-memory feature cache is full (%.1f GiB): further images are %s",
                    self.memory_limit / 2**30,
                    "read from disk" if self.directory else "recomputed every epoch",
                )
                self._memory_full_logged = True
            return
        self._entries[content] = _moved(entry, self.memory_device or self.model.device)
        self._memory_bytes += size

    # batches --------------------------------------------------------------------------

    def embeddings(
        self, images: Sequence[str | Path], encode_batch_size: int = 1
    ) -> ImageEmbeddings:
        """Embeddings of image files in order, computing only those not cached.

        Missing images are encoded ``encode_batch_size`` at a time. The default of one
        makes every image's embeddings independent of which images share its batch, so
        cached, recomputed and resumed runs agree bit for bit (some kernels round
        differently by batch size).
        """
        if encode_batch_size < 1:
            raise ValueError(f"encode_batch_size must be >= 1, got {encode_batch_size}")
        contents = [file_digest(path, "sha1") for path in images] if self.enabled else []
        entries: list[dict[str, Any] | None] = [None] * len(images)
        missing: list[int] = []
        for index in range(len(images)):
            content = contents[index] if self.enabled else None
            entry = self._entries.get(content) if content is not None else None
            if entry is not None:
                self.stats.memory_hits += 1
            elif content is not None and self.directory is not None:
                entry = self._read_disk(content)
                if entry is not None:
                    self.stats.disk_hits += 1
                    self._remember(content, entry)
            if entry is None:
                missing.append(index)
            entries[index] = entry
        pixels = self._load([images[i] for i in missing])
        for start in range(0, len(missing), encode_batch_size):
            chunk = missing[start : start + encode_batch_size]
            computed = self._encode(torch.stack(pixels[start : start + len(chunk)]))
            self.stats.computed += len(chunk)
            for index, entry in zip(chunk, computed, strict=True):
                entries[index] = entry
                if self.enabled:
                    content = contents[index]
                    if self.directory is not None:
                        self._write_disk(content, entry)
                    self._remember(content, entry)
        return _stack(entries, self.model.device)

    def _load(self, images: Sequence[str | Path]) -> list[Tensor]:
        """Preprocessed images, decoded in threads (PIL releases the GIL while decoding)."""
        preprocessor = self.model.preprocessor
        settings = current_settings()  # the run's decoding, which threads do not inherit

        def load(path: str | Path) -> Tensor:
            with decoding_as(settings):
                return preprocessor.tensor(load_image(path))

        if len(images) < 2:
            return [load(path) for path in images]
        with ThreadPoolExecutor(max_workers=min(len(images), LOADER_THREADS)) as pool:
            return list(pool.map(load, images))

    def _encode(self, batch: Tensor) -> list[dict[str, Any]]:
        """One entry per image, on the model's device in the storage dtype."""
        embeddings = self.model.encode_image(batch.to(self.model.device, self.model.dtype))
        store = self.storage_dtype
        return [
            {
                "global": embeddings.global_embedding[i].to(dtype=store).clone(),
                "patch": {
                    str(layer): tokens[i].to(dtype=store).clone()
                    for layer, tokens in embeddings.patch_tokens.items()
                },
                "grid": list(embeddings.grid),
            }
            for i in range(batch.shape[0])
        ]


def entry_checksum(entry: dict[str, Any]) -> str:
    """SHA-256 over an entry's tensors (layer, dtype, shape, bytes): catches bytes that
    changed on disk but still unpickle (values of 1e31 fed into training)."""
    tensors = [("global", entry["global"])]
    tensors += [(str(layer), entry["patch"][layer]) for layer in sorted(entry["patch"])]
    return tensors_sha256(tensors)


def _tensors(entry: dict[str, Any]) -> list[Tensor]:
    return [entry["global"], *entry["patch"].values()]


def _moved(entry: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        **entry,
        "global": entry["global"].to(device),
        "patch": {layer: tokens.to(device) for layer, tokens in entry["patch"].items()},
    }


def _stack(entries: Sequence[dict[str, Any] | None], device: torch.device) -> ImageEmbeddings:
    """A batch in float32 on ``device`` from per-image entries (wherever they are kept)."""
    present = [entry for entry in entries if entry is not None]
    assert len(present) == len(entries), "every image's entry is computed before stacking"
    entries = present
    layers = sorted(int(layer) for layer in entries[0]["patch"])

    def stacked(tensors: list[Tensor]) -> Tensor:
        return torch.stack([t.to(device) for t in tensors]).to(torch.float32)

    return ImageEmbeddings(
        stacked([e["global"] for e in entries]),
        {layer: stacked([e["patch"][str(layer)] for e in entries]) for layer in layers},
        tuple(entries[0]["grid"]),
    )


class CachedScoring:
    """AnomalyCLIP scoring files by path: each image encoded once (through the feature
    cache, which can keep the embeddings on disk for later runs with other prompts), the
    text side computed once per class name. The evaluation's engine for the bare model."""

    def __init__(self, model: AnomalyCLIP, cache: FeatureCache) -> None:
        self.model = model
        self.cache = cache

    def score_paths(
        self, paths: Sequence[str | Path], category: str
    ) -> tuple[np.ndarray, np.ndarray]:
        model = self.model
        name = category.replace("_", " ").strip() or model.config.object_name
        with torch.no_grad():
            text = model.text_features(name)  # cached while the prompts do not change
            embeddings = self.cache.embeddings([Path(p) for p in paths], len(paths))
            output = model.score(embeddings, text)
        return output.image_scores.double().cpu().numpy(), output.anomaly_maps.float().cpu().numpy()


def cached_scorer(
    predictor: Any, directory: str | Path | None, memory_limit: int | None
) -> CachedScoring | None:
    """The bare AnomalyCLIP's path engine (another predictor of its name, such as the
    exported model or the few-shot one, scores decoded images instead)."""
    if not isinstance(predictor, AnomalyCLIP):
        return None
    cache = FeatureCache(
        predictor,
        directory,
        memory=False,
        memory_limit=DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit,
        weights=predictor.backbone.sha256,
    )
    return CachedScoring(predictor, cache)
