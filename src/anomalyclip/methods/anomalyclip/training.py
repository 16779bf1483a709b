"""Training AnomalyCLIP's prompts on an auxiliary dataset, as the paper does.

Defaults are the paper's: Adam (lr 1e-3, betas (0.5, 0.999)), batch 8, 15 epochs, seed
111, lambda 4, 518 px. Only the prompt learner has gradients; the CLIP backbone is frozen
and checked to stay so.

Reproducibility: the sample order of epoch ``e`` comes from a generator seeded with
``seed + e``, and each epoch's checkpoint holds the optimiser state, so a run resumed
from any epoch continues exactly as the uninterrupted run would: bit for bit on CPU, and
on CUDA after :func:`make_deterministic`.
Image embeddings come from a
:class:`~anomalyclip.methods.anomalyclip.embedding_cache.FeatureCache`, so they are
computed once per image rather than once per epoch.

Under ``torchrun`` (an initialised process group, see :mod:`anomalyclip.distributed`) the
same call trains with several processes and gives the single-process result to float
tolerance. Every rank draws the same batches; image ``i`` belongs to rank ``i mod
world``, which encodes and caches only its own images and computes their part of each
batch's loss, weighted so that DistributedDataParallel's gradient average is the gradient
of the whole batch's mean. Adam then takes the same step on every rank. Only rank 0
writes checkpoints and logs; a resumed run reads the checkpoint on rank 0 and sends it
to the others, so only rank 0's machine needs the output folder.

Files in the output folder: ``epoch_<n>.pt`` after every epoch, written, verified and
chosen for a resume by :mod:`anomalyclip.methods.anomalyclip.training_checkpoints`;
``train_log.csv`` and
``train_log.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomalyclip import distributed
from anomalyclip.data.core import AnomalyDataset, Sample
from anomalyclip.methods.anomalyclip.checkpoint import PromptCheckpoint, apply_prompt_state
from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
from anomalyclip.methods.anomalyclip.embedding_cache import FeatureCache
from anomalyclip.methods.anomalyclip.losses import local_loss
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP, ImageEmbeddings
from anomalyclip.methods.anomalyclip.training_checkpoints import (
    find_checkpoints,
    latest_intact,
    save_epoch,
)
from anomalyclip.preprocess import PreProcessor
from anomalyclip.utils.atomic import atomic_write_json, atomic_write_text
from anomalyclip.utils.csv_cells import csv_cell

logger = logging.getLogger(__name__)

LOSSES = ("glocal", "global", "local")
LOG_FIELDS = ("epoch", "loss", "image_loss", "local_loss", "seconds", "images_encoded")


@dataclass(frozen=True)
class TrainOptions:
    """The optimisation settings; all but ``epochs`` must match when a run is resumed."""

    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    lam: float = 4.0
    seed: int = 111
    loss: str = "glocal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.lam < 0:
            problems.append(f"lam must be >= 0, got {self.lam}")
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data


@dataclass
class EpochLog:
    epoch: int
    loss: float
    image_loss: float | None
    local_loss: float | None
    seconds: float
    images_encoded: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path | None  # the last epoch's checkpoint
    history: list[EpochLog] = field(default_factory=list)
    resumed_from: int = 0  # epochs already done when this run started


@dataclass
class BatchLoss:
    total: Tensor
    image: Tensor | None
    local: Tensor | None


def make_deterministic() -> None:
    """Deterministic CUDA kernels for this process, so GPU runs also repeat bit for bit.

    CPU runs are deterministic anyway. On CUDA some kernels (cuBLAS, the attention
    backward) otherwise accumulate in a varying order, so runs differ in the last bits;
    an operation without a deterministic kernel then raises instead. Call it before the
    first CUDA operation: cuBLAS reads its workspace setting at start-up.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def object_name(sample: Sample, config: AnomalyCLIPConfig) -> str:
    """The class name object-aware prompts use for a sample (``metal_nut`` -> ``metal nut``)."""
    return sample.category.replace("_", " ").strip() or config.object_name


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """Identifies the training set (paths, labels, masks) so a resume cannot switch data."""
    digest = hashlib.sha256()
    for sample in samples:
        image = os.path.abspath(sample.image)
        mask = os.path.abspath(sample.mask) if sample.mask else ""
        digest.update(f"{image}|{sample.label}|{mask}|{sample.category}\n".encode())
    return digest.hexdigest()


def select_embeddings(embeddings: ImageEmbeddings, indices: Sequence[int]) -> ImageEmbeddings:
    index = torch.as_tensor(list(indices), device=embeddings.global_embedding.device)
    return ImageEmbeddings(
        embeddings.global_embedding.index_select(0, index),
        {k: v.index_select(0, index) for k, v in embeddings.patch_tokens.items()},
        embeddings.grid,
    )


