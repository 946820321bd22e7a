"""interop.py: Hugging Face PEFT adapters in and out, and the merged dense export.

An engine room a reader of the paper may skip: nothing here is in PEFT-Arena. It lets the methods
of `peft_methods.py` talk to the rest of the ecosystem.

    python interop.py export CKPT --to peft --out DIR                   # HF PEFT adapter dir
    python interop.py export CKPT --to merged --out DIR --dtype bf16 [--base MODEL]

`peft_methods.read_adapter_config` / `load_adapter` detect an HF PEFT directory and call
`peft_to_arena_config` / `load_peft_adapter` here, so every script (evaluate, geometry, rewind)
reads PEFT adapters and TRL `checkpoint-<k>/` runs. Each convention below is checked against PEFT
0.21 in tests/test_interop.py (PEFT is a test oracle only; this file never imports it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

import loading
import peft_methods as pm

# An HF PEFT adapter dir = adapter_config.json (with "peft_type") + adapter_model.safetensors whose
# keys are `base_model.model.<HF module name>.<tensor>` (PEFT `get_peft_model_state_dict`).
# Import (pm.read_adapter_config / pm.load_adapter detect the format) builds our wrappers with the same
# weights; export writes what `PeftModel.from_pretrained(base, dir)` loads to the same logits.
# Conventions that do not map one to one (each checked against PEFT 0.21 in tests/test_interop.py):
#   OFT exact Cayley    PEFT generator = -ours (Deviation 1); Cayley-Neumann: identical
#   PiSSA / MiLoRA      exported as PEFT's own PiSSA->LoRA conversion (`path_initial_model_for_
#                       weight_conversion`): rank 2r, A' = [A; A0], B' = [B, -B0], alpha doubled
#                       (x sqrt 2 for rsLoRA), so it applies to the ORIGINAL base W0 (Deviation 10)
#   IA3                 PEFT stores l as (d_out, 1), or (1, d_in) for feedforward modules
#   VeRA                the shared A, B travel as `base_model.vera_A` / `base_model.vera_B`
#   KeepLoRA, Full FT   no PEFT counterpart: an error pointing to `export --to merged`

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.18.0"    # exports follow PEFT >= 0.18 (its OFT Cayley-Neumann series, as ours)

# PEFT config fields that carry no modelling choice (bookkeeping) and are ignored on import
_PEFT_META = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
              "inference_mode", "target_modules", "megatron_core", "qalora_group_size"}
# fields every type may carry: the value here (or None / False / {} / []) means "not used"
_PEFT_NEUTRAL = {"bias": "none", "fan_in_fan_out": False, "init_weights": True, "init_lora_weights": True,
                 "init_ia3_weights": True, "loftq_config": {}, "module_dropout": 0.0, "mini_r": 1,
                 "save_projection": True}
# fields each PEFT type maps onto our config: {PEFT field: our field}
_PEFT_FIELDS = {
    "LORA": {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "use_rslora"},
    "VERA": {"r": "r", "vera_dropout": "dropout", "d_initial": "d_initial", "projection_prng_key": "projection_seed"},
    "IA3": {"feedforward_modules": "feedforward_modules"},
    "OFT": {"oft_block_size": "block_size", "use_cayley_neumann": "use_cayley_neumann",
            "num_cayley_neumann_terms": "num_terms", "block_share": "block_share", "coft": "coft", "eps": "eps"},
    "MISS": {"r": "r", "miss_dropout": "dropout"},
    "ADALORA": {"target_r": "r", "init_r": "init_r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                "orth_reg_weight": "orth_reg_weight", "tinit": "tinit", "tfinal": "tfinal", "deltaT": "deltaT",
                "beta1": "beta1", "beta2": "beta2", "total_step": "total_step"},
}
_PEFT_TYPE = {"lora": "LORA", "dora": "LORA", "pissa": "LORA", "milora": "LORA", "vera": "VERA", "ia3": "IA3",
              "oft": "OFT", "miss": "MISS", "adalora": "ADALORA"}
_NO_PEFT = {"keeplora": "KeepLoRA (its frozen residual-gradient A has no PEFT config)",
            "full": "Full FT (every weight trains; there is no adapter)"}


class InteropError(ValueError):
    """A PEFT-format file or option we cannot read or write faithfully; the message names it."""


def read_json(path: Path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except ValueError as err:
        raise InteropError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _peft_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    f = adapter_dir / PEFT_WEIGHTS_FILE
    if not f.is_file():
        other = [p.name for p in adapter_dir.glob("adapter_model.*")]
        raise InteropError(f"{f}: not found" + (f" (found {other}: re-save it with safe_serialization=True)" if other else ""))
    try:
        return load_file(str(f))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise InteropError(f"{f}: unreadable safetensors file ({type(err).__name__}: {err}); truncated or corrupt?") from None


def _peft_tensor_names(adapter_dir: Path) -> list[str]:
    f = adapter_dir / PEFT_WEIGHTS_FILE
    if not f.is_file():
        _peft_weights(adapter_dir)              # raises the message naming the file
    try:
        with safe_open(str(f), framework="pt") as h:
            return list(h.keys())
    except Exception as err:  # noqa: BLE001
        raise InteropError(f"{f}: unreadable safetensors file ({type(err).__name__}: {err}); truncated or corrupt?") from None


def _peft_option_error(path, option: str, value, why: str) -> InteropError:
    return InteropError(f"{path}: PEFT option {option}={value!r} is not supported here ({why})")


def _peft_to_method(pcfg: dict, path) -> tuple[str, dict]:
    """(our method, make_config kwargs) for a PEFT config; any option we do not implement is an error."""
    ptype = str(pcfg.get("peft_type"))
    if ptype not in _PEFT_FIELDS:
        raise _peft_option_error(path, "peft_type", ptype, f"importable types: {sorted(_PEFT_FIELDS)}")
    fields = _PEFT_FIELDS[ptype]
    method = {"LORA": "lora", "VERA": "vera", "IA3": "ia3", "OFT": "oft", "MISS": "miss", "ADALORA": "adalora"}[ptype]
    _check_peft_options(pcfg, path, ptype, fields)
    hp = {ours: pcfg[p] for p, ours in fields.items() if p in pcfg and pcfg[p] is not None}
    if ptype == "LORA":
        method = _peft_lora_variant(pcfg, path)
    if ptype == "OFT":
        if not pcfg.get("oft_block_size"):
            raise _peft_option_error(path, "r", pcfg.get("r"), "OFT by block count; save it with oft_block_size instead")
        hp["adjust_block_size"] = True          # PEFT adjusts a non-dividing block size the same way
    if method == "ia3":
        hp["feedforward_modules"] = tuple(pcfg.get("feedforward_modules") or ())
    return method, hp


def _check_peft_options(pcfg: dict, path, ptype: str, fields: dict) -> None:
    """Any PEFT option we do not implement (not a known field, not at its neutral value) is an error."""
    special = {"LORA": {"use_dora", "init_lora_weights"}, "ADALORA": {"init_lora_weights", "r", "rank_pattern"},
               "VERA": {"save_projection"}}.get(ptype, set())
    for k, v in pcfg.items():
        if k in _PEFT_META or k in fields or k in special or v in (None, False, {}, [], ""):
            continue
        if k in _PEFT_NEUTRAL and v == _PEFT_NEUTRAL[k]:
            continue
        if ptype == "OFT" and k == "r" and v == 0:
            continue
        raise _peft_option_error(path, k, v, f"{ptype} is imported with the fields {sorted(fields)} only")


def _peft_lora_variant(pcfg: dict, path) -> str:
    """A PEFT LoraConfig -> lora, dora or pissa (use_dora, init_lora_weights)."""
    init = pcfg.get("init_lora_weights", True)
    method = "dora" if pcfg.get("use_dora") else "lora"
    if init == "pissa":
        method = "pissa" if method == "lora" else method
    elif init not in (True, False, "gaussian"):
        why = ("the randomised SVD cannot be rebuilt: the residual base is unknown" if str(init).startswith("pissa_niter")
               else "an init that rewrites the base weights, whose residual base is unknown here")
        raise _peft_option_error(path, "init_lora_weights", init, why)
    if method == "dora" and init == "pissa":
        raise _peft_option_error(path, "init_lora_weights", init, "PiSSA with DoRA is not implemented")
    return method


def _peft_targets(pcfg: dict, path) -> list[str]:
    t = pcfg.get("target_modules")
    if not t:
        raise InteropError(f"{path}: target_modules is empty (this importer needs explicit targets)")
    return [t] if isinstance(t, str) else list(t)


def _peft_modules(names: list[str], method: str) -> list[str]:
    """HF module names of the adapted modules, from the safetensors keys."""
    suffix = {"lora": ".lora_B.weight", "dora": ".lora_B.weight", "pissa": ".lora_B.weight", "vera": ".vera_lambda_b",
              "ia3": ".ia3_l", "oft": ".oft_R.weight", "miss": ".miss_block", "adalora": ".lora_E"}[method]
    return sorted(k[len(PEFT_PREFIX):-len(suffix)] for k in names if k.startswith(PEFT_PREFIX) and k.endswith(suffix))


def _trainer_step(adapter_dir: Path):
    f = adapter_dir / "trainer_state.json"          # TRL / HF Trainer checkpoints
    try:
        return int(json.loads(f.read_text())["global_step"]) if f.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def peft_to_arena_config(pcfg: dict, adapter_dir) -> dict:
    """A PEFT adapter_config.json as the dict read_adapter_config returns for our own checkpoints."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / pm.CONFIG_FILE
    method, hp = _peft_to_method(pcfg, path)
    try:
        hparams = dataclasses.asdict(pm.make_config(method, **hp))
    except (TypeError, ValueError) as err:
        raise InteropError(f"{path}: {err}") from None
    step = _trainer_step(adapter_dir)
    return {"format": "peft", "method": method, "hparams": hparams, "target_modules": _peft_targets(pcfg, path),
            "modules": {n: {} for n in _peft_modules(_peft_tensor_names(adapter_dir), method)},
            "base_model": pcfg.get("base_model_name_or_path"), "adapter_dtype": None,
            "extra": {"step": step} if step is not None else {}, "peft_config": pcfg, "adapter_dir": str(adapter_dir)}


