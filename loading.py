"""loading.py — the one entry point for base models, tokenizers, devices, seeds, atomic writes and
run directories.

Every other file (training, evaluation, geometry, rewinding, the arena CLI) loads its base model
through `load_model(spec)`, so that the miniature toy world and real Hugging Face checkpoints go
through exactly the same code path. It holds the plumbing that `train_*.py`, `evaluate.py`,
`geometry.py` and `rewind.py` all need and that must not live in `arena.py` (they never import it).

    spec = "toy"            -> the committed miniature base model in toy_model/ (see toy_world.py)
    spec = "/path/to/dir"   -> any local HF-format directory (config.json + weights + tokenizer)
    spec = "Qwen/Qwen2.5-7B"-> a hub id (the local HF cache first; else one quick probe of the hub,
                               so an unreachable hub is reported in seconds, not after ~50 s of retries)
    spec = "runs/x/global_step_N" -> a Full FT checkpoint of train_sft/train_grpo (its base's
                               architecture, its weights; its tokenizer files, else the base's)

Writes (atomic_*) raise OutputWriteError, one line naming the path and the fix, for a full disk or
a read-only/forbidden folder; `run_cli` is every script's entry point (one line for those, for
data and hub errors, and for Ctrl-C, which exits 130 with how to continue).

Paper anchors: PEFT-Arena's SFT data formatting (release train/peft_arena_verl/utils/dataset/
sft_dataset.py) and evaluation (OpenCompass `VLLMwithChatTemplate`) render prompts with the chat
template and no system message; base models without a template are prompted with raw text, as
OpenCompass's `opencompass.models.VLLM` does for base checkpoints.

Implementation notes (neither changes a number the paper reports)
N1. Chat-template fallback: a tokenizer without `chat_template` gets the raw-text rendering that
    OpenCompass uses for base models: the message contents joined by a blank line, no role markers.
    The paper only uses it for BBH on Qwen2.5-7B base (which does ship a template); we apply it to
    any template-less tokenizer so every caller has one rendering rule.
N2. Default dtype: bf16 on CUDA (the paper's training and evaluation precision) but fp32 on CPU,
    because CPU bf16 matmuls are slow and the toy world's tests compare logits at fp32 tolerances.
"""
from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import peft_methods

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
    """bf16 on CUDA (paper precision), fp32 on CPU (note N2). Accepts names like 'bf16'."""
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

class OutputWriteError(OSError):
    """A result or checkpoint could not be written (disk full, read-only folder, no permission);
    the message is one line naming the path and what to do. CLI entries print it without a trace."""


_WRITE_FIXES = {errno.ENOSPC: "the disk is full: free space or choose another --out",
                errno.EDQUOT: "the disk quota is exceeded: free space or choose another --out",
                errno.EROFS: "the file system is read-only: choose a writable --out",
                errno.EACCES: "no permission to write there: choose a writable --out",
                errno.EPERM: "no permission to write there: choose a writable --out"}


def _write_error(path, err: OSError) -> OSError:
    """An OSError from writing `path` -> OutputWriteError (one line) for the causes a user can fix;
    other OSErrors are returned unchanged."""
    fix = _WRITE_FIXES.get(err.errno)
    if fix is None or isinstance(err, OutputWriteError):
        return err
    return OutputWriteError(err.errno, f"cannot write {path}: {err.strerror or err}; {fix}")


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(path, err) from None


def _atomic_write(path: str | Path, write) -> None:
    """write(tmp_path) into a temp file beside `path`, then rename it into place; a failure removes
    the temp file and turns a fixable OSError into a one-line OutputWriteError."""
    path = Path(path)
    _make_dir(path.parent)
    fd, tmp = None, None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(err, OSError) and ("No space left" in str(err) or "Read-only file system" in str(err)):
            err = OSError(errno.ENOSPC if "space" in str(err) else errno.EROFS, str(err))  # safetensors' own
        if isinstance(err, OSError):
            raise _write_error(path, err) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _atomic_write(path, write)


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
    # safetensors refuses non-contiguous or shared-storage tensors: clone them contiguous.
    _atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()},
                                              tmp, metadata={k: str(v) for k, v in (metadata or {}).items()}))


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
# Run directories: the one layout every training run is written in, and read back by
#
#   <out>/config.json          the resolved config, written at the start; --resume compares with it
#   <out>/global_step_<k>/     checkpoint k. It is written as .tmp-global_step_<k>/ and renamed into
#                              place (atomic_replace_dir), and its trainer_state.json is the last
#                              file written inside it: the one completeness marker of a checkpoint
#   <out>/summary.json         written last of all: the run finished
#
# Scripts decide which of their config keys may change on --resume (`free_keys`) and which files in
# --out they own (`owned_files`, deleted by --overwrite; nothing else in --out is ever deleted).

