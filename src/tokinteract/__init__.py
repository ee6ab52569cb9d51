"""tokinteract: typed PyTorch distillation losses for multimodal LLMs (Align-TI).

The core never imports transformers; the Hugging Face adapter lives in
``tokinteract.hf`` and the reference trainer in ``tokinteract.mllm``.

Conventions: logits position ``t`` predicts token ``t + 1``; student first, teacher
second; losses compute in fp32; every divergence is per position and reduced by
:func:`tokinteract.masked_reduce`.
"""

from tokinteract.align_ti import BACKENDS, AlignTILoss, HiddenStates
from tokinteract.chunked import ChunkedAlignTILoss
from tokinteract.divergence import DIVERGENCE_KINDS, TokenDivergence, token_divergence
from tokinteract.fused import FusedAlignTILoss
from tokinteract.expansion import TPAExpansion, ribbon_mask, ribbon_mask_mod, tpa_expand
from tokinteract.irs import irs_score, select_layer
from tokinteract.iva import IVALoss, instruction_rows, iva_loss, uniform_visual_weights, visual_importance
from tokinteract.kd import KDLoss, SFTLoss, kd_loss, sft_loss, shift_labels
from tokinteract.reduction import masked_reduce
from tokinteract.ribbon import ribbon_dense, ribbon_mod, ribbon_rule
from tokinteract.sampling import SAMPLING_STRATEGIES, sample_candidates
from tokinteract.tpa import TPALoss, tpa_loss, tpa_position_values

__version__ = "0.1.0.dev0"

__all__ = [
    "BACKENDS",
    "DIVERGENCE_KINDS",
    "SAMPLING_STRATEGIES",
    "AlignTILoss",
    "ChunkedAlignTILoss",
    "FusedAlignTILoss",
    "HiddenStates",
    "IVALoss",
    "KDLoss",
    "SFTLoss",
    "TPAExpansion",
    "TPALoss",
    "TokenDivergence",
    "instruction_rows",
    "iva_loss",
    "irs_score",
    "kd_loss",
    "masked_reduce",
    "ribbon_dense",
    "ribbon_mask",
    "ribbon_mask_mod",
    "ribbon_mod",
    "ribbon_rule",
    "sample_candidates",
    "select_layer",
    "sft_loss",
    "shift_labels",
    "tpa_expand",
    "tpa_loss",
    "tpa_position_values",
    "token_divergence",
    "uniform_visual_weights",
    "visual_importance",
]