def batch_loss(
    model: AnomalyCLIP,
    embeddings: ImageEmbeddings,
    labels: Tensor,
    masks: Tensor,
    pixel_truth: Sequence[bool],
    names: Sequence[str] | None,
    loss: str = "glocal",
    lam: float = 4.0,
) -> BatchLoss:
    """The glocal loss of one batch, exactly as the original's where it applies.

    Images whose pixels are unknown (no mask) count in the global term only; with
    object-aware prompts (``names`` given) each class uses its own text features. Both
    are weighted so that the result is the mean over the batch: with one class and masks
    for every image it equals :func:`anomalyclip.methods.anomalyclip.losses.glocal_loss`.
    """
    batch = labels.shape[0]
    groups: dict[str | None, list[int]] = {}
    for index in range(batch):
        groups.setdefault(names[index] if names is not None else None, []).append(index)
    image_term: Tensor | None = None
    local_term: Tensor | None = None
    for name, indices in groups.items():
        text = model.compute_text_features(name)
        whole = len(indices) == batch
        group = embeddings if whole else select_embeddings(embeddings, indices)
        if loss in ("glocal", "global"):
            logits = model.image_logits(group, text)
            term = F.cross_entropy(logits, labels[indices].long())
            term = term if whole else term * (len(indices) / batch)
            image_term = term if image_term is None else image_term + term
        known = [i for i in indices if pixel_truth[i]]
        if loss in ("glocal", "local") and known and lam > 0:
            subset = group if len(known) == len(indices) else select_embeddings(embeddings, known)
            size = (masks.shape[-2], masks.shape[-1])
            probabilities = model.layer_probabilities(subset, text, size)
            term = lam * local_loss(probabilities, masks[known].to(text.dtype))
            term = term if len(known) == batch else term * (len(known) / batch)
            local_term = term if local_term is None else local_term + term
    parts = [t for t in (image_term, local_term) if t is not None]
    if not parts:
        raise ValueError(f"the {loss!r} loss has no term for this batch (no masks)")
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return BatchLoss(total, image_term, local_term)


class MaskStore:
    """Masks at model resolution, loaded once and kept as booleans when caching."""

    def __init__(self, preprocessor: PreProcessor, keep: bool) -> None:
        self.preprocessor = preprocessor
        self.size = preprocessor.size
        self.keep = keep
        self._masks: dict[Path, Tensor] = {}

    def get(self, sample: Sample) -> Tensor:
        if sample.label == 0 or sample.mask is None:
            return torch.zeros(self.size, self.size)
        mask = self._masks.get(sample.mask)
        if mask is None:
            mask = self.preprocessor.load_mask(sample.mask).bool()
            if self.keep:
                self._masks[sample.mask] = mask
        return mask.float()


def _differences(
    recorded: dict[str, Any], current: dict[str, Any], ignore: Sequence[str] = ()
) -> list[str]:
    keys = sorted((set(recorded) | set(current)) - set(ignore))
    return [
        f"{k}: checkpoint {recorded.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if json.dumps(recorded.get(k)) != json.dumps(current.get(k))
    ]


