"""Preflight: everything that can be checked before a model loads, in one report.

``tokinteract-train`` runs :func:`preflight` first (``DataArguments.preflight``, default on):

* **Output directory**: it can be created and written (a probe file is written and
  removed); it does not hold an earlier run unless ``resume_from_checkpoint`` or
  ``overwrite_output_dir`` is set (:func:`tokinteract.mllm.checkpoints.check_output_dir`;
  ``existing_run=False`` leaves this to ``DistillationTrainer.train``); its file system has room for one
  checkpoint, estimated as 5x the student's weight files (weights + two fp32 Adam moments
  of bf16 weights; 3x would do for fp32 weights). No estimate without local weight files
  (hub ids, ``tiny``): the report says so.
* **Resume**: ``resume_from_checkpoint`` names a complete checkpoint ("not found" when the
  path does not exist); ``last`` / ``true`` needs one in ``output_dir``.
* **Model paths** (``student_checkpoint``, ``student_language_model``, ``vision_tower``,
  ``projector_checkpoint``, ``teacher_checkpoint``): an existing local folder, or a
  well-formed Hugging Face Hub id. A value that looks local (absolute, ``./``, ``~``, a
  backslash, or whose first component exists here) and does not exist is "not found".
* **The whole dataset**: every sample's structure (:func:`tokinteract.mllm.data.normalize_sample`),
  placeholders vs images, tokenization with the chat template and truncation to
  ``max_length`` (a sample with nothing left to supervise is bad; truncated ones are
  counted), and every image file present and identified by its header (``PIL.Image.open``,
  which reads the header only; a file that is corrupt past its header is caught when the
  sample is loaded, by the trainer's bad-sample policy); with ``image_token_policy: remap``
  and a local teacher checkpoint, no tokenized sample may hold the teacher's image-token id;
  with IVA weighted by attention (``iva > 0``, ``iva_weights`` not ``uniform``), every sample
  with an image has an instruction token after its first image (:func:`tokinteract.instruction_rows`:
  Eq. 4's weights are undefined otherwise, and the step would stop with an error).

The dataset scan runs in ``workers`` processes (fork, chunks of :data:`CHUNK` samples) and
its per-chunk results are cached in ``cache_dir`` under a key made of the data file's
fingerprint (absolute path, size, modification time) and every setting that changes a result
(tokenizer and chat template, ``max_length``, image tokens, system prompt); a chunk is
re-scanned only when one of its images' fingerprints (size, modification time) changed.

Bad samples are not an error by themselves: the report lists them, and the run stops before
any model loads only when they exceed ``bad_sample_limit`` of the file's samples; otherwise
they are dropped from the dataset and counted against the same limit as samples found bad
mid-run (:mod:`tokinteract.mllm.reliability`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokinteract.mllm.checkpoints import OutputDirError, check_output_dir, checkpoint_problem, latest_checkpoint

__all__ = [
    "CHUNK",
    "PreflightError",
    "PreflightReport",
    "check_model_path",
    "check_output_writable",
    "default_cache_dir",
    "preflight",
    "scan_dataset",
]

logger = logging.getLogger(__name__)

CHUNK = 512
_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
MODEL_PATH_ARGS = ("student_checkpoint", "student_language_model", "vision_tower", "projector_checkpoint",
                   "teacher_checkpoint")


class PreflightError(ValueError):
    """Preflight found problems that stop the run before any model loads (the message lists them)."""


@dataclass
class PreflightReport:
    """What preflight found.

    Args:
        data_path: the dataset file scanned.
        samples: number of samples in it.
        bad: sample index -> why it is bad (left out of training).
        truncated: samples whose tokenized length exceeds ``max_length`` (cut, not bad).
        longest: the longest tokenized sample.
        images: image files checked (present and decodable by header).
        errors: problems that stop the run before any model loads.
        notes: information that does not stop the run.
        chunks_cached: dataset chunks whose result came from the fingerprint cache.
        chunks_scanned: dataset chunks scanned in this run.
        seconds: wall time of the scan.
    """

    data_path: str = ""
    samples: int = 0
    bad: dict[int, str] = field(default_factory=dict)
    truncated: int = 0
    longest: int = 0
    images: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chunks_cached: int = 0
    chunks_scanned: int = 0
    seconds: float = 0.0

    def summary(self, limit: int = 10) -> str:
        head = (
            f"preflight: {self.samples} sample(s) in {self.data_path!r}, {len(self.bad)} bad, {self.truncated} "
            f"truncated to max_length, longest {self.longest} tokens, {self.images} image(s) checked "
            f"({self.chunks_scanned} chunk(s) scanned, {self.chunks_cached} from cache, {self.seconds:.1f} s)"
        )
        lines = [head]
        lines += [f"  error: {e}" for e in self.errors]
        for i, (index, why) in enumerate(sorted(self.bad.items())):
            if i == limit:
                lines.append(f"  ... and {len(self.bad) - limit} more bad sample(s)")
                break
            lines.append(f"  bad sample {index}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------ paths and disk
def check_model_path(arg: str, value: str | None) -> str | None:
    """Why ``value`` (the argument ``arg``) cannot name a model, or None.

    Accepted: an existing local folder, or a well-formed Hub id that does not look local.
    """
    if not value:
        return None
    p = Path(value).expanduser()
    if p.exists():
        return None if p.is_dir() else f"{arg} {value!r} is a file, expected a checkpoint folder"
    first = Path(value).parts[0] if Path(value).parts else ""
    looks_local = (
        os.path.isabs(value) or value.startswith((".", "~")) or "\\" in value or value.endswith("/")
        or value.count("/") > 1 or (first != value and os.path.exists(first))
    )
    if looks_local:
        return f"{arg} {value!r} not found (no such local folder)"
    if not _HUB_ID.match(value) or "--" in value or ".." in value:
        return f"{arg} {value!r} not found: neither a local folder nor a valid Hugging Face Hub id ('name' or 'org/name')"
    return None


def check_output_writable(output_dir: str) -> str | None:
    """Why ``output_dir`` cannot be created and written, or None (a probe file is written and removed)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".preflight-", dir=output_dir)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return f"output_dir {output_dir!r} is not writable ({type(exc).__name__}: {exc})"
    return None