CKPT_PREFIX = "global_step_"
RUN_CONFIG, RUN_SUMMARY, CKPT_COMPLETE = "config.json", "summary.json", "trainer_state.json"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """[(k, dir)] of the complete global_step_<k>/ checkpoints in run dir `out`, oldest first."""
    found = []
    for d in Path(out).glob(CKPT_PREFIX + "*"):
        m = re.fullmatch(CKPT_PREFIX + r"(\d+)", d.name)
        if m and (d / CKPT_COMPLETE).exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of run dir `out`, or None (what --resume continues from)."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def finished_checkpoint(out: str | Path) -> Path | None:
    """The final checkpoint of a finished run (summary.json written), else None."""
    return latest_checkpoint(out) if (Path(out) / RUN_SUMMARY).exists() else None


def config_diff(old: dict, new: dict, free_keys, *, new_keys_only: bool = False) -> dict:
    """{key: (old value, new value)} for every setting that differs between a run's stored config
    and the new one, except `free_keys`. Keys of both configs, sorted; with `new_keys_only`, the
    keys of `new` in its order (a stored config may then carry extra recorded keys)."""
    keys = list(new) if new_keys_only else sorted(set(old) | set(new))
    free = set(free_keys) | {"environment"}   # a new torch may resume a run; its config says which
    return {k: (old.get(k), new.get(k)) for k in keys if k not in free and old.get(k) != new.get(k)}


def clear_run_dir(out: Path, owned_files) -> None:
    """--overwrite: delete the checkpoints (and half-written ones) and the `owned_files` of a run."""
    for d in list(out.glob(CKPT_PREFIX + "*")) + list(out.glob(".tmp-" + CKPT_PREFIX + "*")):
        shutil.rmtree(d)
    for name in owned_files:
        (out / name).unlink(missing_ok=True)


def prepare_run_dir(out: Path, cfg: dict, *, script: str, free_keys, owned_files,
                    new_keys_only: bool = False, is_main: bool = True) -> Path | None:
    """Refuse an occupied --out unless cfg["resume"] / cfg["overwrite"]; return the checkpoint to
    resume from (None: start from step 0). --resume checks that the stored config is the same run
    (config_diff); --overwrite clears what `script` writes (on the main rank only)."""
    cfg_path = out / RUN_CONFIG
    occupied = out.exists() and any(out.iterdir())
    if cfg["resume"]:
        if not cfg_path.exists():
            if occupied:
                raise FileExistsError(f"--resume: {out} holds files but no config.json, so it is not a "
                                      f"{script} run; pick another --out")
            return None
        diff = config_diff(json.loads(cfg_path.read_text()), cfg, free_keys, new_keys_only=new_keys_only)
        if diff:
            raise ValueError(f"--resume: {out} holds a different run; differing settings (old, new): {diff}")
        return latest_checkpoint(out)
    if occupied:
        if not cfg["overwrite"]:
            what = "files"
            if cfg_path.exists():
                diff = config_diff(json.loads(cfg_path.read_text()), cfg, free_keys, new_keys_only=new_keys_only)
                what = f"a different run (differing settings (old, new): {diff})" if diff else "this run already"
            raise FileExistsError(f"output directory {out} already holds {what}; pass --resume to continue "
                                  "it or --overwrite to delete it and start again")
        if is_main:
            clear_run_dir(out, owned_files)
    return None


def resume_or_overwrite(out: Path) -> tuple[bool, bool]:
    """(resume, overwrite) for re-running a training run into `out` (arena.py's cells): resume a run
    that wrote its config; clear a dir that holds files but no run config."""
    resume = (out / RUN_CONFIG).exists()
    occupied = out.exists() and any(out.iterdir())
    return resume, occupied and not resume


def write_run_config(out: Path, cfg: dict) -> dict:
    """<out>/config.json: the resolved config plus `environment()` (what its numbers depend on)."""
    saved = {**cfg, "environment": environment()}
    atomic_write_json(Path(out) / RUN_CONFIG, saved)
    return saved