def write_logs(output_dir: Path, history: Sequence[EpochLog], header: dict[str, Any]) -> None:
    """``train_log.csv`` (one row per epoch) and ``train_log.json`` (with the settings)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    for entry in history:
        writer.writerow(
            {
                k: ("" if v is None else csv_cell(v))
                for k, v in entry.to_dict().items()
                if k in LOG_FIELDS
            }
        )
    atomic_write_text(output_dir / "train_log.csv", buffer.getvalue())
    atomic_write_json(
        output_dir / "train_log.json", {**header, "epochs": [e.to_dict() for e in history]}
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _trainable_parameters(model: AnomalyCLIP) -> list[Tensor]:
    """The prompt parameters, after checking that nothing else can learn."""
    if model.config.text_prompts != "learned":
        raise ValueError(
            f"text_prompts={model.config.text_prompts!r} is a hand-written baseline: "
            "there is nothing to train"
        )
    trainable = [name for name, p in model.clip.named_parameters() if p.requires_grad]
    if trainable:
        raise RuntimeError(f"the CLIP backbone must be frozen; trainable: {trainable[:3]}")
    parameters: list[Tensor] = [p for p in model.prompt_learner.parameters() if p.requires_grad]
    if not parameters:
        raise RuntimeError("the prompt learner has no trainable parameters")
    return parameters


def effective_loss(loss: str, pixel_truth: Sequence[bool]) -> str:
    """The loss that is actually trained: glocal without any mask is the global loss."""
    return "global" if loss == "glocal" and not any(pixel_truth) else loss


def _check_pixel_truth(dataset: AnomalyDataset, pixel_truth: list[bool], loss: str) -> None:
    """Say which loss images without masks get; refuse a local loss with no masks at all."""
    known = sum(pixel_truth)
    if known == 0 and loss == "local":
        raise ValueError(
            f"{dataset.name} has no pixel ground truth (masks): the local loss cannot be "
            "trained on it"
        )
    if known == 0 and loss == "glocal":
        logger.warning(
            "%s has no masks: training on image-level labels only: global loss", dataset.name
        )
    elif 0 < known < len(pixel_truth):
        logger.warning(
            "%d of %d images have no pixel ground truth: they count in the global loss only",
            len(pixel_truth) - known,
            len(pixel_truth),
        )


def _resume(
    model: AnomalyCLIP,
    optimizer: torch.optim.Optimizer,
    checkpoint: PromptCheckpoint,
    options: TrainOptions,
    fingerprint: str,
) -> list[EpochLog]:
    """Load prompts, optimiser and RNG state of a run's checkpoint; its epoch history."""
    extra = checkpoint.extra
    if checkpoint.config is None or "optimizer" not in extra:
        raise ValueError(f"{checkpoint.path} is not a training checkpoint of anomalyclip train")
    problems = _differences(
        checkpoint.config.to_dict(), model.config.to_dict(), ignore=("backbone",)
    )
    problems += _differences(extra.get("options", {}), options.to_dict(), ignore=("epochs",))
    if extra.get("dataset_fingerprint") != fingerprint:
        problems.append("the training images differ from those of the checkpoint")
    if problems:
        raise ValueError(f"cannot resume from {checkpoint.path}: " + "; ".join(problems))
    apply_prompt_state(model, checkpoint)
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"]["torch"])
    return [EpochLog(**entry) for entry in extra.get("history", [])]


class _PromptGradients(nn.Module):
    """What DistributedDataParallel wraps: the prompts and one rank's part of a batch.

    The backbone stays outside this module, so DDP neither broadcasts nor watches its
    frozen weights; only the prompt parameters' gradients are averaged.
    """

    def __init__(self, epochs: _Epochs) -> None:
        super().__init__()
        self.prompt_learner = epochs.model.prompt_learner
        self.epochs = epochs

    def forward(self, mine: list[int], batch_size: int) -> tuple[Tensor, list[float]]:
        """The loss to back-propagate and this rank's share of the logged terms.

        ``batch_loss`` is the mean over this rank's images; scaled by ``len(mine) * world
        / batch_size``, its average over ranks is the mean over the whole batch. A rank
        with nothing to learn from in this batch still takes part, with a zero loss.
        """
        epochs = self.epochs
        if not mine or (
            epochs.options.loss == "local" and not any(epochs.pixel_truth[i] for i in mine)
        ):
            # a Tensor: the prompt learner always has parameters (ctx_pos, ctx_neg)
            total = cast(Tensor, sum(p.sum() for p in self.prompt_learner.parameters()))
            zero = total * 0.0
            return zero, [0.0] * 5
        losses = epochs.losses(mine)
        share = len(mine) / batch_size
        terms = [losses.total, losses.image, losses.local]
        values = [0.0 if t is None else t.item() * share for t in terms]
        present = [float(losses.image is not None), float(losses.local is not None)]
        return losses.total * (share * distributed.world_size()), values + present