def _peft_layer_map(method: str, hp: dict, name: str) -> list[tuple[str, str, Callable, Callable]]:
    """[(our tensor, PEFT tensor suffix, ours -> PEFT, PEFT -> ours)] of one wrapped module."""
    same = lambda t: t  # noqa: E731
    lora = [("lora_A", "lora_A.weight", same, same), ("lora_B", "lora_B.weight", same, same)]
    if method in ("lora", "pissa", "milora"):
        return lora
    if method == "dora":
        return lora + [("magnitude", "lora_magnitude_vector", same, same)]
    if method == "vera":
        return [("lambda_d", "vera_lambda_d", same, same), ("lambda_b", "vera_lambda_b", same, same)]
    if method == "ia3":
        ff = any(pm._name_matches(name, p) for p in hp["feedforward_modules"])
        return [("ia3_l", "ia3_l", (lambda t: t.reshape(1, -1)) if ff else (lambda t: t.reshape(-1, 1)),
                 lambda t: t.reshape(-1))]
    if method == "oft":
        sign = 1.0 if hp["use_cayley_neumann"] else -1.0     # DEVIATION 1: exact Cayley q_PEFT = -q_ours
        return [("oft_q", "oft_R.weight", lambda t: sign * t, lambda t: sign * t)]
    if method == "miss":
        return [("miss_D", "miss_block", same, same)]
    if method == "adalora":
        return [("lora_A", "lora_A", same, same), ("lora_E", "lora_E", same, same), ("lora_B", "lora_B", same, same)]
    raise InteropError(f"{method}: no PEFT tensor mapping")