def _weight_bytes(path: str | None) -> int | None:
    if not path or not os.path.isdir(path):
        return None
    files = [f for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()]
    return sum(f.stat().st_size for f in files) or None


def checkpoint_bytes_estimate(margs: Any) -> int | None:
    """Bytes one checkpoint of the student needs (5x its local weight files), or None."""
    parts = [_weight_bytes(margs.student_checkpoint)] if margs.student_checkpoint else [
        _weight_bytes(margs.student_language_model), _weight_bytes(margs.vision_tower)
    ] if margs.student_language_model else []
    if not parts or any(p is None for p in parts):
        return None
    return 5 * sum(parts)  # type: ignore[arg-type]


# ------------------------------------------------------------------ dataset scan
def default_cache_dir() -> Path:
    """``$TOKINTERACT_CACHE_DIR/preflight``, else ``$XDG_CACHE_HOME/tokinteract/preflight``
    (``~/.cache`` when unset)."""
    root = os.environ.get("TOKINTERACT_CACHE_DIR")
    if root:
        return Path(root) / "preflight"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokinteract" / "preflight"


def _image_paths(sample: Any) -> list[str]:
    img = sample.get("image") if isinstance(sample, dict) else None
    if isinstance(img, str):
        return [img]
    if isinstance(img, list):
        return [x for x in img if isinstance(x, str)]
    return []


def _image_stats(samples: list[Any], folder: Path) -> list[list[Any]]:
    out = []
    for s in samples:
        for r in _image_paths(s):
            try:
                st = os.stat(folder / r)
                out.append([r, st.st_size, st.st_mtime_ns])
            except OSError:
                out.append([r, -1, -1])
    return out


_WORKER: dict[str, Any] = {}


