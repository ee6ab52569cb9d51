"""Running a :class:`~tokinteract.TPAExpansion` through a Hugging Face model.

Two exact ways to get the ``[B, T2, V]`` logits that :func:`tokinteract.tpa_loss` and
:class:`tokinteract.AlignTILoss` take (``T`` ground-truth slots first, then the
candidate block):

* **packed** (:func:`packed_forward`, the paper's Algorithm 1 line 16): one forward over
  all ``T2`` slots with the ribbon mask. The student then runs twice (a plain ground-truth
  pass to sample candidates from, then the packed pass).
* **cached** (:func:`ground_truth_forward` + :func:`cached_candidate_forward`): the
  ground-truth pass runs once and keeps its KV cache; its logits give SFT, KD, IVA and the
  distribution the candidates are sampled from. Then only the ``N = T2 - T`` candidate
  slots run, as a query block over that cache plus themselves. Because the ribbon rule
  lets a candidate see exactly the non-pad ground-truth prefix ``<= t`` and itself, and
  the ground-truth rows of the ribbon mask are plain causal attention with padding, the
  two paths compute the same function: equal logits and equal parameter gradients (the
  cache is concatenated with ``torch.cat``, so gradients flow into the prefix keys and
  values). Cost: one full pass plus a candidate pass instead of two full passes.

Typical trainer step (student)::

    gt = ground_truth_forward(student, input_ids, attention_mask, pixel_values=px)
    cand = sample_candidates(gt.logits, d, mask=cmask)
    exp = tpa_expand(input_ids, cand, cmask, attention_mask)
    s_logits = torch.cat([gt.logits, cached_candidate_forward(student, gt, exp)], dim=1)
    with torch.no_grad():
        t_logits = tpa_forward(teacher, exp, pixel_values=px)        # [B, T2, V]
    loss, parts = AlignTILoss()(s_logits, t_logits, labels, expansion=exp, ...)

Gradient checkpointing: Hugging Face drops the cache in checkpointed layers
(``GradientCheckpointingLayer`` sets ``cache=None`` while training with gradients), so the
cached path cannot work there. :func:`ground_truth_forward` then returns no cache and
:func:`cached_candidate_forward` falls back to the packed pass (``packed_forward(...)[:,
T:]``, with the same model inputs, e.g. ``pixel_values``), logging a notice once. The
result is the same function; only the saving is lost.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tokinteract import compat
from tokinteract._checks import check_bool, check_choice, check_integer, check_tensor
from tokinteract.expansion import TPAExpansion, tpa_expand
from tokinteract.ribbon import ribbon_dense
from tokinteract.hf import _attn, _plan, families
from tokinteract.hf._shared import SharedTape

__all__ = [
    "OUTPUTS",
    "GroundTruthOutput",
    "cached_candidate_forward",
    "ground_truth_attention_mask",
    "ground_truth_forward",
    "ground_truth_position_ids",
    "lm_head_parameters",
    "packed_forward",
    "packed_inputs",
    "tpa_forward",
]

logger = logging.getLogger("tokinteract.hf")

_RESERVED = ("input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds", "use_cache")
_warned: set[str] = set()


def _notice(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def _check_model_inputs(model_inputs: dict[str, Any]) -> None:
    bad = sorted(k for k in model_inputs if k in _RESERVED)
    if bad:
        raise TypeError(
            f"model_inputs must not contain {bad}: the adapter sets input ids, masks, position ids and "
            "the cache itself (pass only extra inputs such as pixel_values)"
        )


def _padding_mask(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    check_tensor("attention_mask", attention_mask, ndim=2)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        check_integer("attention_mask", attention_mask)
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0/1 (or bool) values")
        attention_mask = attention_mask.bool()
    return attention_mask


def ground_truth_attention_mask(
    attention_mask: Bool[Tensor, "batch seq"],
) -> Bool[Tensor, "batch 1 seq seq"]:
    """The ground-truth block of the ribbon mask: causal attention with padding.

    ``M[b, 0, q, k] = (k <= q and real[b, q] and real[b, k]) or q == k`` (True = attend),
    so a pad row attends only to itself and no softmax row is empty. Equals
    ``tpa_expand(...).attention_mask[:, :, :T, :T]`` for the same padding mask (both are
    :func:`tokinteract.ribbon_rule` on the ground-truth slots).
    """
    check_tensor("attention_mask", attention_mask, ndim=2)
    check_bool("attention_mask", attention_mask)
    B, T = attention_mask.shape
    src = torch.arange(T, device=attention_mask.device).expand(B, T)
    return ribbon_dense(src, attention_mask, attention_mask)


def ground_truth_position_ids(attention_mask: Bool[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Hugging Face position ids: ``cumsum(mask) - 1`` on real tokens, 1 on pads."""
    check_tensor("attention_mask", attention_mask, ndim=2)
    check_bool("attention_mask", attention_mask)
    pos = attention_mask.long().cumsum(1) - 1
    return pos.masked_fill(~attention_mask, 1)