def load_peft_adapter(model: nn.Module, cfg: dict) -> list[str]:
    """load_adapter for a PEFT directory (cfg from peft_to_arena_config)."""
    adapter_dir = Path(cfg["adapter_dir"])
    f = adapter_dir / PEFT_WEIGHTS_FILE
    method, hp = cfg["method"], cfg["hparams"]
    st = pm.peft_state(model)
    if st is not None and st["method"] != method:
        raise ValueError(f"load_adapter: {adapter_dir} holds a '{method}' adapter but the model already has "
                         f"'{st['method']}' adapters")
    tensors = _peft_weights(adapter_dir)
    if st is None:
        # PiSSA: PEFT rebuilds W_res from the base's SVD when it loads; we do the same (init=True).
        # Adapters keep the file's dtype (PEFT's default upcasts them to fp32 on a bf16 base too).
        dt = next((v.dtype for k, v in tensors.items() if k.startswith(PEFT_PREFIX) and v.is_floating_point()), None)
        try:
            names = pm.apply_peft(model, method, pm.make_config(method, **hp), target_modules=cfg["target_modules"],
                               adapter_dtype=dt, _init=method == "pissa")
        except pm.HparamError as err:
            raise InteropError(f"{adapter_dir / pm.CONFIG_FILE}: {err}") from None
    else:
        names = list(pm.adapter_layers(model))
    if sorted(names) != sorted(cfg["modules"]):
        not_file, not_model = sorted(set(names) - set(cfg["modules"])), sorted(set(cfg["modules"]) - set(names))
        raise InteropError(f"{f}: target_modules {cfg['target_modules']} wrap {len(names)} modules of "
                           f"{type(model).__name__} but the file adapts {len(cfg['modules'])}: not in file "
                           f"{not_file[:3]}, not in model {not_model[:3]}")
    masks = {}
    if method == "adalora" and cfg["peft_config"].get("rank_pattern"):
        tensors, masks = _adalora_unresize(tensors, cfg["peft_config"]["rank_pattern"], hp["init_r"], f)
    own, used = pm._adapter_tensors(model), set()
    pairs = [(f"{n}.{ours}", f"{PEFT_PREFIX}{n}.{suffix}", back) for n in names
             for ours, suffix, _, back in _peft_layer_map(method, hp, n)]
    if method == "vera" and "base_model.vera_A" in tensors:
        pairs += [(f"{pm.VERA_SHARED_ATTR}.A", "base_model.vera_A", lambda t: t),
                  (f"{pm.VERA_SHARED_ATTR}.B", "base_model.vera_B", lambda t: t)]
    with torch.no_grad():
        for ours, key, back in pairs:
            if key not in tensors:
                raise InteropError(f"{f}: tensor '{key}' is missing")
            v = back(tensors[key])
            if tuple(v.shape) != tuple(own[ours].shape):
                raise InteropError(f"{f}: '{key}' has shape {tuple(tensors[key].shape)}, the model's module needs "
                                   f"{tuple(own[ours].shape)} ({method}, {hp})")
            own[ours].copy_(v)
            used.add(key)
        for n, m in masks.items():               # the allocation's kept triplets (PEFT rank_pattern)
            own[f"{n}.rank_mask"].copy_(m)
    extra = sorted(set(tensors) - used)
    if extra:
        raise InteropError(f"{f}: {len(extra)} tensor(s) this importer does not know, e.g. {extra[:3]}")
    return names