def _scan_chunk(args: tuple[int, list[Any]]) -> dict[str, Any]:
    """Scan samples ``start..`` of one chunk (uses the settings in ``_WORKER``)."""
    from PIL import Image

    from tokinteract.mllm.data import DataError, encode_conversation, normalize_sample

    start, samples = args
    w = _WORKER
    bad: dict[str, str] = {}
    truncated = longest = n_images = 0
    for j, sample in enumerate(samples):
        i = start + j
        try:
            messages, rel = normalize_sample(sample, i, image_token=w["image_token"], source=w["source"])
            for r in rel:
                p = w["folder"] / r
                n_images += 1
                if not os.path.isfile(p):
                    raise DataError(f"image {str(p)!r} is missing")
                try:
                    with Image.open(p) as im:
                        im.size  # noqa: B018 - the header is parsed by open()
                except Exception as exc:  # PIL raises many types for corrupt headers
                    raise DataError(f"image {str(p)!r} is not a readable image ({type(exc).__name__}: {exc})") from exc
            enc = encode_conversation(
                messages, w["tokenizer"], num_image_tokens=w["num_image_tokens"], image_token=w["image_token"],
                max_length=w["max_length"], system_prompt=w["system_prompt"], where=f"{w['source']}: sample {i}",
            )
            if w["iva_rows"] and bool(enc.visual_mask.any()):
                from tokinteract.iva import instruction_rows

                if not bool(instruction_rows(enc.instruction_mask[None], enc.visual_mask[None]).any()):
                    raise DataError(
                        "IVA needs instruction tokens after the image (its weights are the instruction rows' "
                        "attention to the visual tokens, Eq. 4); this sample has none after its first image"
                    )
            for t in w["forbidden"]:
                if bool((enc.input_ids == t).any()):
                    raise DataError(f"its text holds token id {t}, {w['forbidden'][t]}")
            truncated += int(enc.truncated)
            longest = max(longest, int(enc.input_ids.shape[0]))
        except DataError as exc:
            bad[str(i)] = str(exc)
    return {"bad": bad, "truncated": truncated, "longest": longest, "images": n_images}


