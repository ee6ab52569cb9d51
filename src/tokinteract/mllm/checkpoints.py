"""Checkpoint folders of the reference trainer: which are complete, which is the newest, and
whether an output directory already holds a run.

A checkpoint is written by :class:`tokinteract.mllm.reliability.ReliableTrainerMixin` into
``tmp-checkpoint-<step>`` and renamed to ``checkpoint-<step>`` once every file is written, so
a ``checkpoint-<step>`` folder is complete unless something else wrote it (an older version of
the trainer, a copy interrupted half-way). :func:`checkpoint_problem` still checks the files a
resume reads; :func:`latest_checkpoint` returns the newest folder without a problem and logs
every folder it skips (``tmp-checkpoint-*`` leftovers of a killed save included).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

__all__ = [
    "STAGING_PREFIX",
    "OutputDirError",
    "check_output_dir",
    "checkpoint_problem",
    "existing_run_files",
    "latest_checkpoint",
    "list_checkpoints",
]

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-checkpoint-"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_STAGING = re.compile(r"^" + re.escape(STAGING_PREFIX) + r"(\d+)$")
_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin",
)
_FINAL_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors", "trainer_state.json",
)


class OutputDirError(ValueError):
    """The output directory cannot be used as asked (it holds a run, or it is not writable)."""


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder under ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is complete.

    Complete: ``trainer_state.json`` (written last by the Trainer) and the weights (one of the
    ``save_pretrained`` files, or a DeepSpeed ``global_step*`` folder) are present.
    """
    p = Path(path)
    if not p.is_dir():
        return "is not a folder"
    if not (p / "trainer_state.json").is_file():
        return "has no trainer_state.json (the save did not finish)"
    has_weights = any((p / f).is_file() for f in _WEIGHTS) or any(
        q.is_dir() and q.name.startswith("global_step") for q in p.iterdir()
    )
    if not has_weights:
        return "has no model weights (the save did not finish)"
    return None


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``checkpoint-<step>`` under ``output_dir`` (None when there is none).

    Incomplete checkpoint folders and ``tmp-checkpoint-*`` leftovers of an interrupted save are
    logged as warnings and skipped.
    """
    root = Path(output_dir)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if _STAGING.match(p.name):
                logger.warning("ignoring %s: an interrupted checkpoint save (never completed)", p)
    for step, path in reversed(list_checkpoints(output_dir)):
        why = checkpoint_problem(path)
        if why is None:
            return path
        logger.warning("ignoring incomplete checkpoint %s: it %s", path, why)
    return None


def existing_run_files(output_dir: str | os.PathLike[str]) -> list[Path]:
    """What an earlier run left under ``output_dir``: checkpoint folders (complete or not,
    staging leftovers included) and a final model or trainer state."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in sorted(root.iterdir()) if _CKPT.match(p.name) or _STAGING.match(p.name)]
    found += [root / f for f in _FINAL_FILES if (root / f).exists()]
    return found


def check_output_dir(output_dir: str | os.PathLike[str], *, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier one.

    Args:
        output_dir: the run's ``output_dir``.
        resuming: a ``resume_from_checkpoint`` is given (the earlier run is continued).
        overwrite: ``overwrite_output_dir``: delete the earlier run's checkpoints and final files
            (on the calling process: call it on the main process only) and start again.

    Raises:
        OutputDirError: ``output_dir`` holds checkpoints or a final model and neither
            ``resuming`` nor ``overwrite`` is set.
    """
    if resuming:
        return
    found = existing_run_files(output_dir)
    if not found:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "")
        raise OutputDirError(
            f"output_dir {str(output_dir)!r} already holds a run ({names}); pass resume_from_checkpoint=last "
            "to continue it, overwrite_output_dir=true to delete it and start again, or another output_dir"
        )
    for p in found:
        logger.warning("overwrite_output_dir: deleting %s of an earlier run", p)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