def _adalora_unresize(tensors: dict, pattern: dict, init_r: int, f: Path) -> tuple[dict, dict]:
    """PEFT saves an allocated AdaLoRA with only the kept triplets (`rank_pattern`, PEFT
    `resize_state_dict_by_rank_pattern`); put them back at their places in init_r-wide tensors with
    zeros elsewhere (= our masked E). ranknum stays init_r, as in PEFT after loading."""
    out, masks = dict(tensors), {}
    for key, mask in pattern.items():
        n = key.split(".lora_E")[0]
        m = torch.tensor(mask, dtype=torch.bool)                          # (init_r,)
        p = f"{PEFT_PREFIX}{n}."
        if m.numel() != init_r or any(p + t not in tensors for t in ("lora_A", "lora_E", "lora_B")):
            raise InteropError(f"{f}: rank_pattern['{key}'] ({m.numel()} entries) does not fit init_r={init_r} "
                               "or names a module without AdaLoRA tensors")
        A, E, B = tensors[p + "lora_A"], tensors[p + "lora_E"], tensors[p + "lora_B"]   # (k, d_in) (k, 1) (d_out, k)
        if A.shape[0] != int(m.sum()):
            raise InteropError(f"{f}: '{p}lora_A' keeps {A.shape[0]} triplets but rank_pattern['{key}'] keeps {int(m.sum())}")
        A2, E2, B2 = A.new_zeros(init_r, A.shape[1]), E.new_zeros(init_r, 1), B.new_zeros(B.shape[0], init_r)
        A2[m], E2[m], B2[:, m] = A, E, B
        out.update({p + "lora_A": A2, p + "lora_E": E2, p + "lora_B": B2})
        masks[n] = m
    return out, masks


def _plain_patterns(patterns: list[str]) -> bool:
    return all(p != "all-linear" and re.fullmatch(r"[A-Za-z0-9_.]+", p) for p in patterns)


