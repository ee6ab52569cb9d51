"""Fault handling of the reference trainer (a mixin of :class:`tokinteract.mllm.trainer.DistillationTrainer`).

What it adds to ``transformers.Trainer`` (see the trainer guide's "Faults" section):

* **Resume and output directory** (:meth:`ReliableTrainerMixin.train`):
  ``resume_from_checkpoint=True`` / ``"last"`` resolves to the newest *complete* checkpoint
  (:func:`tokinteract.mllm.checkpoints.latest_checkpoint`); a path that does not exist is
  "not found", an incomplete one is refused; an ``output_dir`` that cannot be written is
  refused before step 1 (:class:`tokinteract.mllm.checkpoints.OutputDirError`); a new run over
  an earlier run's checkpoints or final model is refused unless ``overwrite_output_dir``
  (which deletes them first).
* **Atomic checkpoints** (:meth:`ReliableTrainerMixin._save_checkpoint`): every file is written
  into ``tmp-checkpoint-<step>/checkpoint-<step>``, which is renamed to ``checkpoint-<step>``
  once complete (a rename within one file system is atomic: a process killed at any point
  leaves either no ``checkpoint-<step>`` or a complete one).
* **No non-finite checkpoint**: the weights and the optimizer state are checked before a save;
  a non-finite tensor raises :class:`NonFiniteError` naming it and nothing is written.
* **Non-finite guard** (:meth:`ReliableTrainerMixin._get_grad_norm`, which the Trainer calls
  after the last backward of an optimizer step and before ``optimizer.step()``): if a
  micro-batch's loss or the gradient norm is non-finite, every gradient is set to ``None``
  so ``optimizer.step()`` changes no parameter and no optimizer state (torch optimizers skip
  parameters without a gradient); the step, the loss parts and the parameters with
  non-finite gradients are logged. The learning-rate scheduler still steps, so the schedule
  stays a function of ``global_step`` (a skipped step is a lost step, and a resumed run
  matches an uninterrupted one). After ``max_nonfinite_steps`` skipped steps in a row the
  run saves a checkpoint of the last applied step and stops with :class:`TrainingStopped`.
  The Trainer logs a filtered loss for a skipped step; the next log says
  ``nonfinite_steps_skipped: n`` and the loss parts average over the applied steps' values.
  With a GradScaler (fp16) the scaler already skips steps with non-finite gradients; the
  guard then counts and logs non-finite losses only. Under DeepSpeed the engine owns the
  gradients: the first non-finite step stops the run (without a new checkpoint).
* **Bad samples mid-run** (:meth:`ReliableTrainerMixin.get_batch_samples`): a dataset built with
  ``skip_bad=True`` replaces a sample that fails to load by the next loadable one and reports
  it in the batch; each distinct bad sample is logged with its index, file and reason and
  counted (with those already dropped at construction); when the count exceeds
  ``bad_sample_limit`` of the data file's samples the run saves a checkpoint and stops with
  :class:`TrainingStopped`.

* **Several processes** (DDP, FSDP2, DeepSpeed): every decision is collective
  (:meth:`ReliableTrainerMixin._ranks_with`): a step non-finite on one rank is skipped by all,
  the bad-sample counts are summed over the ranks, a non-finite optimizer state on one rank
  (ZeRO partitions it) makes every rank refuse the save; only the main process renames a
  staged checkpoint, between two barriers.

The mixin reads ``self.distill.max_nonfinite_steps``, ``bad_sample_limit`` and
``overwrite_output_dir`` (:class:`tokinteract.mllm.trainer.DistillationConfig`) and, when
present, the trainer's per-part loss sums ``self._part_sums``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Any

import torch
from torch import nn

from tokinteract.mllm.checkpoints import (
    STAGING_PREFIX,
    OutputDirError,
    check_output_dir,
    checkpoint_problem,
    latest_checkpoint,
)
from tokinteract.mllm.data import SKIPPED_KEY

__all__ = ["NonFiniteError", "ReliableTrainerMixin", "TrainingStopped", "nonfinite_tensors"]

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many bad samples or non-finite steps in a row).

    ``checkpoint`` is the checkpoint of the last applied step (None when nothing was trained
    or it could not be saved)."""

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteError(RuntimeError):
    """A tensor about to be saved holds NaN or infinite values."""


