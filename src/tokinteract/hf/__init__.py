"""Hugging Face adapter for tokinteract (needs ``transformers``: ``pip install 'tokinteract[hf]'``).

* TPA forwards: :func:`packed_forward` (one pass over the expansion with the ribbon mask in
  the format the attention implementation honours), and the cheaper exact cached path
  :func:`ground_truth_forward` -> :func:`tokinteract.sample_candidates` ->
  :func:`tokinteract.tpa_expand` -> :func:`cached_candidate_forward`; :func:`tpa_forward`
  wraps both. Supported attention implementations: ``eager``, ``sdpa`` and
  ``flex_attention`` (GPU); flash attention is refused with a clear error.
* :func:`capture_attention`: attention probabilities of chosen query rows at chosen layers
  (IVA weights, Fig. 7), without ``output_attentions``.
* :func:`irs_curve`: IRS per layer and ``l*`` (Def. 3.1, Fig. 4), with plotting helpers.
* :func:`exposure_bias`: ``E_train``, ``E_test``, ``R``, ``E`` and ``%ExAccErr``
  (Appendix B.4).

Supported model families and what each adds to plain causal attention:
:mod:`tokinteract.hf.families` (unknown families are refused).
"""

from tokinteract.hf._attn import SUPPORTED_IMPLEMENTATIONS, prefix_self_attention
from tokinteract.hf.capture import AttentionCapture, capture_attention
from tokinteract.hf.exposure import ExposureBias, exposure_bias, generate_tokens
from tokinteract.hf.irs import (
    IRSCurve,
    instruction_vision_alphas,
    irs_curve,
    plot_attention_grid,
    plot_irs_curve,
    visual_attention_grid,
)
from tokinteract.hf.packed import (
    GroundTruthOutput,
    cached_candidate_forward,
    ground_truth_attention_mask,
    ground_truth_forward,
    ground_truth_position_ids,
    lm_head_parameters,
    packed_forward,
    packed_inputs,
    tpa_forward,
)

__all__ = [
    "AttentionCapture",
    "ExposureBias",
    "GroundTruthOutput",
    "IRSCurve",
    "SUPPORTED_IMPLEMENTATIONS",
    "cached_candidate_forward",
    "capture_attention",
    "exposure_bias",
    "generate_tokens",
    "ground_truth_attention_mask",
    "ground_truth_forward",
    "ground_truth_position_ids",
    "instruction_vision_alphas",
    "irs_curve",
    "lm_head_parameters",
    "packed_forward",
    "packed_inputs",
    "plot_attention_grid",
    "plot_irs_curve",
    "prefix_self_attention",
    "tpa_forward",
    "visual_attention_grid",
]