def _check_image_tokens(model: nn.Module, ids: Tensor, where: str) -> None:
    vis = families.visual_token_ids(model)
    if vis and ids.numel() and bool(torch.isin(ids, torch.tensor(vis, device=ids.device)).any()):
        raise ValueError(
            f"{where} contain the image token id {' / '.join(map(str, vis))} (a visual placeholder); the model would try to put image features "
            "there. Exclude them from candidate sampling (mask their logits with -inf before sample_candidates) "
            "and use a different pad_token_id in tpa_expand"
        )


OUTPUTS = ("logits", "hidden")


def _base_model(model: nn.Module) -> nn.Module:
    """The module that returns the LM head's input (``last_hidden_state``, after the final norm)."""
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(base, nn.Module) or head is None:
        raise ValueError(
            f"output='hidden' needs a model with a .model base module and an LM head "
            f"(get_output_embeddings()), e.g. *ForCausalLM or LlavaForConditionalGeneration; got {type(model).__name__}"
        )
    return base


def lm_head_parameters(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of ``model``'s LM head (``get_output_embeddings()``).

    With tied embeddings the weight *is* the input embedding matrix (the same Parameter), so
    gradients computed through it reach the embedding. Feed these, with hidden states from
    ``output="hidden"``, to :class:`tokinteract.fused.FusedAlignTILoss`.

    Raises:
        ValueError: no LM head weight, or a quantised one (bitsandbytes 4-bit / 8-bit): its
            stored tensor holds packed integers, not the ``[V, H]`` matrix the head applies,
            so hidden states times it would be wrong; keep the head unquantised (transformers'
            default, ``llm_int8_skip_modules`` containing ``lm_head``) or use the logits loss.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"model must have an LM head with a weight (get_output_embeddings()), got {type(model).__name__}")
    if not weight.dtype.is_floating_point or hasattr(weight, "quant_state") or hasattr(weight, "SCB"):
        raise ValueError(
            f"{type(model).__name__}'s LM head is quantised ({type(head).__name__}, weight {type(weight).__name__} of "
            f"dtype {weight.dtype}): the fused loss multiplies hidden states by the head's weight matrix, which a "
            "quantised head does not hold; keep lm_head unquantised (e.g. BitsAndBytesConfig(llm_int8_skip_modules="
            "[..., 'lm_head'])) or use loss_impl='logits'"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, Tensor) else None


def _run(
    model: nn.Module,
    input_ids: Tensor,
    mask: Tensor,
    position_ids: Tensor,
    output: str = "logits",
    **kwargs: Any,
) -> Any:
    """One forward with an explicit bool ``[B, 1, Q, K]`` mask and 1-D positions (plain families only)."""
    fmt = _attn.mask_format(model)
    dev = _attn.model_device(model)
    am = _attn.convert_mask(mask.to(dev), fmt, _attn.model_dtype(model))
    target = _base_model(model) if output == "hidden" else model
    return target(input_ids=input_ids.to(dev), attention_mask=am, position_ids=position_ids.to(dev), **kwargs)


