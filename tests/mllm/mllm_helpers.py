"""Helpers shared by tests/mllm (a uniquely named module: tests are not a package)."""

from __future__ import annotations

import contextlib

import json
from pathlib import Path

import torch

from tokinteract.mllm import build_tiny_llava

IMAGE_SIZE, PATCH = 32, 8
N_VIS = (IMAGE_SIZE // PATCH) ** 2  # 16 visual tokens per image


def make_model(tok, *, seed: int = 0, hidden: int = 32, layers: int = 2, family: str = "qwen2", **kw):
    """A tiny random LLaVA (SigLIP 32 px / patch 8, Qwen2 or Qwen3) for ``tok``."""
    return build_tiny_llava(
        vocab_size=kw.pop("vocab_size", len(tok)), image_token_id=kw.pop("image_token_id", tok.convert_tokens_to_ids("<image>")),
        family=family, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
        image_size=kw.pop("image_size", IMAGE_SIZE), patch_size=kw.pop("patch_size", PATCH), vision_hidden_size=32,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=seed, **kw,
    )


def tiny_config(tmp_path: Path, synth, name: str = "cfg.yaml", **kw) -> Path:
    """A ``tokinteract-train`` YAML config (tiny models, the session's synthetic data) with ``kw`` overrides."""
    import yaml

    cfg = dict(
        tiny=True, tiny_hidden_size=32, tiny_teacher_hidden_size=48, method="align_ti", iva_layer=1,
        data_path=str(synth.train), image_folder=str(synth.image_folder), output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2, max_steps=2, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, learning_rate=1e-3, disable_tqdm=True, seed=0,
    )
    cfg.update(kw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_json(path: Path, samples) -> Path:
    path.write_text(json.dumps(samples))
    return path


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def torchrun_two_ranks(worker: Path, *args: str, timeout: int = 300) -> None:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 worker *args`` on CPU (one
    thread per rank, this folder on ``PYTHONPATH``); fails the test with stderr's tail.

    ``--standalone`` lets torchrun's rendezvous bind its TCP store to port 0 and keep it open, so
    the OS picks the port atomically and the ranks reuse that store. Choosing a "free" port here
    (bind to 0, close, pass ``--master_port``) left it free for seconds, while the launcher
    imported torch, for any other process on the machine to take: the launch then failed.

    Past ``timeout`` (ranks waiting on each other) every rank gets SIGABRT first, which makes
    Python's fault handler (``PYTHONFAULTHANDLER``) print each thread's stack into stderr, so the
    failure says where each rank hung; then the launcher and every process it started are killed
    (torchrun may start the ranks in sessions of their own, out of reach of a process-group
    kill, and a rank left alive would hold the stderr pipe open and a core busy).
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # the ranks must reuse the launcher's store
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            ranks = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ranks = []
        for p in ranks:  # each rank prints its Python stacks (fault handler) and stops
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGABRT)
        time.sleep(5)
        for p in [*ranks, psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, stderr = proc.communicate(timeout=60)
        stacks = stderr[stderr.find("Fatal Python error"):][:8000] if "Fatal Python error" in stderr else ""
        raise AssertionError(f"the 2-rank launch ran past {timeout} s (killed); the ranks' stacks:\n{stacks}\n"
                             f"... stderr's tail:\n{stderr[-2000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(stderr[-4000:])


DDP_RUNS = {"plain": {}, "lora": {"lora_r": 4, "learning_rate": 1e-2}}
"""The 2-rank DDP runs of :func:`ddp_runs_on_two_ranks` (tiny config overrides): the trainer's
(``test_mllm_cli.py``) and a LoRA student's (``test_mllm_lora.py``)."""


def ddp_runs_on_two_ranks(tmp_path: Path, synth) -> dict[str, Path]:
    """Train every config of :data:`DDP_RUNS` with ``ddp_worker.py`` on 2 CPU ranks (gloo), all in one
    launch; ``{name: folder with rank0.pt, rank1.pt}`` (read them with :func:`ddp_ranks`)."""
    out = tmp_path / "ranks"
    specs = []
    for name, kw in DDP_RUNS.items():
        cfg = tiny_config(tmp_path, synth, f"ddp_{name}.yaml", ddp_backend="gloo", output_dir=str(tmp_path / name), **kw)
        specs.append(f"{name}={cfg}")
    torchrun_two_ranks(Path(__file__).parent / "ddp_worker.py", out, *specs)
    return {name: out / name for name in DDP_RUNS}


def ddp_ranks(folder: Path) -> tuple[dict, dict, list[str]]:
    """Both ranks' records of one run of :func:`ddp_runs_on_two_ranks`; asserts both ranks ended with
    identical student weights. Returns the two records and the names of the changed weights."""
    r0, r1 = torch.load(folder / "rank0.pt"), torch.load(folder / "rank1.pt")
    for r in (r0, r1):
        assert "error" not in r, r.get("error")
    assert r0["world_size"] == r1["world_size"] == 2
    for k in r0["after"]:
        assert torch.equal(r0["after"][k], r1["after"][k]), k
    return r0, r1, [k for k in r0["after"] if not torch.equal(r0["after"][k], r0["before"][k])]


def save_pair(tmp_path: Path, make_model, make_processor) -> dict[str, Path]:
    """``{"student": path, "teacher": path}``: ``make_model(seed=1)`` / ``make_model(seed=2)``, each saved with
    ``make_processor()`` as a local checkpoint under ``tmp_path``."""
    ckpts = {}
    for role, seed in (("student", 1), ("teacher", 2)):
        ckpts[role] = tmp_path / role
        make_model(seed=seed).save_pretrained(ckpts[role])
        make_processor().save_pretrained(ckpts[role])
    return ckpts


def one_step(tr, student: torch.nn.Module, batch: dict) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    """One training-mode ``tr.compute_loss`` + backward of ``student`` on ``batch``: (loss, logged parts, grads)."""
    tr.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    student.train()
    student.zero_grad(set_to_none=True)
    loss = tr.compute_loss(student, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    parts = {k: float(v) for k, v in tr._part_sums.items()}
    student.zero_grad(set_to_none=True)
    return float(loss.detach()), parts, grads


FAMILY_SAMPLES = [
    {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is this picture"}, {"from": "gpt", "value": "a cat sat on the mat"}]},
    {"image": ["b.png", "a.png"], "conversations": [
        {"from": "human", "value": "<image> see the red dog <image> and the blue cat"},
        {"from": "gpt", "value": "two red"},
        {"from": "human", "value": "what is the dog"}, {"from": "gpt", "value": "yes it is here"}]},
    {"conversations": [{"from": "human", "value": "what is it"}, {"from": "gpt", "value": "no the dog is red"}]},
]
"""Three LLaVA-format samples for the family tests: one image, two images over two turns, text only."""


def write_family_data(root: Path) -> Path:
    """:data:`FAMILY_SAMPLES` as ``root/data.json`` with their two random images (16x24, 24x16)."""
    import numpy as np
    from PIL import Image

    for i, (name, (h, w)) in enumerate({"a.png": (16, 24), "b.png": (24, 16)}.items()):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return write_json(root / "data.json", FAMILY_SAMPLES)


def processor_trainer(tmp_path: Path, data: Path, processor, student, teacher, distill, collator):
    """A one-step ``DistillationTrainer`` over :func:`write_family_data`'s samples (batch 3, CPU)."""
    from transformers import TrainingArguments

    from tokinteract.mllm import DistillationTrainer
    from tokinteract.mllm.model import set_trainable_parts
    from tokinteract.mllm.processor_data import ProcessorDataset

    set_trainable_parts(student)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, learning_rate=1e-3, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    return DistillationTrainer(
        student, args, teacher=teacher, distill=distill, train_dataset=ProcessorDataset(data, data.parent, processor),
        data_collator=collator, processing_class=processor,
    )


def train_recording_tpa(tr, monkeypatch) -> tuple[float, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tr.train()`` (one step, ``logging_steps=1``) recording what its TPA used:
    ``(logged loss_tpa, the batch compute_loss got, candidates [B, T, d], candidate mask [B, T],
    supervised [B, T])``; ``supervised[b, t]``: token ``t + 1`` is a label (the positions TPA may use)."""
    rec = record_candidates(monkeypatch)
    orig_loss = tr.compute_loss

    def compute_loss(model, inputs, *a, **kw):
        rec["batch"] = {k: v.detach().clone() for k, v in inputs.items()}
        return orig_loss(model, inputs, *a, **kw)

    monkeypatch.setattr(tr, "compute_loss", compute_loss)
    tr.train()
    labels = rec["batch"]["labels"]
    supervised = torch.zeros_like(rec["mask"])
    supervised[:, :-1] = labels[:, 1:] != -100
    return tr.state.log_history[0]["loss_tpa"], rec["batch"], rec["cand"], rec["mask"], supervised


def record_candidates(monkeypatch) -> dict:
    """Record the TPA candidates the trainer draws next (both samplers) in the returned dict:
    ``"cand"`` ``[B, T, d]`` and ``"mask"`` ``[B, T]``."""
    import tokinteract.fused as fused_mod
    import tokinteract.mllm.trainer as trainer_mod

    rec: dict = {}

    def recorder(fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            rec["cand"], rec["mask"] = out.detach().clone(), kw["mask"].detach().clone()
            return out
        return wrapped

    monkeypatch.setattr(trainer_mod, "sample_candidates", recorder(trainer_mod.sample_candidates))
    monkeypatch.setattr(fused_mod, "fused_sample_candidates", recorder(fused_mod.fused_sample_candidates))
    return rec


def truncated_image_data(tmp_path: Path, synth, index: int = 10) -> Path:
    """A copy of the synthetic training data whose sample ``index`` has an image that keeps a
    valid header (preflight passes) but is cut short (loading it fails mid-run)."""
    raw = next(Path(synth.image_folder).rglob("*.png")).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(raw[: len(raw) // 2])
    s = json.loads(Path(synth.train).read_text())
    s[index]["image"] = str(cut)
    return write_json(tmp_path / "cut.json", s)


def all_finite_checkpoint(path: Path) -> None:
    """Every weight of ``path/model.safetensors`` and every tensor of the optimizer state
    (``optimizer.pt``, or FSDP's ``optimizer.bin``) is finite."""
    from safetensors.torch import load_file

    for k, v in load_file(path / "model.safetensors").items():
        assert torch.isfinite(v).all(), k
    opt_file = path / "optimizer.pt" if (path / "optimizer.pt").is_file() else path / "optimizer.bin"
    opt = torch.load(opt_file, weights_only=False)
    assert opt["state"], opt_file
    for s in opt["state"].values():
        for k, v in s.items():
            assert not torch.is_tensor(v) or torch.isfinite(v).all(), k