def nonfinite_tensors(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` holding a NaN or an infinity."""
    bad = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def _optimizer_tensors(optimizer: Any) -> dict[str, Any]:
    if optimizer is None:
        return {}
    state = optimizer.state_dict().get("state", {})
    return {f"optimizer.state[{k}].{n}": v for k, s in state.items() for n, v in s.items()}


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ReliableTrainerMixin:
    """Put before ``transformers.Trainer`` in the bases; see the module docstring."""

    # ------------------------------------------------------------ state
    def _reliability_state(self) -> dict[str, Any]:
        st = self.__dict__.get("_rel")
        if st is None:
            st = self.__dict__["_rel"] = {
                "run": 0, "loss_bad": [], "parts_snapshot": {}, "skipped": {}, "nonfinite_steps": [],
            }
        return st

    @property
    def skipped_samples(self) -> dict[int, tuple[str, str]]:
        """Distinct samples skipped during training: ``{index: (file, reason)}``."""
        return self._reliability_state()["skipped"]

    @property
    def nonfinite_steps(self) -> list[str]:
        """One message per optimizer step that was not applied (non-finite loss or gradient)."""
        return self._reliability_state()["nonfinite_steps"]

    # ------------------------------------------------------------ resume / output dir
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        resume = resume_from_checkpoint
        out = self.args.output_dir
        if isinstance(resume, str) and resume.lower() in ("true", "last"):
            resume = True
        if resume is True:
            found = latest_checkpoint(out)
            if found is None:
                raise ValueError(
                    f"resume_from_checkpoint={resume_from_checkpoint!r}: no complete checkpoint-* folder in "
                    f"output_dir {out!r}"
                )
            resume = str(found)
        elif isinstance(resume, str):
            if not os.path.exists(resume):
                raise ValueError(f"resume_from_checkpoint {resume!r} not found")
            why = checkpoint_problem(resume)
            if why is not None:
                raise ValueError(f"resume_from_checkpoint {resume!r} is not a complete checkpoint: it {why}")
        elif resume is False:
            resume = None
        overwrite = bool(getattr(self.distill, "overwrite_output_dir", False))
        from tokinteract.mllm.preflight import check_output_writable

        unwritable = check_output_writable(out)  # on every rank, so none waits for a rank that refused
        if unwritable:  # found now, not at the first save (or never, with save_strategy="no")
            raise OutputDirError(unwritable)
        if self.args.should_save:
            check_output_dir(out, resuming=resume is not None, overwrite=overwrite)
        elif not overwrite:  # other ranks refuse too (without deleting), so none waits forever
            check_output_dir(out, resuming=resume is not None, overwrite=False)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
        return super().train(resume, *args, **kwargs)

    # ------------------------------------------------------------ bad samples
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        st = self._reliability_state()
        st["loss_bad"] = []
        st["parts_snapshot"] = {k: v.clone() for k, v in getattr(self, "_part_sums", {}).items()}
        for b in batch_samples:
            for index, path, reason in b.pop(SKIPPED_KEY, None) or []:
                if index not in st["skipped"]:
                    st["skipped"][index] = (path, reason)
                    logger.warning("skipped sample %d (%s) at step %d: %s", index, path, self.state.global_step + 1,
                                   reason)
        self._check_bad_sample_limit()
        return batch_samples, num_items

    def _check_bad_sample_limit(self) -> None:
        st = self._reliability_state()
        ds = self.train_dataset
        local = len(st["skipped"])
        total = local
        if self.args.world_size > 1:
            t = torch.tensor([float(local)], device=self.args.device)
            total = int(self.accelerator.gather(t).sum())
        before = len(getattr(ds, "skipped", []) or [])  # dropped at construction (preflight, on_bad_image)
        n = int(getattr(ds, "num_samples_total", 0) or len(ds))
        limit = float(getattr(self.distill, "bad_sample_limit", 0.0))
        count = total + before
        if count > limit * n:
            first = next(iter(st["skipped"].items()), None)
            where = f" (first here: sample {first[0]}, {first[1][0]}: {first[1][1]})" if first else ""
            self._stop_run(
                f"{count} bad sample(s) of {n} exceed bad_sample_limit={limit:g} ({limit * n:.2f} samples){where}; "
                "fix or remove them (tokinteract-train runs a preflight scan that lists them) or raise bad_sample_limit"
            )

    # ------------------------------------------------------------ non-finite guard
    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(model, inputs, *args, **kwargs)
        if not bool(torch.isfinite(loss.detach()).all()):
            parts = [k for k, v in getattr(self, "_part_sums", {}).items() if not bool(torch.isfinite(v).all())]
            self._reliability_state()["loss_bad"].append((float(loss.detach().float().sum()), parts))
        return loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard_step(model, grad_norm)
        return grad_norm

    def _ranks_with(self, local: bool) -> list[int]:
        """The ranks where ``local`` is true (a collective: call it on every rank)."""
        if self.args.world_size <= 1:
            return [0] if local else []
        flags = self.accelerator.gather(torch.tensor([float(local)], device=self.args.device))
        return [r for r, f in enumerate(flags.tolist()) if f]

    def _guard_step(self, model: nn.Module, grad_norm: Any) -> None:
        st = self._reliability_state()
        scaler = getattr(self.accelerator, "scaler", None)
        norm = float(grad_norm) if grad_norm is not None else 0.0
        grad_bad = not math.isfinite(norm) and scaler is None
        ranks = self._ranks_with(bool(st["loss_bad"]) or grad_bad)  # one rank's bad loss skips the step on all
        if not ranks:
            st["run"] = 0
            return
        step = self.state.global_step + 1
        unwrapped = self.accelerator.unwrap_model(model)
        params = [n for n, p in unwrapped.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        parts = sorted({p for _, ps in st["loss_bad"] for p in ps})
        losses = [v for v, _ in st["loss_bad"]]
        if losses:
            what = f"loss {losses} (loss parts: {', '.join('loss_' + p for p in parts) or 'none non-finite'})"
        else:
            what = "gradient" if grad_bad else "loss or gradient on another rank"
        msg = (
            f"step {step}: non-finite {what}"
            + f", gradient norm {norm}, non-finite gradients in {len(params)} parameter(s)"
            + (f": {_names(params)}" if params else "")
            + (f" (non-finite on rank(s) {ranks} of {self.args.world_size})" if self.args.world_size > 1 else "")
        )
        if self.is_deepspeed_enabled:
            self._stop_run(msg + "; DeepSpeed owns the gradients, so the run stops at the first non-finite step",
                           save=False)
        if scaler is None:
            for p in unwrapped.parameters():
                p.grad = None  # optimizer.step() skips parameters without a gradient: nothing is applied
        if hasattr(self, "_part_sums"):  # the logged parts average the applied steps only
            self._part_sums = {k: v.clone() for k, v in st["parts_snapshot"].items()}
        st["run"] += 1
        st["nonfinite_steps"].append(msg)
        n_max = int(getattr(self.distill, "max_nonfinite_steps", 3))
        logger.warning("%s; the update was not applied (%d in a row, limit %d)", msg, st["run"], n_max)
        if st["run"] >= n_max:
            self._stop_run(
                f"{st['run']} non-finite steps in a row (max_nonfinite_steps={n_max}); last: {msg}. "
                "Lower the learning rate, check the data, or use fp32"
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        st = self._reliability_state()
        if "loss" in logs:
            n = len(st["nonfinite_steps"]) - st.get("logged", 0)
            if n:  # the Trainer logs a filtered loss for such steps: say how many there were
                logs["nonfinite_steps_skipped"] = n
            st["logged"] = len(st["nonfinite_steps"])
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------ stopping
    def _stop_run(self, message: str, save: bool = True) -> None:
        """Save a checkpoint of the last applied step (unless none was trained) and raise."""
        path = None
        if save and self.state.global_step > 0:
            final = os.path.join(self._get_output_dir(None), f"checkpoint-{self.state.global_step}")
            if os.path.isdir(final) and checkpoint_problem(final) is None:
                path = final
            else:
                self._save_checkpoint(self.model_wrapped, None)
                path = final
        if path is not None:
            message += f"; the run at global step {self.state.global_step} (unapplied steps left out) is saved in {path}"
        elif save:
            message += "; no step had been applied, nothing was saved"
        raise TrainingStopped(message, path)

    # ------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        bad = nonfinite_tensors(self.model.state_dict())
        if bad:
            raise NonFiniteError(
                f"refusing to save the model to {output_dir or self.args.output_dir!r}: {len(bad)} weight tensor(s) "
                f"hold NaN or infinite values ({_names(bad)})"
            )
        super().save_model(output_dir, _internal_call)

    def _get_output_dir(self, trial: Any) -> str:
        staging = self.__dict__.get("_staging_dir")
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        step = self.state.global_step
        if not self.args.save_only_model:
            # every rank checks its own optimizer state (ZeRO partitions it) and all agree, so no
            # rank writes or waits at a barrier while another refuses
            bad = nonfinite_tensors(_optimizer_tensors(self.optimizer))
            ranks = self._ranks_with(bool(bad))
            if ranks:
                where = f" ({_names(bad)})" if bad else ""
                raise NonFiniteError(
                    f"refusing to save checkpoint-{step}: optimizer state tensor(s) hold NaN or infinite values on "
                    f"rank(s) {ranks}{where}"
                )
        run_dir = self._get_output_dir(trial)
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}{step}")
        main = self.args.should_save
        if main and os.path.exists(staging):  # left by a save that was killed
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self.__dict__["_staging_dir"] = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.__dict__["_staging_dir"] = None
        self.accelerator.wait_for_everyone()
        if main:
            name = f"checkpoint-{step}"
            src, final = os.path.join(staging, name), os.path.join(run_dir, name)
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(best) == staging:
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(src, "trainer_state.json"))
            if os.path.exists(final):  # saved again at the same step: swap, never a moment without one
                old = staging + ".old"
                os.rename(final, old)
                os.rename(src, final)
                shutil.rmtree(old)
            else:
                os.rename(src, final)
            os.rmdir(staging)
            _fsync_dir(run_dir)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def _fsync_dir(path: str) -> None:
    """Flush a directory entry (the rename) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