def write_summary(out: Path, *, script: str, cfg: dict, steps: int, trainable_params: int,
                  final_checkpoint, train_seconds: float, train_last: float | None, train_last_name: str,
                  **extra) -> dict:
    """<out>/summary.json, written last (the run finished), in the one schema of train_sft.py and
    train_grpo.py: what arena.py, rewind.py and a reader look up by the same names for every run.
    train_last is the script's training signal at the end (`train_last_name`: SFT "loss", the last
    step's mean CE; GRPO "reward", the mean reward of the last fifth of steps); script-specific
    fields follow in `extra`."""
    summary = {"script": script, "out": str(out), "model": cfg["model"], "method": cfg["method"],
               "steps": steps, "trainable_params": trainable_params,
               "final_checkpoint": None if final_checkpoint is None else str(final_checkpoint),
               "train_seconds": train_seconds, "train_last": train_last,
               "train_last_name": train_last_name, **extra}
    atomic_write_json(Path(out) / RUN_SUMMARY, summary)
    return summary


def environment() -> dict:
    """The software a run's numbers depend on, for its resolved config: the python, torch and
    transformers versions, torch's intra-op thread count and the CPU kernel set torch dispatches to
    (AVX2, AVX512, ...): a CPU reduction's order, so the last bits of a result, depend on both."""
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# -----------------------------------------------------------------------------
# Training data files: one parquet reader, errors that name the file, the row and the key

class DataError(ValueError):
    """A training data file that cannot be used; one line naming the file (and line/row, key)."""


class DataFileNotFound(DataError, FileNotFoundError):
    pass


class MissingDependency(ImportError):
    """An optional package that the given input needs (one line saying what to install)."""


