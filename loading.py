"""loading.py — the one entry point for base models, tokenizers, devices, seeds and atomic writes.

Every other file (training, evaluation, geometry, rewinding, the arena CLI) loads its base model
through `load_model(spec)`, so that the miniature toy world and real Hugging Face checkpoints go
through exactly the same code path (DEVELOPERS.md: "two scales, one code path").

This module exists beside the seven files of the design card because it owns a responsibility none
of them has: shared plumbing that `train_*.py`, `evaluate.py`, `geometry.py` and `rewind.py` all
need, and that must not live in `arena.py` (those files never import `arena.py`).

    spec = "toy"            -> the committed miniature base model in toy_model/ (see toy_world.py)
    spec = "/path/to/dir"   -> any local HF-format directory (config.json + weights + tokenizer)
    spec = "Qwen/Qwen2.5-7B"-> a hub id (needs network or a filled HF cache)

Paper anchors: PAPER.md §6 and EVAL.md §7 (chat template with no system message; base models
without a template are prompted with raw text, as OpenCompass does for base checkpoints).

Deviations
1. Chat-template fallback: a tokenizer without `chat_template` gets the raw-text rendering that
   OpenCompass uses for base models (`opencompass.models.VLLM`): the message contents joined by a
   blank line, no role markers. The paper only uses it for BBH on Qwen2.5-7B base (which does ship
   a template); we apply it to any template-less tokenizer so every caller has one rendering rule.
2. Default dtype: bf16 on CUDA (the paper's training and evaluation precision) but fp32 on CPU,
   because CPU bf16 matmuls are slow and the toy world's tests compare logits at fp32 tolerances.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO_DIR = Path(__file__).resolve().parent
TOY_MODEL_DIR = REPO_DIR / "toy_model"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# -----------------------------------------------------------------------------
# Device, dtype, seeds

def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit `device` always wins."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (paper precision), fp32 on CPU (Deviation 2). Accepts names like 'bf16'."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_rank_seed(seed: int, rank: int) -> None:
    """Seed the random streams of one data-parallel rank with seed + rank (dropout masks, sampling).

    Called after the model and adapters are built from `seed` (identical on every rank, as DDP
    requires) and before training: with one seed everywhere, every rank would draw the same dropout
    masks, so W ranks would average W copies of one mask. Data order never reads these streams (it
    uses generators seeded from `seed` + epoch), so it stays consistent across ranks.
    """
    set_seed(seed + rank)


# -----------------------------------------------------------------------------
# Atomic writes: a result or checkpoint is either complete on disk or absent, never half-written.

def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ConfigError(ValueError):
    """A bad training-script setting; `field` is the config key at fault (the flag without its
    dashes, e.g. "lr" for --lr), so that callers such as `arena.py run`'s validation can point at
    it without parsing the message (peft_methods.HparamError does the same for hyperparameters)."""

    def __init__(self, msg: str, field: str):
        super().__init__(msg)
        self.field = field


def atomic_write_csv(path: str | Path, fieldnames, rows, *, lineterminator: str = "\r\n") -> None:
    """A header row, then one row per dict (missing or None values as empty cells, keys outside
    `fieldnames` ignored), written atomically. The default line ending is the csv module's."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator=lineterminator)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors.save_file, written to a temp file and renamed into place."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # safetensors refuses non-contiguous or shared-storage tensors: clone them contiguous.
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a fully written `tmp_dir` to `final_dir`, replacing an older one.

    The old directory is first renamed aside and removed only after the new one is in place, so a
    kill at any moment leaves either the old or the new complete directory under `final_dir`
    (or, for one instant, the old one under `<final>.old`, which `recover_dir` puts back).
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


# -----------------------------------------------------------------------------
# Chat rendering

def render_chat(tokenizer, messages: list[dict] | str, add_generation_prompt: bool = True) -> str:
    """Render a conversation to the exact string the model sees.

    A plain string is a single user turn. No system message is added (PAPER.md §4, EVAL.md §7): a
    template's own default system line (Qwen2.5's "You are Qwen...") applies as in the paper.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    # DEVIATION 1: raw-text fallback for template-less (base) tokenizers, as OpenCompass does.
    return "\n\n".join(m["content"] for m in messages)


# -----------------------------------------------------------------------------
# Model loading

def resolve_spec(spec: str) -> tuple[str, bool]:
    """Return (path_or_id, is_local) for a model spec (toy | local dir | hub id); reads nothing
    from the network (evaluate.py and arena.py validation use it too)."""
    if spec == "toy":
        if not (TOY_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"the toy base model is missing from {TOY_MODEL_DIR} (it is committed to the repo; "
                "re-create it with `python arena.py pretrain-toy`)")
        return str(TOY_MODEL_DIR), True
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise NotADirectoryError(f"model spec {spec!r} is a file; pass a directory holding "
                                     "config.json, the weights and the tokenizer files")
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model directory {p} has no config.json; is it an adapter "
                                    "checkpoint? Pass the base model with --model and the adapter "
                                    "with --adapter")
        return str(p), True
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_like_path:
        raise FileNotFoundError(f"model path {spec!r} does not exist")
    return spec, False


def _hub_error(spec: str, err: Exception) -> Exception:
    return OSError(
        f"could not load model {spec!r}: it is not a local directory, and loading it as a hub id "
        f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Without "
        "network access, download the model elsewhere and pass its local directory instead, e.g. "
        "--model /models/Qwen2.5-7B (a folder with config.json, *.safetensors, tokenizer files); "
        "`toy` selects the bundled miniature model.")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    path, local = resolve_spec(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - re-raised with a clearer message
        if local:
            raise
        raise _hub_error(spec, err) from err
    if tok.pad_token is None:
        # Generation pads batches; Llama-style tokenizers ship without a pad token.
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str = "toy", *, dtype=None, device=None, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa"):
    """Load (model, tokenizer) for `spec` ('toy', a local HF dir, or a hub id).

    bf16 on CUDA and fp32 on CPU unless `dtype` says otherwise; sdpa attention; remote code off.
    The model is returned in eval mode with `config.name_or_path == spec`.
    """
    from transformers import AutoModelForCausalLM
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    path, local = resolve_spec(spec)
    tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation)
    except Exception as err:  # noqa: BLE001
        if local:
            raise
        raise _hub_error(spec, err) from err
    model.to(dev).eval()
    model.config.name_or_path = spec
    return model, tok