@dataclass
class _Epochs:
    """What every epoch of one run uses."""

    model: AnomalyCLIP
    samples: list[Sample]
    pixel_truth: list[bool]
    names: list[str] | None  # object-aware prompts: each sample's class name
    optimizer: torch.optim.Optimizer
    cache: FeatureCache
    masks: MaskStore
    options: TrainOptions
    encode_batch_size: int
    progress: bool
    parallel: nn.Module | None = None  # DDP around _PromptGradients, in a distributed run

    def order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``, from the seed alone, so a resume repeats it."""
        generator = torch.Generator().manual_seed(self.options.seed + epoch)
        return torch.randperm(len(self.samples), generator=generator).tolist()

    def losses(self, indices: list[int]) -> BatchLoss:
        """The loss of the samples ``indices``, as one batch."""
        chosen = [self.samples[i] for i in indices]
        device = self.model.device
        return batch_loss(
            self.model,
            self.cache.embeddings([s.image for s in chosen], self.encode_batch_size),
            torch.tensor([s.label for s in chosen], device=device),
            torch.stack([self.masks.get(s) for s in chosen]).to(device),
            [self.pixel_truth[i] for i in indices],
            [self.names[i] for i in indices] if self.names is not None else None,
            self.options.loss,
            self.options.lam,
        )

    def step(self, indices: list[int]) -> BatchLoss:
        if self.parallel is not None:
            return self.distributed_step(indices)
        losses = self.losses(indices)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        self.optimizer.step()
        return losses

    def distributed_step(self, indices: list[int]) -> BatchLoss:
        """This rank's images of the batch; the batch's loss terms summed over ranks."""
        assert self.parallel is not None
        mine = [i for i in indices if distributed.owner(i) == distributed.rank()]
        self.optimizer.zero_grad(set_to_none=True)
        loss, shares = self.parallel(mine, len(indices))
        loss.backward()
        self.optimizer.step()
        total, image, local, has_image, has_local = distributed.sum_across_ranks(shares)
        return BatchLoss(
            torch.tensor(total, dtype=torch.float64),
            torch.tensor(image, dtype=torch.float64) if has_image else None,
            torch.tensor(local, dtype=torch.float64) if has_local else None,
        )

    def run(self, epoch: int) -> EpochLog:
        from tqdm.auto import tqdm

        options = self.options
        started = time.perf_counter()
        computed_before = self.cache.stats.computed
        order = self.order(epoch)
        totals: list[float] = []
        image_losses: list[float] = []
        local_losses: list[float] = []
        bar = tqdm(
            range(0, len(order), options.batch_size),
            desc=f"epoch {epoch}/{options.epochs}",
            unit="batch",
            disable=not (self.progress and distributed.is_main_process()),
        )
        for start in bar:
            indices = order[start : start + options.batch_size]
            if options.loss == "local" and not any(self.pixel_truth[i] for i in indices):
                continue  # nothing for the local loss to learn from in this batch
            losses = self.step(indices)
            totals.append(losses.total.item())
            if losses.image is not None:
                image_losses.append(losses.image.item())
            if losses.local is not None:
                local_losses.append(losses.local.item())
            bar.set_postfix(loss=f"{totals[-1]:.4f}")
        bar.close()
        if any(p.grad is not None for p in self.model.clip.parameters()):
            raise RuntimeError("a backbone parameter received a gradient")
        if self.parallel is not None:
            _check_ranks_agree(self.model, epoch)
        if not math.isfinite(sum(totals)):
            raise FloatingPointError(f"epoch {epoch}: the loss is not finite ({totals})")
        (encoded,) = distributed.sum_across_ranks([self.cache.stats.computed - computed_before])
        return EpochLog(
            epoch=epoch,
            loss=sum(totals) / len(totals),
            image_loss=_mean(image_losses),
            local_loss=_mean(local_losses),
            seconds=round(time.perf_counter() - started, 4),
            images_encoded=int(encoded),
        )


def _resume_point(
    model: AnomalyCLIP,
    optimizer: torch.optim.Optimizer,
    output_dir: Path,
    options: TrainOptions,
    fingerprint: str,
    resume: bool,
) -> TrainResult:
    """Where the run starts: after the newest intact checkpoint in ``output_dir`` (its
    prompts, optimiser and history restored) when resuming, else at epoch 1. A folder
    that holds checkpoints is never trained into afresh."""
    history: list[EpochLog] = []
    existing = distributed.run_on_main(lambda: find_checkpoints(output_dir))
    if existing and not resume:
        raise FileExistsError(
            f"{output_dir} already holds checkpoints ({existing[max(existing)].name}); resume "
            "the run or choose another output folder"
        )
    found = distributed.run_on_main(lambda: latest_intact(existing)) if existing else None
    last_checkpoint = Path(found[1].path) if found is not None else None
    if found is not None:
        history = _resume(model, optimizer, found[1], options, fingerprint)
        logger.info("resuming from %s (epoch %d done)", last_checkpoint, found[0])
    elif resume:
        logger.info("nothing to resume in %s: starting from epoch 1", output_dir)
    done = found[0] if found is not None else 0
    return TrainResult(output_dir, last_checkpoint, history, done)


def train(
    model: AnomalyCLIP,
    dataset: AnomalyDataset,
    output_dir: str | Path,
    options: TrainOptions | None = None,
    *,
    resume: bool = False,
    cache: FeatureCache | None = None,
    encode_batch_size: int = 1,
    progress: bool = True,
) -> TrainResult:
    """Train the prompts of ``model`` on ``dataset``; checkpoints and logs go to ``output_dir``.

    ``cache`` defaults to an in-memory feature cache; pass
    ``FeatureCache(model, memory=False)`` to recompute the embeddings every epoch, or one
    with a ``directory`` to keep them between runs. ``resume`` continues from the last
    complete epoch in ``output_dir`` (the same model configuration, options and data are
    required; ``epochs`` may grow). ``encode_batch_size`` images are encoded together
    (see :meth:`FeatureCache.embeddings`).

    In a process group of several ranks (``torchrun``), each rank trains on its share of
    every batch and only rank 0 writes; call it on every rank with the same arguments.
    """
    options = options or TrainOptions()
    output_dir = Path(output_dir)
    samples = list(dataset.samples)
    if not samples:
        raise ValueError(f"{dataset.name}: no images to train on")
    optimizer = torch.optim.Adam(_trainable_parameters(model), lr=options.lr, betas=options.betas)
    pixel_truth = [dataset.has_pixel_truth(sample) for sample in samples]
    _check_pixel_truth(dataset, pixel_truth, options.loss)
    fingerprint = dataset_fingerprint(samples)

    result = _resume_point(model, optimizer, output_dir, options, fingerprint, resume)
    history, start_epoch = result.history, result.resumed_from + 1
    if start_epoch > options.epochs:
        logger.info("all %d epochs are done already", options.epochs)
        return result

    cache = cache if cache is not None else FeatureCache(model)
    aware = model.config.prompt_mode == "aware"
    epochs = _Epochs(
        model=model,
        samples=samples,
        pixel_truth=pixel_truth,
        names=[object_name(s, model.config) for s in samples] if aware else None,
        optimizer=optimizer,
        cache=cache,
        masks=MaskStore(model.preprocessor, keep=cache.memory),
        options=options,
        encode_batch_size=encode_batch_size,
        progress=progress,
    )
    if distributed.is_distributed():
        epochs.parallel = _data_parallel(epochs)
    header = {
        "dataset": {"name": dataset.name, "root": str(dataset.root), "split": dataset.split},
        "dataset_fingerprint": fingerprint,
        **{"images": len(samples), "images_with_masks": sum(pixel_truth)},
        **{"config": model.config.to_dict(), "options": options.to_dict()},
    }
    main = distributed.is_main_process()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "training on %s: %d images (%d with pixel truth), %s loss, epochs %d..%d",
        *(dataset.name, len(samples), sum(pixel_truth)),
        *(effective_loss(options.loss, pixel_truth), start_epoch, options.epochs),
    )

    def save(epoch: int) -> Path:
        """Rank 0 writes the epoch's checkpoint and logs; a failed write stops every rank."""
        extra = {
            "epoch": epoch,
            "options": options.to_dict(),
            "dataset_fingerprint": fingerprint,
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "history": [e.to_dict() for e in history],
        }
        return save_epoch(
            model,
            output_dir,
            epoch,
            extra,
            result.checkpoint,
            functools.partial(write_logs, output_dir, history, header),
        )

    try:
        for epoch in range(start_epoch, options.epochs + 1):
            entry = epochs.run(epoch)
            history.append(entry)
            result.checkpoint = distributed.run_on_main(functools.partial(save, epoch))
            _log_epoch(entry, options.epochs)
    finally:
        epochs.parallel = None  # releases DDP's hooks on the prompt parameters
    distributed.barrier()  # every rank returns once the last checkpoint is written
    return result