def require_pyarrow(path, flag: str = "--data"):
    """pyarrow.parquet, or a one-line error naming the file and the install command. Called
    before any model is loaded, so that a missing package costs seconds, not a 7B load."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency(f"{flag} {path}: reading .parquet files needs pyarrow, which is not "
                                "installed: pip install -r requirements.txt (or pip install pyarrow)") from None
    return pq


def read_parquet_rows(path, flag: str = "--data") -> list[dict]:
    """Every row of a parquet file as a dict (nested structs -> dicts, lists -> lists): the one
    parquet reader of the training scripts (the release ships its SFT and RL sets as parquet)."""
    pq = require_pyarrow(path, flag)
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow's errors do not name the file
        raise DataError(f"{flag} {path}: not a readable parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def read_records(path, flag: str = "--data", *, skip_bad_rows: bool = False) -> tuple[list[tuple[dict, str]], int]:
    """The one data-file reader: .jsonl, .json (one array, or JSON lines) or .parquet ->
    ([(row, where)], n_bad). `where` ("file:line", "file: item i", "file: row i") names the row in
    later errors; a malformed JSONL line raises naming file and line, or with skip_bad_rows is
    skipped and counted. Used by train_sft, train_grpo and evaluate's benchmark loaders."""
    path = Path(path)
    if not path.exists():
        raise DataFileNotFound(f"{flag} {path}: data file not found")
    if path.is_dir() or path.stat().st_size == 0:
        raise DataError(f"{flag} {path}: data file is {'a directory' if path.is_dir() else 'empty'}")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{flag} {path}: expected .parquet, .jsonl or .json, not {path.suffix!r}")
    if path.suffix == ".parquet":   # the release's format (pyarrow, in requirements.txt)
        return [(r, f"{path}: row {i}") for i, r in enumerate(read_parquet_rows(path, flag))], 0
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):   # one JSON array (MetaMathQA-395K.json)
        try:
            items = json.loads(text)
        except ValueError as e:
            raise DataError(f"{flag} {path}: not valid JSON ({e})") from None
        bad = next((i for i, r in enumerate(items) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{flag} {path}: item {bad} is not a JSON object")
        return [(r, f"{path}: item {i}") for i, r in enumerate(items)], 0
    rows, n_bad = [], 0
    for lineno, line in enumerate(text.splitlines(), 1):   # JSON lines
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if skip_bad_rows:
                n_bad += 1
                continue
            raise DataError(f"{path}:{lineno}: malformed JSONL line ({e}); fix it or pass "
                            "--skip-bad-rows to skip and count such lines") from None
        rows.append((row, f"{path}:{lineno}"))
    return rows, n_bad


def get_key(row: dict, key: str):
    """row[key], where a dotted key reads nested fields ("extra_info.question"); None if absent."""
    cur = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


# -----------------------------------------------------------------------------
# Chat rendering

def render_chat(tokenizer, messages: list[dict] | str, add_generation_prompt: bool = True) -> str:
    """Render a conversation to the exact string the model sees.

    A plain string is a single user turn. No system message is added (as the release's SFT data and OpenCompass's
    `VLLMwithChatTemplate`): a template's own default system line (Qwen2.5's "You are Qwen...")
    applies as in the paper.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    # NOTE N1: raw-text fallback for template-less (base) tokenizers, as OpenCompass does.
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
            raise ModelSpecIsAFile(f"model spec {spec!r} is a file; pass a directory holding "
                                     "config.json, the weights and the tokenizer files")
        if not (p / "config.json").exists():
            raise ModelNotFound(f"model directory {p} has no config.json; is it an adapter "
                                    "checkpoint? Pass the base model with --model and the adapter "
                                    "with --adapter")
        return str(p), True
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_like_path:
        raise ModelNotFound(f"model path {spec!r} does not exist; pass a local model directory "
                            "(config.json + weights + tokenizer) or a hub id")
    return spec, False


class ModelNotFound(FileNotFoundError):
    """A --model that is not a usable local model directory; one line saying what to pass."""


class ModelSpecIsAFile(ModelNotFound, NotADirectoryError):
    pass


class HubError(OSError):
    """A hub id that is neither cached nor downloadable; the message is one line saying what to do."""


def _hub_error(spec: str, err: Exception | str) -> Exception:
    why = err if isinstance(err, str) else (
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return HubError(
        f"could not load model {spec!r}: it is not a local directory, and loading it as a hub id "
        f"failed ({why}). Without "
        "network access, download the model elsewhere and pass its local directory instead, e.g. "
        "--model /models/Qwen2.5-7B (a folder with config.json, *.safetensors, tokenizer files); "
        "`toy` selects the bundled miniature model.")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (read now, not at import as huggingface_hub does)."""
    if any(os.environ.get(k, "").strip().lower() in ("1", "on", "yes", "true")
           for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        import huggingface_hub.constants as hc
    except ImportError:
        return False
    return bool(getattr(hc, "HF_HUB_OFFLINE", False))


def probe_hub(repo_id: str, filename: str = "config.json", *, repo_type: str = "model",
              what: str = "model", timeout: float = 10.0) -> None:
    """Fail in seconds, not after huggingface_hub's ~50 s of retries, when `repo_id` is not in the
    local cache and the hub cannot serve it: one HEAD request, no retries. Raises a one-line OSError
    naming the id and what to do; returns when the hub answered (the real download follows)."""
    if hub_offline():
        raise _hub_error(repo_id, "offline mode (HF_HUB_OFFLINE) and not in the local cache") if what == "model" \
            else HubError(f"{repo_id}: offline mode (HF_HUB_OFFLINE) and not in the local cache")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    url = hf_hub_url(repo_id, filename, repo_type=None if repo_type == "model" else repo_type)
    try:
        try:
            get_hf_file_metadata(url, timeout=timeout, retry_on_errors=False)
        except TypeError:   # huggingface_hub < 1.0 has no retry flag (and does not retry HEADs)
            get_hf_file_metadata(url, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - unreachable, unknown id, gated: all one line
        raise (_hub_error(repo_id, err) if what == "model" else
               HubError(f"{repo_id}: not in the local cache and the hub did not serve {filename} "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")) from None


def _from_hub(loader, spec: str, **kw):
    """`loader(spec, **kw)` for a hub id: the local cache first (no network), then one quick probe
    (probe_hub), then the normal download."""
    try:
        return loader(spec, local_files_only=True, **kw)
    except Exception:  # noqa: BLE001 - not (fully) cached: try the hub below
        pass
    probe_hub(spec)
    try:
        return loader(spec, **kw)
    except Exception as err:  # noqa: BLE001 - re-raised with a clearer message
        raise _hub_error(spec, err) from err


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def arena_checkpoint(path: str | Path) -> dict | None:
    """The adapter_config.json of a peft_methods.save_adapter checkpoint directory, else None."""
    f = Path(path) / "adapter_config.json"
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("format") == "peft-arena-adapter" else None


def _checkpoint_base(path: str, ck: dict) -> str:
    """The base model spec a Full FT checkpoint records (its tokenizer and architecture)."""
    base = ck.get("base_model")
    if not base:
        raise FileNotFoundError(f"{path} is a Full FT checkpoint without tokenizer files and its "
                                "adapter_config.json names no base_model; copy the base model's "
                                "tokenizer files into it")
    return str(base)


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    path, local = resolve_spec(spec)
    if local and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        ck = arena_checkpoint(path)
        if ck is None:
            raise FileNotFoundError(f"model directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                    "copy them from the base model the weights came from")
        # a Full FT checkpoint written before checkpoints carried tokenizer files: the base's
        print(f"[loading] {path} has no tokenizer files; using the tokenizer of its base model "
              f"{ck.get('base_model')!r}", file=sys.stderr)
        return load_tokenizer(_checkpoint_base(path, ck), trust_remote_code=trust_remote_code)
    if local:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        tok = _from_hub(AutoTokenizer.from_pretrained, path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Generation pads batches; Llama-style tokenizers ship without a pad token.
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(spec: str):
    return load_tokenizer(spec)


def save_tokenizer_files(base_spec: str, out_dir: str | Path, model=None) -> None:
    """Make a Full FT checkpoint a usable model folder: the base's tokenizer files and the model's
    generation_config.json beside the weights (evaluate.py --model <ckpt> reads them)."""
    try:
        tok = _cached_tokenizer(str(base_spec))
    except Exception as err:  # noqa: BLE001 - the checkpoint stays valid; loading falls back to the base
        print(f"[loading] warning: no tokenizer files written to {out_dir} ({type(err).__name__}: {err}); "
              "load_model/load_tokenizer fall back to the base model's tokenizer", file=sys.stderr)
        return
    tok.save_pretrained(str(out_dir))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out_dir))


def _load_full_checkpoint(path: str, ck: dict, **kw):
    """A Full FT checkpoint directory (peft_methods.save_adapter, method "full"): the base model's
    architecture with the checkpoint's weights (peft_methods.load_adapter checks every tensor)."""
    model, _ = load_model(_checkpoint_base(path, ck), **kw)
    peft_methods.load_adapter(model, path)
    return model


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
    ck = arena_checkpoint(path) if local else None
    if ck is not None and ck.get("method") != "full":   # before any loading: the error is the answer
        raise ValueError(f"{path} is a {ck.get('method')!r} adapter checkpoint, not a model: pass its base "
                         f"with --model {ck.get('base_model') or 'BASE'} and this folder with --adapter {path}")
    tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    kw = dict(dtype=dt, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    if ck is not None:
        model = _load_full_checkpoint(path, ck, dtype=dt, device=dev, trust_remote_code=trust_remote_code,
                                      attn_implementation=attn_implementation)
    elif local:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    else:
        model = _from_hub(AutoModelForCausalLM.from_pretrained, path, **kw)
    model.to(dev).eval()
    model.config.name_or_path = spec
    return model, tok


# -----------------------------------------------------------------------------
# Command-line entry points: one line for the errors a user can fix, Ctrl-C without a traceback

def run_cli(prog: str, fn, *, resume_hint: str = "rerun the same command to continue",
            one_line: tuple = ()):
    """Call `fn()` and return its result; for the script's `if __name__ == "__main__"` block.

    Ctrl-C prints one line saying how to continue and exits 130 (the shell's code for SIGINT);
    a write that failed for a fixable reason (disk full, read-only or forbidden folder, see
    OutputWriteError) prints one line naming the path and exits 1, as do the errors whose message
    says what to do (ours, and the script's `one_line` classes). Other errors keep their traceback."""
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (Ctrl-C); what was written so far is kept: {resume_hint}",
              file=sys.stderr)
        sys.exit(130)
    except (HubError, DataError, MissingDependency, ModelNotFound) + tuple(one_line) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:
        path = getattr(err, "filename", None)
        one = err if isinstance(err, OutputWriteError) else (
            _write_error(path, err) if path and err.errno in _WRITE_FIXES else None)
        if one is None:
            raise
        print(f"{prog}: error: {one.strerror if isinstance(one, OutputWriteError) else one}", file=sys.stderr)
        sys.exit(1)
