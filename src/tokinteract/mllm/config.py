"""The reference trainer's configuration, one small dataclass per concern.

===================  ========================================================================
:class:`MethodConfig`    which terms, their weights and the divergence (the ``method`` preset)
:class:`IVAConfig`       where the IVA weights come from (teacher layer ``l*``, IRS, student)
:class:`TPAConfig`       TPA candidates: how many, how they are drawn, how the models run them
:class:`OnPolicyConfig`  GKD's on-policy batches (student-generated responses)
:class:`LossConfig`      how the loss is evaluated (fused or full logits, chunks, Liger)
:class:`PairConfig`      what to do when teacher and student differ (vocabulary, image token)
:class:`FaultConfig`     bad samples, non-finite steps, an earlier run in ``output_dir``
===================  ========================================================================

:class:`DistillationConfig` is all of them in one flat dataclass (it inherits every group's
fields): the trainer's ``distill=`` argument, with the field names, CLI flags and YAML keys
of earlier releases. The CLI parses the groups side by side with ``HfArgumentParser`` (each is
a section of ``--help``) and joins them with :meth:`DistillationConfig.from_groups`;
:meth:`DistillationConfig.group` gives one group back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "GROUPS",
    "LOSS_IMPLS",
    "METHODS",
    "DistillationConfig",
    "FaultConfig",
    "IVAConfig",
    "LossConfig",
    "MethodConfig",
    "OnPolicyConfig",
    "PairConfig",
    "TPAConfig",
]

LOSS_IMPLS = ("fused", "logits")
"""``loss_impl`` values: hidden states + LM heads applied per chunk of needed rows, or full logits."""

METHODS: dict[str, dict[str, Any]] = {
    "sft": dict(sft=1.0, kd=0.0, iva=0.0, tpa=0.0),
    "kd": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0),
    "iva": dict(sft=1.0, kd=1.0, iva=1.0, tpa=0.0),
    "tpa": dict(sft=1.0, kd=1.0, iva=0.0, tpa=1.0),
    "align_ti": dict(sft=1.0, kd=1.0, iva=1.0, tpa=1.0),
    "uniform_va": dict(sft=1.0, kd=1.0, iva=1.0, tpa=0.0, iva_weights="uniform"),
    "rkl": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0, divergence="rkl"),
    "jsd": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0, divergence="jsd"),
    "skew_kl": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0, divergence="skew_fkl"),
    "gkd": dict(sft=1.0, kd=1.0, iva=0.0, tpa=0.0, divergence="jsd", on_policy=True),
}
"""The ``method`` presets: part weights and, where they differ from the defaults, the divergence,
the IVA weight source and GKD's on-policy batches."""


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class MethodConfig:
    """Which terms, with which weights and divergence; ``None`` fields take the ``method`` preset's value."""

    _argument_group_name = "method (terms, weights, divergence)"

    method: str = field(default="align_ti", metadata={"help": f"preset: one of {sorted(METHODS)}"})
    sft_weight: float | None = field(default=None, metadata={"help": "weight of SFT (None: preset)"})
    kd_weight: float | None = field(default=None, metadata={"help": "weight of Vanilla KD (None: preset)"})
    iva_weight: float | None = field(default=None, metadata={"help": "weight of IVA (None: preset)"})
    tpa_weight: float | None = field(default=None, metadata={"help": "weight of TPA (None: preset)"})
    divergence: str | None = field(default=None, metadata={"help": "fkl, rkl, jsd, skew_fkl, skew_rkl, tvd (None: preset, fkl)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the divergences"})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of the generalized JSD"})
    skew_alpha: float = field(default=0.1, metadata={"help": "alpha of the skew KLs"})
    sampling_seed: int = field(default=0, metadata={"help": "seed of candidate sampling and GKD coin flips"})

    def validate(self) -> None:
        """Check the fields of this group (the weights are checked once the preset is applied)."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")


@dataclass
class IVAConfig:
    """Where IVA's visual-token weights come from."""

    _argument_group_name = "IVA (visual-token alignment weights)"

    iva_layer: int | None = field(default=None, metadata={"help": "teacher layer l* for IVA (None: argmax IRS)"})
    iva_weights: str | None = field(default=None, metadata={"help": "teacher, student or uniform (None: preset, teacher)"})
    iva_student_layer: int | None = field(default=None, metadata={"help": "student layer for iva_weights=student (None: l* scaled by depth)"})
    irs_num_pairs: int = field(default=16, metadata={"help": "sample pairs used to compute IRS when iva_layer is None"})

    def validate(self) -> None:
        """Check the fields of this group (``iva_weights`` is checked once the preset is applied)."""
        if self.iva_layer is not None and self.iva_layer < 0:
            raise ValueError(f"iva_layer must be >= 0, got {self.iva_layer!r}")