def prompt_digest(model: AnomalyCLIP) -> str:
    """SHA-256 of the prompt parameters' bytes: equal digests, bit-identical prompts."""
    digest = hashlib.sha256()
    for name, parameter in model.prompt_learner.named_parameters():
        data = parameter.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_ranks_agree(model: AnomalyCLIP, epoch: int) -> None:
    """Every rank must hold the very prompts rank 0 saves; anything else is a bug."""
    digests = distributed.all_gather(prompt_digest(model))
    if len(set(digests)) > 1:
        raise RuntimeError(f"epoch {epoch}: the ranks' prompts have diverged ({digests})")


def _data_parallel(epochs: _Epochs) -> nn.Module:
    """DDP around the prompts; building it copies rank 0's prompts to every rank."""
    from torch.nn.parallel import DistributedDataParallel

    device = epochs.model.device
    return DistributedDataParallel(
        _PromptGradients(epochs),
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False,  # the prompt buffers are constant token embeddings
    )


def _log_epoch(entry: EpochLog, epochs: int) -> None:
    logger.info(
        "epoch %d/%d: loss %.4f (image %s, local %s) in %.1f s, %d images encoded",
        entry.epoch,
        epochs,
        entry.loss,
        _format(entry.image_loss),
        _format(entry.local_loss),
        entry.seconds,
        entry.images_encoded,
    )