def _split_inputs(fam: families.Family, model_inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(forwarded, all)``: the family's consumed per-token inputs are not forwarded."""
    fwd = {k: v for k, v in model_inputs.items() if k not in fam.consumed}
    return fwd, dict(model_inputs)


CAUSAL_GROUND_TRUTH = True
"""Off: the ground-truth pass always receives the ribbon's ground-truth block as a mask (for benchmarks)."""


def _forward_plan(
    model: nn.Module,
    input_ids: Tensor,
    p: _plan.PassPlan,
    q_start: int,
    k_len: int,
    output: str,
    *,
    block_mask: Any = None,
    causal: bool = False,
    **kwargs: Any,
) -> Any:
    """Run slots ``q_start:`` of a plan (the earlier ones come from ``cache`` in kwargs, if any).

    ``causal``: the slots' rule is the model's own causal attention (``_plan.ground_truth_is_causal``):
    no mask is passed, so the model uses its causal path (SDPA's causal kernel skips the upper
    triangle that a dense mask would compute and discard)."""
    dev = _attn.model_device(model)
    B, Q = input_ids.shape
    masks = None if causal else _plan.model_masks(model, p, B, q_start, Q, k_len, block_masks=block_mask)
    target = _base_model(model) if output == "hidden" else model
    return target(
        input_ids=input_ids.to(dev), attention_mask=masks,
        position_ids=_plan.model_position_ids(p, q_start).to(dev), **kwargs,
    )


def _block_mask_shape(block_mask: Any) -> tuple[int, ...] | None:
    """``(B, H, Q_LEN, KV_LEN)`` of a FlexAttention ``BlockMask``; None for anything else."""
    from torch.nn.attention.flex_attention import BlockMask

    return tuple(block_mask.shape) if isinstance(block_mask, BlockMask) else None


def _result(out: Any, output: str) -> Tensor:
    return out.last_hidden_state if output == "hidden" else out.logits


def packed_forward(
    model: nn.Module,
    expansion: TPAExpansion,
    *,
    output: str = "logits",
    block_mask: Any = None,
    **model_inputs: Any,
) -> Float[Tensor, "batch xseq vocab"] | Float[Tensor, "batch xseq hidden"]:
    """One forward over the whole TPA expansion with the ribbon mask (Algorithm 1, line 16).

    The boolean ribbon mask ``expansion.attention_mask`` (True = attend) is converted to what
    the text model's attention implementation honours: an additive float mask with
    ``finfo(dtype).min`` for ``eager``, the bool mask for ``sdpa``, and for
    ``flex_attention`` (GPU) the ``BlockMask`` of :func:`tokinteract.attention.ribbon_block_mask`
    (index tensors padded to a multiple of 128), one per call and shared by every layer; pass
    ``block_mask`` to share one between calls (e.g. student and teacher on the same batch).
    ``expansion.position_ids`` are passed explicitly (a candidate for ``t`` has the position
    of token ``t + 1``).

    Args:
        model: a Hugging Face causal LM or ``LlavaForConditionalGeneration``. For composite
            models the text config's ``_attn_implementation`` decides the mask format.
        expansion: from :func:`tokinteract.tpa_expand`.
        output: ``"logits"`` (default) or ``"hidden"``: the LM head's input (the base
            model's ``last_hidden_state``, after the final norm; the LM head never runs),
            for :class:`tokinteract.fused.FusedAlignTILoss` with :func:`lm_head_parameters`.
        block_mask: ``flex_attention`` models only: a ``BlockMask`` from
            :func:`tokinteract.attention.ribbon_block_mask` of this expansion (its ribbon depends only on
            the layout, so a copy with other token ids, e.g. the teacher's, shares it).
        **model_inputs: extra inputs passed through, e.g. ``pixel_values`` (the image
            features land on the image-token slots, which are all in the ground-truth part).

    Returns:
        ``[B, T2, V]`` logits (or ``[B, T2, H]`` hidden states); ``[:, :T]`` are the ground-truth rows.

    Raises:
        ValueError: for attention implementations that cannot honour a custom mask
            (``flash_attention_2/3``, unknown custom functions), or when a candidate or an
            unused slot holds the image token id.
    """
    check_choice("output", output, OUTPUTS)
    inputs = packed_inputs(model, expansion, block_mask=block_mask, output=output, **model_inputs)
    target = _base_model(model) if output == "hidden" else model
    return _result(target(**inputs, use_cache=False), output)


def packed_inputs(
    model: nn.Module,
    expansion: TPAExpansion,
    *,
    block_mask: Any = None,
    output: str = "logits",
    **model_inputs: Any,
) -> dict[str, Any]:
    """The keyword arguments of the model's forward for one packed pass over ``expansion``.

    ``model(**packed_inputs(model, exp, **batch))`` is :func:`packed_forward`: ``input_ids``
    (ground truth then candidates), ``position_ids`` as the model's family numbers them (one
    row, or the multimodal RoPE rows of Qwen-VL models), ``attention_mask`` in the format its
    attention implementation honours (one mask, or a dict keyed by layer type when the family has
    sliding windows or image blocks), and the forwarded extra inputs (``pixel_values``, image
    grids, ...). Use it instead of building these by hand from ``expansion``: its
    ``position_ids`` and ``attention_mask`` are the plain 1-D / ribbon forms, exact only for
    families without extra rules.

    Args:
        model: a model of a supported family (:mod:`tokinteract.hf.families`).
        expansion: from :func:`tokinteract.tpa_expand`.
        block_mask: see :func:`packed_forward`.
        output: ``"hidden"`` checks the options of the fused losses (see :func:`packed_forward`).
        **model_inputs: the rest of the batch exactly as the family's processor returns it.
    """
    if not isinstance(expansion, TPAExpansion):
        raise TypeError(f"expansion must be a TPAExpansion, got {type(expansion).__name__}")
    check_choice("output", output, OUTPUTS)
    _check_model_inputs(model_inputs)
    fam = families.check_options(model, output=output)
    _check_image_tokens(model, expansion.input_ids[:, expansion.seq_len :], "the candidate and unused slots of expansion.input_ids")
    dev = _attn.model_device(model)
    exp = expansion.to(dev)
    T, (B, T2) = exp.seq_len, exp.input_ids.shape
    fwd, every = _split_inputs(fam, model_inputs)
    gt = _plan.ground_truth_layout(model, exp.input_ids[:, :T], exp.slot_is_context[:, :T], _to(every, dev))
    p = _plan.plan(model, exp, gt)
    if block_mask is not None:
        if _attn.mask_format(model) != "block":
            raise ValueError(
                f"block_mask is only used by flex_attention models; this model's text attention is "
                f"{_attn.attn_implementation(model)!r}"
            )
        shape = _block_mask_shape(block_mask)
        if shape is None or shape[0] != B or shape[2:] != (T2, T2):
            raise ValueError(
                f"block_mask must be a BlockMask of shape (batch {B}, heads, {T2}, {T2}) for this expansion, "
                f"got {shape if shape is not None else type(block_mask).__name__}"
            )
        if not p.plain:
            raise ValueError(
                f"block_mask holds the plain ribbon rule, but {fam.name} adds sliding windows or image blocks per "
                "layer type; pass block_mask=None and the adapter builds the right masks"
            )
    masks = _plan.model_masks(model, p, B, 0, T2, T2, block_masks=block_mask)
    return dict(
        input_ids=exp.input_ids, attention_mask=masks, position_ids=_plan.model_position_ids(p).to(dev), **fwd
    )


def _to(inputs: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    return {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in inputs.items()}


def _ground_truth_expansion(input_ids: Tensor, attention_mask: Tensor) -> TPAExpansion:
    """The expansion of a ground truth with no candidates (its slots are the ground truth)."""
    none = torch.zeros_like(attention_mask)
    return tpa_expand(input_ids, input_ids[..., None], none, attention_mask)


@dataclass(eq=False)
class GroundTruthOutput:
    """What the ground-truth pass leaves for the candidate pass.

    Attributes:
        logits: ``[B, T, V]`` logits on the ground truth (they carry gradients); None when the
            pass ran with ``output="hidden"``.
        cache: the KV cache of the pass (``None`` under gradient checkpointing).
        input_ids: ``[B, T]`` the ground-truth tokens.
        attention_mask: bool ``[B, T]`` padding mask (True = real token).
        model_inputs: the extra inputs (e.g. ``pixel_values``), kept for the packed fallback.
        layout: the family's positions of the ground truth (and its image blocks), which the
            candidate pass continues from.
        outputs: the model's full output object (hidden states, attentions when asked).
        hidden_states: ``[B, T, H]`` input of the LM head (after the final norm) when the pass
            ran with ``output="hidden"``, else None.
        shared: links of the pass's weights for the candidate pass (one gradient per weight,
            see :mod:`tokinteract.hf._shared`); None when the pass ran without gradients or cache.
    """

    logits: Float[Tensor, "batch seq vocab"] | None
    cache: Any
    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Bool[Tensor, "batch seq"]
    model_inputs: dict[str, Any] = field(default_factory=dict)
    outputs: Any = None
    hidden_states: Float[Tensor, "batch seq hidden"] | None = None
    layout: Any = None
    shared: SharedTape | None = field(default=None, repr=False)

    @property
    def output(self) -> str:
        """``"hidden"`` if the pass returned hidden states, else ``"logits"``."""
        return "hidden" if self.logits is None else "logits"


def _checkpointing_active(model: nn.Module) -> bool:
    if not (model.training and torch.is_grad_enabled()):
        return False
    return any(compat.checkpointing_drops_cache(m) for m in model.modules())


def ground_truth_forward(
    model: nn.Module,
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Bool[Tensor, "batch seq"] | Int[Tensor, "batch seq"] | None = None,
    *,
    use_cache: bool = True,
    output: str = "logits",
    **model_inputs: Any,
) -> GroundTruthOutput:
    """Step (a) of the cached path: the ground-truth forward, keeping its KV cache.

    Uses the ground-truth block of the ribbon mask (:func:`ground_truth_attention_mask`)
    and :func:`ground_truth_position_ids`, so the logits equal ``packed_forward(...)[:, :T]``
    on every row, pad rows included (a pad attends only to itself). Without padding, for a
    family whose ground-truth block is plain causal attention with positions ``0 .. T-1``
    (``_plan.ground_truth_is_causal``), no mask is passed and the model runs its own causal
    attention, the same rule (SDPA's causal kernel then skips the masked upper triangle).

    Args:
        model: a Hugging Face causal LM or ``LlavaForConditionalGeneration``.
        input_ids: ``[B, T]`` ground-truth tokens (left or right padding).
        attention_mask: padding mask, True/1 = real token.
        use_cache: keep the KV cache for :func:`cached_candidate_forward`. Under gradient
            checkpointing Hugging Face drops it; the result then has ``cache=None`` and the
            candidate pass falls back to the packed path (logged once).
        output: ``"logits"`` (default) fills ``.logits``; ``"hidden"`` runs the base model
            only and fills ``.hidden_states`` (the LM head's input) instead, for
            :func:`tokinteract.fused.fused_sample_candidates` and the fused losses. The
            candidate pass then returns hidden states as well.
        **model_inputs: e.g. ``pixel_values``; also ``output_hidden_states`` etc.

    Returns:
        a :class:`GroundTruthOutput`; feed ``.logits`` to
        :func:`tokinteract.sample_candidates`.
    """
    check_choice("output", output, OUTPUTS)
    check_tensor("input_ids", input_ids, ndim=2)
    check_integer("input_ids", input_ids)
    _check_model_inputs(model_inputs)
    fam = families.check_options(model, output=output)
    am = _padding_mask(attention_mask, input_ids).to(input_ids.device)
    keep = use_cache
    if use_cache and _checkpointing_active(model):
        _notice(
            "ckpt",
            "tokinteract.hf: gradient checkpointing is on, and Hugging Face drops the KV cache in "
            "checkpointed layers; the cached TPA path falls back to the packed forward (same result, "
            "no saving).",
        )
        keep = False
    dev = _attn.model_device(model)
    fwd, every = _split_inputs(fam, model_inputs)
    exp = _ground_truth_expansion(input_ids.to(dev), am.to(dev))
    layout = _plan.ground_truth_layout(model, exp.input_ids, am.to(dev), _to(every, dev))
    p = _plan.plan(model, exp, layout)
    extra: dict[str, Any] = {"use_cache": keep}
    if keep:
        # a plain cache: a model's own cache may keep only the last window of its sliding layers,
        # while the candidate pass needs every ground-truth key (its mask applies the window)
        from transformers import DynamicCache

        extra["cache"] = DynamicCache()
    T = input_ids.shape[1]
    # with gradients, the candidate pass adds its weight gradients into this pass's (one per weight)
    tape = SharedTape(model) if keep and SharedTape.active() else None
    causal = CAUSAL_GROUND_TRUTH and _plan.ground_truth_is_causal(model, p, am.to(dev))
    with tape.ground_truth() if tape is not None else contextlib.nullcontext():
        out = _forward_plan(model, exp.input_ids, p, 0, T, output, causal=causal, **extra, **fwd)
    cache = getattr(out, "cache", None) if keep else None
    if cache is None:
        cache = getattr(out, "past_key_values", None) if keep else None
    hidden = output == "hidden"
    return GroundTruthOutput(
        logits=None if hidden else out.logits, cache=cache, input_ids=input_ids, attention_mask=am,
        model_inputs=dict(model_inputs), outputs=out, hidden_states=out.last_hidden_state if hidden else None,
        layout=layout, shared=tape,
    )


CANDIDATE_ATTENTION = ("prefix_self", "dense")


def cached_candidate_forward(
    model: nn.Module,
    ground_truth: GroundTruthOutput,
    expansion: TPAExpansion,
    *,
    attention: str = "dense",
) -> Float[Tensor, "batch len vocab"] | Float[Tensor, "batch len hidden"]:
    """Step (c) of the cached path: run only the candidate block over the cached prefix.

    The ``N = T2 - T`` candidate slots run as one query block with position ids
    ``expansion.position_ids[:, T:]`` against the ground-truth pass's KV cache plus
    themselves. With ``attention="dense"`` (default) the model's own implementation runs
    with the dense ``[B, 1, N, T + N]`` slice of the ribbon mask. With
    ``attention="prefix_self"`` a registered attention function
    (:func:`tokinteract.hf.prefix_self_attention`) computes, per candidate query, one
    softmax over the ``T`` cached keys (masked by the ribbon rule: non-pad and ``<= t``) and
    its own key, GQA-aware, so the ``N x N`` candidate block is never formed (``N * T``
    instead of ``N * (T + N)`` scores). Both equal :func:`packed_forward`'s ``[:, T:]``.

    Which is faster depends on the kernels: ``prefix_self`` materialises its ``N x T`` scores,
    while SDPA's fused kernel with the dense mask computes more scores without materialising
    them; the dense default was the faster on CPU (timing in the CHANGELOG).

    The cache is restored to its ``T`` ground-truth entries afterwards (``crop``), also on
    exceptions, so it can be reused for another candidate block.

    Args:
        model: the model that produced ``ground_truth``.
        ground_truth: from :func:`ground_truth_forward` on ``expansion.input_ids[:, :T]``.
        expansion: from :func:`tokinteract.tpa_expand` on the same ground truth.
        attention: ``"prefix_self"`` or ``"dense"``.

    Returns:
        ``[B, T2 - T, V]`` candidate-block logits; ``torch.cat([ground_truth.logits, it], 1)``
        has the ``[B, T2, V]`` layout of :func:`packed_forward`. If ``ground_truth`` was
        computed with ``output="hidden"``, ``[B, T2 - T, H]`` hidden states instead (to
        concatenate with ``ground_truth.hidden_states``).
    """
    if not isinstance(ground_truth, GroundTruthOutput):
        raise TypeError(f"ground_truth must be a GroundTruthOutput, got {type(ground_truth).__name__}")
    if not isinstance(expansion, TPAExpansion):
        raise TypeError(f"expansion must be a TPAExpansion, got {type(expansion).__name__}")
    check_choice("attention", attention, CANDIDATE_ATTENTION)
    families.check_options(model, output=ground_truth.output, attention=attention)
    T = expansion.seq_len
    gt_ids = ground_truth.input_ids
    if tuple(gt_ids.shape) != (expansion.input_ids.shape[0], T) or not torch.equal(
        gt_ids.to(expansion.input_ids.device), expansion.input_ids[:, :T]
    ):
        raise ValueError(
            "expansion must be built from the ground truth of ground_truth: expansion.input_ids[:, :T] "
            f"{tuple(expansion.input_ids[:, :T].shape)} differs from ground_truth.input_ids {tuple(gt_ids.shape)}"
        )
    if not torch.equal(expansion.slot_is_context[:, :T].to(gt_ids.device), ground_truth.attention_mask):
        raise ValueError("expansion was built with a different padding mask than ground_truth.attention_mask")
    _check_image_tokens(model, expansion.input_ids[:, T:], "the candidate and unused slots of expansion.input_ids")
    dev = _attn.model_device(model)
    exp = expansion.to(dev)
    B, N = exp.input_ids.shape[0], exp.expanded_len - T
    output = ground_truth.output
    first = ground_truth.hidden_states if output == "hidden" else ground_truth.logits
    if N == 0:
        return first.new_zeros((B, 0, first.shape[-1]))
    cache = ground_truth.cache
    if cache is None:
        _notice(
            "nocache",
            "tokinteract.hf: the ground-truth pass has no KV cache (gradient checkpointing, or "
            "use_cache=False); running the packed forward for the candidate block instead.",
        )
        return packed_forward(model, expansion, output=output, **ground_truth.model_inputs)[:, T:]
    if cache.get_seq_length() != T:
        raise ValueError(f"ground_truth.cache must hold exactly the T={T} ground-truth tokens, holds {cache.get_seq_length()}")
    if ground_truth.layout is None:
        raise ValueError("ground_truth must come from tokinteract.hf.ground_truth_forward (it has no layout)")
    p = _plan.plan(model, exp, ground_truth.layout)
    ids = exp.input_ids[:, T:]
    T2 = exp.expanded_len
    tape = ground_truth.shared
    try:
        with tape.candidates() if tape is not None else contextlib.nullcontext():
            if attention == "prefix_self":
                _attn.ensure_prefix_self_registered()
                target = _base_model(model) if output == "hidden" else model
                with _attn.use_attn_implementation(model, _attn.PREFIX_SELF):
                    masks = {lt: _plan.dense(r, B, T, N, T, dev) for lt, r in p.rules.items()}
                    am = next(iter(masks.values())) if len(masks) == 1 else masks
                    out = target(
                        input_ids=ids, attention_mask=am, position_ids=_plan.model_position_ids(p, T),
                        cache=cache, use_cache=True,
                    )
            else:
                out = _forward_plan(model, ids, p, T, T2, output, cache=cache, use_cache=True)
    finally:
        grown = cache.get_seq_length() - T
        if grown > 0:
            cache.crop(-grown)
    return _result(out, output)


def tpa_forward(
    model: nn.Module,
    expansion: TPAExpansion,
    *,
    mode: str = "cached",
    attention: str = "dense",
    output: str = "logits",
    **model_inputs: Any,
) -> Float[Tensor, "batch xseq vocab"] | Float[Tensor, "batch xseq hidden"]:
    """Full ``[B, T2, V]`` logits over a TPA expansion, for teachers and students alike.

    ``mode="cached"``: :func:`ground_truth_forward` on ``expansion.input_ids[:, :T]``, then
    :func:`cached_candidate_forward`, concatenated. ``mode="packed"``:
    :func:`packed_forward`. Both give the same logits and gradients; run a teacher under
    ``torch.no_grad()``.

    Args:
        model: a Hugging Face causal LM or ``LlavaForConditionalGeneration``.
        expansion: from :func:`tokinteract.tpa_expand`.
        mode: ``"cached"`` or ``"packed"``.
        attention: candidate-pass attention for ``mode="cached"`` (``"prefix_self"`` or ``"dense"``).
        output: ``"logits"`` (default, ``[B, T2, V]``) or ``"hidden"`` (``[B, T2, H]``, the LM
            head's input; see :func:`packed_forward`).
        **model_inputs: e.g. ``pixel_values``.
    """
    check_choice("mode", mode, ("cached", "packed"))
    check_choice("output", output, OUTPUTS)
    if mode == "packed":
        return packed_forward(model, expansion, output=output, **model_inputs)
    T = expansion.seq_len
    gt = ground_truth_forward(
        model, expansion.input_ids[:, :T], expansion.slot_is_context[:, :T], output=output, **model_inputs
    )
    cand = cached_candidate_forward(model, gt, expansion, attention=attention)
    first = gt.hidden_states if output == "hidden" else gt.logits
    return torch.cat([first, cand], dim=1)