def _fingerprint(data_path: str, settings: dict[str, Any]) -> str:
    st = os.stat(data_path)
    key = json.dumps([_VERSION, os.path.abspath(data_path), st.st_size, st.st_mtime_ns, settings], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()


def scan_dataset(
    data_path: str,
    image_folder: str | None,
    tokenizer: Any,
    *,
    num_image_tokens: int,
    max_length: int | None,
    system_prompt: str | None = None,
    image_token: str = "<image>",
    workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    forbidden_ids: dict[int, str] | None = None,
    iva_rows: bool = False,
) -> PreflightReport:
    """Scan every sample of ``data_path`` (see the module docstring); never raises for bad samples.

    Args:
        workers: processes (0: ``min(os.cpu_count(), 8)``; 1: in this process).
        cache_dir: where per-chunk results are cached (None: :func:`default_cache_dir`;
            ``""``: no cache).
        forbidden_ids: token ids no tokenized sample may hold, each with the reason (the
            teacher's image-token id under ``image_token_policy="remap"``).
        iva_rows: a sample with an image and no instruction token after its first image is
            bad (:func:`tokinteract.instruction_rows`; IVA with attention weights needs one).

    Raises:
        tokinteract.mllm.data.DataError: the file itself cannot be read or parsed.
    """
    from tokinteract.mllm.data import load_llava_json

    t0 = time.perf_counter()
    raw = load_llava_json(data_path)
    folder = Path(image_folder) if image_folder is not None else Path(".")
    settings = dict(
        folder=str(folder.resolve()), tokenizer=_tokenizer_fingerprint(tokenizer), num_image_tokens=num_image_tokens,
        max_length=max_length, system_prompt=system_prompt, image_token=image_token, chunk=CHUNK,
        forbidden=sorted((forbidden_ids or {}).items()), iva_rows=bool(iva_rows),
    )
    cache_file = None
    cached: dict[str, Any] = {}
    if cache_dir != "":
        cache_file = Path(cache_dir or default_cache_dir()) / f"{_fingerprint(data_path, settings)}.json"
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
    chunks = [(s, raw[s : s + CHUNK]) for s in range(0, len(raw), CHUNK)]
    stats = {str(s): _image_stats(c, folder) for s, c in chunks}
    todo = [(s, c) for s, c in chunks if cached.get(str(s), {}).get("images_fp") != stats[str(s)]]
    report = PreflightReport(data_path=str(data_path), samples=len(raw))
    report.chunks_cached = len(chunks) - len(todo)
    report.chunks_scanned = len(todo)
    _WORKER.update(
        tokenizer=tokenizer, folder=folder, num_image_tokens=num_image_tokens, max_length=max_length,
        system_prompt=system_prompt, image_token=image_token, source=str(data_path), forbidden=forbidden_ids or {},
        iva_rows=bool(iva_rows),
    )
    n = workers or min(os.cpu_count() or 1, 8)
    if n > 1 and len(todo) > 1:
        import multiprocessing as mp

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust pool must not be live across fork
        with ProcessPoolExecutor(min(n, len(todo)), mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_scan_chunk, todo))
    else:
        results = [_scan_chunk(t) for t in todo]
    for (s, _), r in zip(todo, results):
        cached[str(s)] = {**r, "images_fp": stats[str(s)]}
    for s, _ in chunks:
        r = cached[str(s)]
        report.bad.update({int(k): v for k, v in r["bad"].items()})
        report.truncated += r["truncated"]
        report.longest = max(report.longest, r["longest"])
        report.images += r["images"]
    if cache_file is not None and todo:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({str(s): cached[str(s)] for s, _ in chunks}))
            os.replace(tmp, cache_file)
        except OSError as exc:
            logger.warning("preflight: cannot write the scan cache %s (%s)", cache_file, exc)
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------ everything
def load_tokenizer(margs: Any, dargs: Any) -> tuple[Any, int]:
    """The student's tokenizer and visual tokens per image, read without loading a model."""
    from transformers import AutoConfig, AutoTokenizer

    if margs.tiny:
        from tokinteract.mllm.synthetic import vocabulary
        from tokinteract.mllm.tokenizer import build_word_tokenizer

        tok = build_word_tokenizer(vocabulary(margs.tiny_grid), model_max_length=dargs.max_length)
        return tok, (margs.tiny_image_size // margs.tiny_patch_size) ** 2
    if margs.student_checkpoint:
        from tokinteract.mllm.model import num_image_tokens

        tok = AutoTokenizer.from_pretrained(margs.student_checkpoint)
        return tok, num_image_tokens(AutoConfig.from_pretrained(margs.student_checkpoint))
    tok = AutoTokenizer.from_pretrained(margs.student_language_model)
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = AutoConfig.from_pretrained(margs.vision_tower)
    vc = getattr(cfg, "vision_config", cfg)
    return tok, (vc.image_size // vc.patch_size) ** 2


def _llava_student(margs: Any) -> bool:
    """Whether the student is the paper's LLaVA (read from a checkpoint's config, no weights)."""
    if not margs.student_checkpoint:
        return True  # tiny or built from a language model + SigLIP: always a LLaVA
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(margs.student_checkpoint).model_type == "llava"


def _remapped_image_id(margs: Any, dcfg: Any, tok: Any) -> dict[int, str]:
    """``{teacher image-token id: reason}`` when ``image_token_policy="remap"`` gives the teacher
    another id than the student's (read from a local teacher checkpoint's config, no weights)."""
    if dcfg.image_token_policy != "remap" or not margs.teacher_checkpoint or not os.path.isdir(margs.teacher_checkpoint):
        return {}
    from transformers import AutoConfig

    t_img = getattr(AutoConfig.from_pretrained(margs.teacher_checkpoint), "image_token_id", None)
    if t_img is None or int(t_img) == tok.convert_tokens_to_ids("<image>"):
        return {}
    return {int(t_img): "the teacher's image-token id (image_token_policy='remap' would make it an image token)"}


def _iva_needs_rows(dcfg: Any) -> bool:
    """Whether the run computes IVA weights from attention (then every image needs an instruction after it)."""
    s = dcfg.resolved()
    return s["iva"] > 0 and s["iva_weights"] != "uniform"


def preflight(margs: Any, dargs: Any, dcfg: Any, targs: Any, *, existing_run: bool = True) -> PreflightReport:
    """Run every check of the module docstring; log the report and return it.

    ``existing_run=False`` skips the earlier-run check of ``output_dir`` (when the resume
    decision is not known yet: ``DistillationTrainer.train`` checks it again).

    Raises:
        PreflightError: a path, the output directory or the disk is unusable, or the bad
            samples exceed ``dcfg.bad_sample_limit``; the message is the whole report.
    """
    errors: list[str] = []
    notes: list[str] = []
    for arg in MODEL_PATH_ARGS:
        why = check_model_path(arg, getattr(margs, arg))
        if why:
            errors.append(why)
    if not dargs.data_path:
        errors.append("data_path is required")
    elif not os.path.isfile(dargs.data_path):
        errors.append(f"data_path {dargs.data_path!r} not found")
    if dargs.image_folder is not None and not os.path.isdir(dargs.image_folder):
        errors.append(f"image_folder {dargs.image_folder!r} not found")
    out = targs.output_dir
    resume = targs.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        if latest_checkpoint(out) is None:
            errors.append(f"resume_from_checkpoint={resume!r}: no complete checkpoint-* folder in output_dir {out!r}")
    elif isinstance(resume, str) and resume.lower() != "false":
        if not os.path.exists(resume):
            errors.append(f"resume_from_checkpoint {resume!r} not found")
        elif checkpoint_problem(resume) is not None:
            errors.append(f"resume_from_checkpoint {resume!r} is not a complete checkpoint: it {checkpoint_problem(resume)}")
    why = check_output_writable(out)
    if why:
        errors.append(why)
    else:
        if existing_run and not dcfg.overwrite_output_dir:
            resuming = bool(targs.resume_from_checkpoint) and str(targs.resume_from_checkpoint).lower() != "false"
            try:
                check_output_dir(out, resuming=resuming, overwrite=False)
            except OutputDirError as exc:
                errors.append(str(exc))
        need = checkpoint_bytes_estimate(margs)
        if need is None:
            notes.append("no checkpoint size estimate (no local weight files); free disk not checked")
        else:
            free = shutil.disk_usage(out).free
            if free < need:
                errors.append(
                    f"output_dir {out!r} has {free / 2**30:.2f} GiB free but one checkpoint needs about "
                    f"{need / 2**30:.2f} GiB (5x the student's weight files)"
                )
    report = PreflightReport(data_path=dargs.data_path)
    if not errors and not _llava_student(margs):
        notes.append(
            "dataset scan skipped: the student is not a LLaVA; its processor pipeline "
            "(tokinteract.mllm.processor_data) refuses a bad sample when it loads, naming its index and file"
        )
    elif not errors:
        from tokinteract.mllm.data import DataError

        tok, n_vis = load_tokenizer(margs, dargs)
        try:
            report = scan_dataset(
                dargs.data_path, dargs.image_folder, tok, num_image_tokens=n_vis, max_length=dargs.max_length,
                system_prompt=dargs.system_prompt, workers=dargs.preflight_workers,
                cache_dir=dargs.preflight_cache_dir, forbidden_ids=_remapped_image_id(margs, dcfg, tok),
                iva_rows=_iva_needs_rows(dcfg),
            )
        except DataError as exc:
            errors.append(str(exc))
        limit = dcfg.bad_sample_limit
        if len(report.bad) > limit * report.samples:
            errors.append(
                f"{len(report.bad)} bad sample(s) of {report.samples} exceed bad_sample_limit={limit:g}; "
                "fix or remove them, or raise bad_sample_limit"
            )
        elif report.bad:
            notes.append(f"{len(report.bad)} bad sample(s) are left out of training (within bad_sample_limit={limit:g})")
    report.errors, report.notes = errors, notes + report.notes
    text = report.summary()
    if errors:
        raise PreflightError(text)
    (logger.warning if report.bad else logger.info)("%s", text)
    return report
