"""Peer implementations for the benchmarks: TRL's chunked distillation loss and Liger's fused-linear JSD.

TRL (``trl``, an optional benchmark dependency, see ``benchmarks/requirements-bench.txt``):

* :func:`trl_chunked_divergence` is ``trl.trainer.distillation_trainer._chunked_divergence_loss``,
  the loss of TRL's ``DistillationTrainer`` (hidden states + LM heads, chunks of
  ``_CHUNKED_LM_HEAD_CHUNK_SIZE`` rows under gradient checkpointing);
* :func:`trl_generalized_jsd` is ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd``),
  the loss of TRL's GKD trainer on full logits at every position.

Both modules import ``datasets`` (and through it pandas and pyarrow) at the top, which the
losses themselves never use. When that import fails, the two functions are taken from the
**installed** TRL source files, verbatim (``ast``: the function definitions and the chunk-size
constant only) and executed with ``torch``, ``math`` and ``F`` as their module has them;
``maybe_gather_lm_head_ctx`` (a DeepSpeed ZeRO-3 gather) becomes ``nullcontext``, which is what
TRL's own helper returns without ZeRO-3. :data:`TRL_SOURCE` says which way was taken. Either
way the benchmarks check the loaded functions against ``tests/reference.py`` before timing.
"""

from __future__ import annotations

import ast
import math
import os
from contextlib import nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TRL_SOURCE = "not loaded"
_TRL: dict[str, Any] = {}


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "(not installed)"


def _from_source(module: str, names: list[str], method_of: str | None = None) -> dict[str, Any]:
    """Definitions ``names`` (functions or constants; methods of class ``method_of``) of an installed TRL module."""
    import trl  # the file is located without importing its module (whose package __init__ may need datasets)

    origin = str(Path(trl.__file__).parent.joinpath(*module.split(".")[1:])) + ".py"
    tree = ast.parse(Path(origin).read_text())
    body = tree.body
    if method_of is not None:
        cls = [n for n in body if isinstance(n, ast.ClassDef) and n.name == method_of]
        if not cls:
            raise ImportError(f"{module} has no class {method_of}")
        body = cls[0].body
    picked = []
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            node.decorator_list = []  # @staticmethod
            picked.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            picked.append(node)
    found = {n.name if isinstance(n, ast.FunctionDef) else n.targets[0].id for n in picked}
    if found != set(names):
        raise ImportError(f"{module}: {sorted(set(names) - found)} not found in {origin}")
    import torch.distributed.tensor  # noqa: F401  (the module has it imported through accelerate)

    ns: dict[str, Any] = {"torch": torch, "F": F, "math": math, "maybe_gather_lm_head_ctx": lambda *a: nullcontext()}
    exec(compile(ast.Module(body=picked, type_ignores=[]), origin, "exec"), ns)
    return {n: ns[n] for n in names}


def load_trl() -> dict[str, Any]:
    """``{"chunked": fn, "chunk_size": int, "gkd_jsd": fn}`` from the installed TRL; ImportError if absent."""
    global TRL_SOURCE
    if _TRL:
        return _TRL
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"trl is not installed ({exc}); pip install -r benchmarks/requirements-bench.txt") from exc
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
        from trl.trainer.distillation_trainer import _CHUNKED_LM_HEAD_CHUNK_SIZE, _chunked_divergence_loss

        _TRL.update(chunked=_chunked_divergence_loss, chunk_size=_CHUNKED_LM_HEAD_CHUNK_SIZE,
                    gkd_jsd=GKDTrainer.generalized_jsd_loss)
        TRL_SOURCE = f"trl {package_version('trl')}, imported"
    except ImportError as exc:
        d = _from_source("trl.trainer.distillation_trainer",
                         ["_CHUNKED_LM_HEAD_CHUNK_SIZE", "_chunk", "_chunked_divergence_loss"])
        g = _from_source("trl.experimental.gkd.gkd_trainer", ["generalized_jsd_loss"], method_of="GKDTrainer")
        _TRL.update(chunked=d["_chunked_divergence_loss"], chunk_size=d["_CHUNKED_LM_HEAD_CHUNK_SIZE"],
                    gkd_jsd=g["generalized_jsd_loss"])
        TRL_SOURCE = (f"trl {package_version('trl')}: _chunked_divergence_loss and GKDTrainer.generalized_jsd_loss "
                      f"executed from the installed source (the trainer modules' import failed: {exc})")
    return _TRL


def trl_available() -> bool:
    try:
        load_trl()
    except ImportError:
        return False
    return True


def trl_chunked_divergence(h_s, W_s, h_t, W_t, mask, beta: float = 0.0, chunk_size: int | None = None):
    """TRL DistillationTrainer's loss: mean over ``mask`` rows; ``beta=0`` is forward KL ``KL(T || S)``."""
    t = load_trl()
    loss, _, _ = t["chunked"](h_s, h_t, W_s, W_t, mask, beta, chunk_size or t["chunk_size"])
    return loss


def trl_gkd_jsd(student_logits, teacher_logits, labels, beta: float = 0.0):
    """TRL GKDTrainer's loss on full logits ``[B, T, V]`` (already shifted), mean over ``labels != -100``."""
    return load_trl()["gkd_jsd"](student_logits, teacher_logits, labels=labels, beta=beta)


def liger_jsd(h_s, W_s, h_t, W_t, labels, beta: float = 0.0, compiled: bool = False, chunk_size: int = 1024):
    """``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` as Liger ships it, soft loss only
    (``weight_hard_loss=0``, ``weight_soft_loss=1``); ``beta=0`` is forward KL ``KL(T || S)``."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=compiled,
                                  chunk_size=chunk_size)
    return mod(h_s, W_s, h_t, W_t, labels)
