"""Training checkpoints on disk: write each epoch's, verify them, find the one to resume from.

Kept apart from the training loop (:mod:`anomalyclip.methods.anomalyclip.training`) because this
part is about
files that outlive the process and may come back damaged, not about optimisation: a
full disk during a write, bytes changed on disk after it, a run killed mid-epoch.

Files in the output folder: ``epoch_<n>.pt`` after every epoch (a prompt checkpoint that
``anomalyclip test --checkpoint`` and ``AnomalyCLIP.from_pretrained`` load, with the
optimiser and RNG states and their checksum in its ``extra``). A resume starts from the
newest checkpoint that reads and matches its checksum; newer damaged ones are renamed
``epoch_<n>.pt.damaged``, never deleted. A write that fails (a full disk) stops the run
in one error naming the file; the previous epoch's checkpoint stays complete, as every
write is atomic.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from anomalyclip.methods.anomalyclip.checkpoint import (
    PromptCheckpoint,
    read_checkpoint,
    save_checkpoint,
)
from anomalyclip.methods.anomalyclip.embedding_cache import tensors_sha256
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from anomalyclip.utils.atomic import WriteFailedError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)\.pt$")


def find_checkpoints(output_dir: Path) -> dict[int, Path]:
    """The ``epoch_<n>.pt`` files of ``output_dir`` by epoch, oldest first."""
    found = {}
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match:
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def save_epoch(
    model: AnomalyCLIP,
    output_dir: Path,
    epoch: int,
    extra: dict[str, Any],
    complete: Path | None,
    write_logs: Callable[[], None],
) -> Path:
    """Write ``epoch_<n>.pt`` with ``extra`` and its checksum, then ``write_logs()``.

    ``complete`` is the last complete checkpoint before this epoch. A write that fails
    (a full disk) stops training in one error naming the file and the checkpoint to
    resume from.
    """
    path = output_dir / f"epoch_{epoch}.pt"
    extra["checksum"] = state_checksum(model.prompt_learner.state_dict(), extra)
    try:
        save_checkpoint(path, model, extra=extra)
        complete = path
        write_logs()
    except WriteFailedError as error:
        kept = f"the last complete checkpoint is {complete}" if complete else "none is kept"
        raise WriteFailedError(
            error.filename,
            f"{error.reason}; training stopped after epoch {epoch}, {kept} (make room, "
            "then run again with --resume)",
            error.errno,
        ) from None
    return path


def state_checksum(prompt_state: dict[str, Tensor], extra: dict[str, Any]) -> str:
    """SHA-256 over what a resume loads (prompts, optimiser, RNG): bytes that changed on
    disk but still unpickle would otherwise continue the run from garbage."""
    named = _named_tensors({k: v.detach().float() for k, v in prompt_state.items()}, "prompts")
    named += _named_tensors(extra.get("optimizer"), "optimizer")
    named += _named_tensors(extra.get("rng"), "rng")
    return tensors_sha256(sorted(named, key=lambda item: item[0]))


def _named_tensors(value: Any, name: str) -> list[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        return [(name, value)]
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return []
    return [pair for key, item in items for pair in _named_tensors(item, f"{name}.{key}")]


def latest_intact(checkpoints: dict[int, Path]) -> tuple[int, PromptCheckpoint] | None:
    """The newest checkpoint that reads and matches its checksum, with its epoch.

    A newer damaged one (a disk error, bytes overwritten) is set aside, renamed to
    ``epoch_<n>.pt.damaged`` and never deleted, with a warning naming both files; the
    run then resumes from the previous complete epoch, as a user would ask for anyway.
    None when there are no checkpoints; an error when none of them is intact.
    """
    damaged: list[tuple[Path, str]] = []
    for epoch in sorted(checkpoints, reverse=True):
        path = checkpoints[epoch]
        try:
            checkpoint = read_checkpoint(path)
        except ValueError as error:  # unreadable, truncated, refused or malformed
            damaged.append((path, str(error)))
            continue
        recorded = checkpoint.extra.get("checksum")
        if recorded is not None and recorded != state_checksum(
            checkpoint.prompt_state, checkpoint.extra
        ):
            damaged.append((path, f"{path}: checksum mismatch (its bytes changed on disk)"))
            continue
        for bad, reason in damaged:
            kept = _set_aside(bad)
            logger.warning("%s; resuming from %s instead (kept as %s)", reason, path, kept.name)
        return epoch, checkpoint
    if damaged:
        raise ValueError(
            f"cannot resume: no checkpoint in {damaged[0][0].parent} is intact "
            f"({damaged[0][1]}); move them away to start again"
        )
    return None


def _set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint so that no resume reads it and no epoch overwrites it."""
    for number in range(1, 10_000):
        suffix = ".damaged" if number == 1 else f".damaged-{number}"
        target = path.with_name(path.name + suffix)
        if not target.exists():
            path.rename(target)
            return target
    raise FileExistsError(f"too many damaged copies of {path} beside it")