@dataclass
class TPAConfig:
    """TPA's candidates: how many per position, how they are drawn, how both models run them."""

    _argument_group_name = "TPA (transition-probability alignment candidates)"

    tpa_num_candidates: int = field(default=4, metadata={"help": "d, candidates per position"})
    tpa_sampling: str = field(default="nucleus", metadata={"help": "nucleus, multinomial or greedy"})
    tpa_top_p: float = field(default=0.95, metadata={"help": "nucleus mass"})
    tpa_temperature: float = field(default=1.0, metadata={"help": "candidate sampling temperature"})
    tpa_forward: str = field(default="cached", metadata={"help": "cached (KV cache reuse) or packed (Algorithm 1)"})
    tpa_skip_token_ids: list[int] | None = field(
        default=None,
        metadata={"help": "beyond the paper: no TPA slot at positions whose ground-truth next token is one of "
                          "these ids (e.g. the end-of-turn id <|im_end|>); None: every supervised position (Eq. 7)"},
    )

    def validate(self) -> None:
        """Check the fields of this group."""
        if self.tpa_forward not in ("cached", "packed"):
            raise ValueError(f"tpa_forward must be 'cached' or 'packed', got {self.tpa_forward!r}")
        from tokinteract import SAMPLING_STRATEGIES

        if self.tpa_sampling not in SAMPLING_STRATEGIES:
            raise ValueError(f"tpa_sampling must be one of {SAMPLING_STRATEGIES}, got {self.tpa_sampling!r}")
        _check_int("tpa_num_candidates", self.tpa_num_candidates, 1)
        skip = self.tpa_skip_token_ids
        if skip is not None and (
            not isinstance(skip, (list, tuple))
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in skip)
        ):
            raise ValueError(f"tpa_skip_token_ids must be None or a list of token ids (ints >= 0), got {skip!r}")
        _check_positive("tpa_temperature", self.tpa_temperature)
        if not 0.0 < self.tpa_top_p <= 1.0:
            raise ValueError(f"tpa_top_p must lie in (0, 1], got {self.tpa_top_p!r}")


@dataclass
class OnPolicyConfig:
    """GKD's on-policy batches: with probability ``gkd_lambda`` a training batch is replaced by the
    student's own sampled responses (:meth:`tokinteract.mllm.trainer.DistillationTrainer.training_step`)."""

    _argument_group_name = "on-policy (GKD)"

    on_policy: bool | None = field(default=None, metadata={"help": "GKD on-policy batches (None: preset)"})
    gkd_lambda: float = field(default=0.5, metadata={"help": "probability of an on-policy batch (GKD)"})
    gkd_max_new_tokens: int = field(default=32, metadata={"help": "length of student-generated responses (GKD)"})
    gkd_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the responses (GKD)"})

    def validate(self) -> None:
        """Check the fields of this group."""
        _check_positive("gkd_temperature", self.gkd_temperature)
        if self.gkd_max_new_tokens < 1:
            raise ValueError(f"gkd_max_new_tokens must be >= 1, got {self.gkd_max_new_tokens!r}")
        if not 0.0 <= self.gkd_lambda <= 1.0:
            raise ValueError(f"gkd_lambda must lie in [0, 1], got {self.gkd_lambda!r}")


@dataclass
class LossConfig:
    """How the loss is evaluated; every choice gives the same loss and gradients up to fp32 rounding."""

    _argument_group_name = "loss evaluation (fused or logits, chunks, backend)"

    loss_impl: str = field(
        default="fused",
        metadata={"help": "fused (hidden states + LM head, logits only per chunk of supervised rows) or logits"},
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "rows per LM-head chunk with loss_impl=fused (None: 2**24 // vocab)"}
    )
    loss_backend: str = field(
        default="tokinteract",
        metadata={"help": "tokinteract or liger (loss_impl=fused only: KD and TPA through Liger-Kernel's fused "
                          "linear JSD, divergence fkl/rkl/jsd; pip install 'tokinteract[liger]')"},
    )
    loss_liger_compiled: bool = field(
        default=True, metadata={"help": "loss_backend=liger: let Liger torch.compile its chunk step (its default)"}
    )

    def validate(self) -> None:
        """Check the fields of this group."""
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        c = self.loss_chunk_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"loss_chunk_size must be None or an int >= 1, got {c!r}")
        from tokinteract.fused import BACKENDS

        if self.loss_backend not in BACKENDS:
            raise ValueError(f"loss_backend must be one of {BACKENDS}, got {self.loss_backend!r}")
        if self.loss_backend != "tokinteract" and self.loss_impl != "fused":
            raise ValueError(f"loss_backend={self.loss_backend!r} needs loss_impl='fused', got {self.loss_impl!r}")


@dataclass
class PairConfig:
    """What to do when teacher and student differ (checked by
    :func:`tokinteract.mllm.model.check_teacher_student`)."""

    _argument_group_name = "teacher/student pair"

    vocab_policy: str = field(default="error", metadata={"help": "error or shared_prefix (different vocab sizes)"})
    image_token_policy: str = field(default="error", metadata={"help": "error or remap (different image-token ids)"})

    def validate(self) -> None:
        """Nothing to check before the models are known (see :func:`tokinteract.mllm.model.check_teacher_student`)."""


