"""Reference MLLM distillation trainer (install ``tokinteract[mllm]``).

* :mod:`tokinteract.mllm.model`: LLaVA (SigLIP + GELU MLP + Qwen2/2.5/3) from pretrained
  parts or tiny configs, or any supported family from a checkpoint (``load_pretrained``);
  trainable parts; teacher/student compatibility checks; saving.
* :mod:`tokinteract.mllm.data`: LLaVA-format JSON, chat-template tokenization, labels and
  per-token visual / instruction / response masks, truncation, collation.
* :mod:`tokinteract.mllm.processor_data`: the same data through any supported family's own
  processor (Qwen-VL, Gemma 3, LLaVA-NeXT/OneVision, Idefics3, SmolVLM, InternVL).
* :mod:`tokinteract.mllm.trainer`: ``DistillationTrainer`` (a ``transformers.Trainer``
  whose step is one pipeline of small parts ending in :class:`tokinteract.AlignTILoss`).
* :mod:`tokinteract.mllm.config`: its configuration, one dataclass per concern (method, IVA,
  TPA, on-policy, loss, teacher/student pair, faults), joined in ``DistillationConfig``.
* :mod:`tokinteract.mllm.cli`: the ``tokinteract-train`` console script.
* :mod:`tokinteract.mllm.synthetic` and :mod:`tokinteract.mllm.tokenizer`: an offline
  synthetic shapes task and its word-level tokenizer (tests, demo).
"""

from tokinteract.mllm.config import (
    FaultConfig,
    IVAConfig,
    LossConfig,
    MethodConfig,
    OnPolicyConfig,
    PairConfig,
    TPAConfig,
)
from tokinteract.mllm.data import DataError, LlavaCollator, LlavaJsonDataset, encode_conversation, load_llava_json
from tokinteract.mllm.model import (
    build_llava_from_pretrained,
    build_processor,
    build_tiny_llava,
    check_pair,
    check_same_tokenizer,
    check_teacher_student,
    load_pretrained,
    num_image_tokens,
    save_pretrained_student,
    set_trainable,
    set_trainable_parts,
)
from tokinteract.mllm.processor_data import ProcessorCollator, ProcessorDataset
from tokinteract.mllm.synthetic import SyntheticConfig, generate_dataset, vocabulary
from tokinteract.mllm.tokenizer import build_word_tokenizer
from tokinteract.mllm.trainer import METHODS, DistillationConfig, DistillationTrainer, run_through_wrapper

__all__ = [
    "METHODS",
    "DataError",
    "DistillationConfig",
    "DistillationTrainer",
    "FaultConfig",
    "IVAConfig",
    "LlavaCollator",
    "LlavaJsonDataset",
    "LossConfig",
    "MethodConfig",
    "OnPolicyConfig",
    "PairConfig",
    "ProcessorCollator",
    "ProcessorDataset",
    "SyntheticConfig",
    "TPAConfig",
    "build_llava_from_pretrained",
    "build_processor",
    "build_tiny_llava",
    "build_word_tokenizer",
    "check_pair",
    "check_same_tokenizer",
    "check_teacher_student",
    "encode_conversation",
    "generate_dataset",
    "load_llava_json",
    "load_pretrained",
    "num_image_tokens",
    "run_through_wrapper",
    "save_pretrained_student",
    "set_trainable",
    "vocabulary",
]