def to_peft(cfg: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(PEFT adapter_config, PEFT tensors) from one of our adapters: cfg as save_adapter writes it
    (method, hparams, target_modules, modules, base_model), tensors keyed as in adapter.safetensors."""
    method, hp = cfg["method"], cfg["hparams"]
    if method in _NO_PEFT:
        raise InteropError(f"{method}: {_NO_PEFT[method]} has no HF PEFT counterpart; export the merged model "
                           "instead: python interop.py export CKPT --to merged --out DIR")
    if method not in _PEFT_TYPE:
        raise InteropError(f"{method}: no HF PEFT counterpart")
    modules = list(cfg["modules"])
    targets = list(cfg["target_modules"])
    # PEFT matches a list of names by suffix, as ours; regexes / all-linear become the explicit module list
    pt = targets if _plain_patterns(targets) else modules
    ptype = _PEFT_TYPE[method]
    # peft_version: the PEFT release whose conventions the file follows (OFT's Cayley-Neumann changed in 0.18)
    pcfg = {"peft_type": ptype, "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.get("base_model"),
            "target_modules": pt, "inference_mode": True, "modules_to_save": None, "revision": None,
            "peft_version": PEFT_FORMAT_VERSION}
    if ptype != "MISS":
        pcfg["fan_in_fan_out"] = False
    if ptype != "IA3":
        pcfg.update(bias="none", layers_to_transform=None, layers_pattern=None)
    pcfg.update({p: hp[ours] for p, ours in _PEFT_FIELDS[ptype].items() if ours in hp})
    if ptype == "LORA":
        pcfg.update(use_dora=method == "dora", init_lora_weights=True, rank_pattern={}, alpha_pattern={})
    out = {}
    for n in modules:
        for ours, suffix, there, _ in _peft_layer_map(method, hp, n):
            out[f"{PEFT_PREFIX}{n}.{suffix}"] = there(tensors[f"{n}.{ours}"]).contiguous()
    if method in ("pissa", "milora"):
        # DEVIATION 10: PEFT's own PiSSA->LoRA conversion, dW = s (B A - B0 A0) = s [B, -B0] [A; A0]
        for n in modules:
            a, b = f"{PEFT_PREFIX}{n}.lora_A.weight", f"{PEFT_PREFIX}{n}.lora_B.weight"
            out[a] = torch.cat([tensors[f"{n}.lora_A"], tensors[f"{n}.lora_A0"]], 0).contiguous()   # (2r, d_in)
            out[b] = torch.cat([tensors[f"{n}.lora_B"], -tensors[f"{n}.lora_B0"]], 1).contiguous()  # (d_out, 2r)
        pcfg["r"] = 2 * hp["r"]
        pcfg["lora_alpha"] = hp["alpha"] * (math.sqrt(2.0) if hp["use_rslora"] else 2.0)   # same s
    if ptype == "OFT":
        pcfg.update(r=0, module_dropout=0.0, init_weights=True)
    if ptype == "VERA":
        pcfg.update(save_projection=True, init_weights=True)
        out["base_model.vera_A"] = tensors[f"{pm.VERA_SHARED_ATTR}.A"].contiguous()
        out["base_model.vera_B"] = tensors[f"{pm.VERA_SHARED_ATTR}.B"].contiguous()
    if ptype == "IA3":
        ff = list(hp["feedforward_modules"])
        pcfg["feedforward_modules"] = ff if _plain_patterns(ff) and _plain_patterns(targets) else \
            [n for n in modules if any(pm._name_matches(n, p) for p in ff)]
        pcfg["init_ia3_weights"] = True
    if ptype == "MISS":
        pcfg.update(init_weights=True, mini_r=1)
    if ptype == "ADALORA":
        if pcfg.get("total_step") is None:      # PEFT refuses None; only the (finished) schedule reads it
            pcfg["total_step"] = hp["tinit"] + hp["tfinal"] + 1
        pcfg.update(rank_pattern=None, init_lora_weights=True)
    return pcfg, out


def save_peft_adapter(model: nn.Module, out_dir, *, base_model: str | None = None) -> Path:
    """Write the wrapped model's adapter in the HF PEFT format (see to_peft)."""
    st = pm.peft_state(model)
    if st is None:
        raise ValueError("save_peft_adapter: model has no adapters (call apply_peft or load_adapter first)")
    cfg = {"method": st["method"], "hparams": dataclasses.asdict(st["config"]), "target_modules": st["target_modules"],
           "modules": {n: {} for n in st["modules"]}, "base_model": base_model}
    return _write_peft(cfg, pm._adapter_tensors(model), out_dir)


def _write_peft(cfg: dict, tensors: dict, out_dir) -> Path:
    pcfg, ptensors = to_peft(cfg, {k: v.detach().cpu() for k, v in tensors.items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loading.atomic_save_file(ptensors, out_dir / PEFT_WEIGHTS_FILE, metadata={"format": "pt", "peft_arena_method": cfg["method"]})
    loading.atomic_write_json(out_dir / pm.CONFIG_FILE, pcfg)
    return out_dir


def export_peft(ckpt, out_dir, *, base_model: str | None = None) -> Path:
    """One of our adapter checkpoints -> an HF PEFT adapter dir, tensors only (no base model loaded)."""
    cfg = pm.read_adapter_config(ckpt)
    if cfg.get("format") == "peft":
        raise InteropError(f"{ckpt}: already an HF PEFT adapter directory")
    if cfg["method"] in _NO_PEFT:
        to_peft(cfg, {})                         # raises the message pointing to --to merged
    f = Path(ckpt) / pm.ADAPTER_FILE
    try:
        tensors = load_file(str(f))
    except Exception as err:  # noqa: BLE001
        raise InteropError(f"{f}: unreadable safetensors file ({type(err).__name__}: {err})") from None
    cfg = dict(cfg, base_model=base_model or cfg.get("base_model"))
    return _write_peft(cfg, tensors, out_dir)


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def export_merged(ckpt, out_dir, *, dtype: str = "bf16", base_model: str | None = None,
                  max_shard_size: str = "5GB") -> Path:
    """A dense HF model dir (sharded safetensors, config, tokenizer, generation config) in `dtype`:
    the adapter merged in fp32 on CPU (Deviation 3), then cast once, as the release's merge step
    (`tools/merge_peft.py`) produces for vLLM."""
    if dtype not in _DTYPES:
        raise InteropError(f"--dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    cfg = pm.read_adapter_config(ckpt)
    base = base_model or cfg.get("base_model")
    if not base:
        raise InteropError(f"{ckpt}: the checkpoint names no base model; pass --base MODEL")
    model, tok = loading.load_model(str(base), dtype="float32", device="cpu")
    pm.load_adapter(model, ckpt)                    # Full FT: writes every weight (checked by name and shape)
    pm.merge_and_unload(model)                      # (Full FT: nothing to merge; drops the method state)
    model.to(_DTYPES[dtype])
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    tok.save_pretrained(str(tmp))
    if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
        model.generation_config.save_pretrained(str(tmp))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    loading.atomic_replace_dir(tmp, out_dir)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="An adapter checkpoint -> an HF PEFT adapter dir or a merged dense HF model.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="an adapter checkpoint -> an HF PEFT adapter dir or a merged dense HF model")
    e.add_argument("ckpt", help="checkpoint dir (save_adapter's, or an HF PEFT adapter dir for --to merged)")
    e.add_argument("--to", choices=("peft", "merged"), required=True)
    e.add_argument("--out", required=True, help="output directory (a merged model dir is replaced atomically)")
    e.add_argument("--dtype", default="bf16", help="merged weights dtype: bf16 | fp16 | fp32 (default bf16)")
    e.add_argument("--base", default=None, help="base model spec (default: the one the checkpoint records)")
    e.add_argument("--max-shard-size", default="5GB", help="safetensors shard size of the merged model")
    args = ap.parse_args(argv)
    try:
        if args.to == "peft":
            out = export_peft(args.ckpt, args.out, base_model=args.base)
        else:
            out = export_merged(args.ckpt, args.out, dtype=args.dtype, base_model=args.base,
                                max_shard_size=args.max_shard_size)
    except (InteropError, pm.HparamError, FileNotFoundError) as err:
        raise SystemExit(f"interop.py export: error: {err}") from None
    print(f"wrote {out} ({'HF PEFT adapter' if args.to == 'peft' else f'dense {args.dtype} HF model'})")


if __name__ == "__main__":
    main(sys.argv[1:])