@dataclass
class FaultConfig:
    """Faults: bad samples, non-finite steps, an earlier run (the trainer guide's "Faults" section)."""

    _argument_group_name = "faults"

    bad_sample_limit: float = field(
        default=0.01,
        metadata={"help": "fraction of the data file's samples that may be skipped as bad (preflight and mid-run) "
                          "before the run saves a checkpoint and stops"},
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "stop (after saving a checkpoint) after this many non-finite steps in a row"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "delete an earlier run's checkpoints and final model in output_dir and start again"}
    )

    def validate(self) -> None:
        """Check the fields of this group."""
        if not (isinstance(self.bad_sample_limit, (int, float)) and 0.0 <= self.bad_sample_limit <= 1.0):
            raise ValueError(f"bad_sample_limit must be a fraction in [0, 1], got {self.bad_sample_limit!r}")
        _check_int("max_nonfinite_steps", self.max_nonfinite_steps, 1)


GROUPS: tuple[type, ...] = (MethodConfig, IVAConfig, TPAConfig, OnPolicyConfig, LossConfig, PairConfig, FaultConfig)
"""The configuration groups, in the order the CLI parses them and :meth:`DistillationConfig.resolved` checks them."""

G = TypeVar("G")


@dataclass
class DistillationConfig(FaultConfig, PairConfig, LossConfig, OnPolicyConfig, TPAConfig, IVAConfig, MethodConfig):
    """What to distill and how: every field of the :data:`GROUPS` in one dataclass (also a
    ``HfArgumentParser`` dataclass).

    ``None`` fields take the value of the ``method`` preset (:data:`METHODS`).
    """

    _argument_group_name = "distillation"

    @classmethod
    def from_groups(cls, *groups: Any) -> "DistillationConfig":
        """The config holding the fields of ``groups`` (instances of :data:`GROUPS`, each at most once;
        a group left out keeps its defaults)."""
        values: dict[str, Any] = {}
        seen: set[type] = set()
        for g in groups:
            kind = type(g)
            if kind not in GROUPS:
                raise TypeError(f"groups must be instances of {[c.__name__ for c in GROUPS]}, got {kind.__name__}")
            if kind in seen:
                raise ValueError(f"{kind.__name__} given twice")
            seen.add(kind)
            values.update({f.name: getattr(g, f.name) for f in dataclasses.fields(g)})
        return cls(**values)

    def group(self, kind: type[G]) -> G:
        """This config's fields of one group, as an instance of ``kind`` (one of :data:`GROUPS`)."""
        if kind not in GROUPS:
            raise TypeError(f"kind must be one of {[c.__name__ for c in GROUPS]}, got {kind!r}")
        return kind(**{f.name: getattr(self, f.name) for f in dataclasses.fields(kind)})

    def resolved(self) -> dict[str, Any]:
        """The effective settings after applying the preset; checks every group and the rules across them."""
        MethodConfig.validate(self)
        p = METHODS[self.method]
        out = {
            "sft": p["sft"] if self.sft_weight is None else self.sft_weight,
            "kd": p["kd"] if self.kd_weight is None else self.kd_weight,
            "iva": p["iva"] if self.iva_weight is None else self.iva_weight,
            "tpa": p["tpa"] if self.tpa_weight is None else self.tpa_weight,
            "divergence": self.divergence or p.get("divergence", "fkl"),
            "iva_weights": self.iva_weights or p.get("iva_weights", "teacher"),
            "on_policy": p.get("on_policy", False) if self.on_policy is None else self.on_policy,
        }
        for k in ("sft", "kd", "iva", "tpa"):
            if not (isinstance(out[k], (int, float)) and math.isfinite(out[k]) and out[k] >= 0):
                raise ValueError(f"{k}_weight must be a finite number >= 0, got {out[k]!r}")
        if out["iva_weights"] not in ("teacher", "student", "uniform"):
            raise ValueError(f"iva_weights must be teacher, student or uniform, got {out['iva_weights']!r}")
        _check_positive("temperature", self.temperature)
        for group in GROUPS[1:]:
            group.validate(self)  # type: ignore[attr-defined]
        if out["on_policy"] and out["kd"] <= 0:
            raise ValueError("on_policy (GKD) needs kd_weight > 0: the on-policy loss is the KD divergence")
        if out["on_policy"] and out["tpa"] > 0:
            raise ValueError("on_policy (GKD) cannot be combined with TPA in this trainer; set tpa_weight=0")
        if not any(out[k] > 0 for k in ("sft", "kd", "iva", "tpa")):
            raise ValueError("every loss weight is 0; enable at least one of sft, kd, iva, tpa")
        return out
