"""peft_methods.py: every PEFT method of the arena, hand-written in plain PyTorch.

Implements the methods PEFT-Arena compares, at the paper's hyperparameters and parameter counts
(poster main table), each from its own paper (Full FT, LoRA/rsLoRA, DoRA, PiSSA, MiLoRA, KeepLoRA,
AdaLoRA, VeRA, IA3, MiSS, OFTv2; see References). Hugging Face PEFT is the numerical reference
(tests only); this file never imports it.

Run:
    python peft_methods.py count            # trainable params of Qwen2.5-7B / Llama-3.2-3B (meta device)
    python peft_methods.py count --json out.json
    python interop.py export CKPT --to peft|merged --out DIR          # HF PEFT adapter / merged model
    python -m pytest tests/test_peft_methods.py -q

One small API for every method:
    apply_peft(model, "oft", block_size=32)      # wrap q,k,v,o,gate,up,down in place, freeze the rest
    delta_weight(layer) / merged_weight(layer)   # dense fp32 dW and W_eff of one wrapped module
    merged_state_dict(model), merge_and_unload(model), disable_adapters(model)
    save_adapter(model, dir, base_model=...), load_adapter(model, dir)   # load_adapter also reads HF PEFT dirs
    interop.save_peft_adapter(model, dir), interop.export_peft(ckpt, dir), interop.export_merged(...)   (HF PEFT format)
A wrapper keeps the original nn.Linear as `.base_layer`, so HF models, `generate` and gradient
checkpointing keep working. Adding a method = one Config dataclass + one AdapterLinear subclass
+ one `METHODS[...] = Method(...)` entry; the generic tests pick it up from the registry.

Shape legend: B batch, T sequence, d_in / d_out the wrapped Linear's in / out width, r rank,
b OFT block size, n = d_in / b OFT blocks, W (d_out, d_in) = nn.Linear.weight (PyTorch row form
y = x W^T + b; the math comments use the column form y = W x + b of the method papers).

References. PEFT-Arena: Huang et al., arXiv 2605.28819; its poster
(`PA: docs/static/pdfs/peft-arena-poster.pdf`: main table, parameter counts) and official release
(Sphere-AI-Lab/PEFT-Arena, files cited as `PA: <path>`). Method papers: LoRA Hu et al. 2021;
rsLoRA Kalajdzievski 2023; DoRA Liu et al. 2024; PiSSA Meng et al. 2024; MiLoRA Wang et al. 2024;
KeepLoRA Luo et al. 2026 (arXiv 2601.19659); AdaLoRA Zhang et al. 2023; VeRA Kopiczko et al.
2024; (IA)^3 Liu et al. 2022; MiSS Kang et al. 2024 (formerly Bone); OFTv2 Qiu et al. 2025.

Internals other files use (documented, stable):
    layer.scaling                       LoRA-family s (alpha/r or alpha/sqrt(r))
    scale_update_(layer, c)             dW -> c*dW in factor form where dW is linear in one tensor
                                        (LoRA/KeepLoRA: B, AdaLoRA: E, MiSS: D, VeRA: lambda_b, IA3: l-1)
    layer.oft_q                         OFT generator (rows, b(b-1)/2): the upper triangles of Q
    layer.rotation(q=None)              R blocks (rows, b, b) from the layer's (or a given) generator
    layer.merged_weight_from(q)         W R_bd^T for a given generator (iOFT / SafeRho rewinding)
    LayerClass.factor_point(...)        the method's factor path for rewinding (factor_tensors,
                                        factor_is_dense, labels, rho_measures: rewind.py asks these)
    oft_rotation(q, b, ...)             the same as a pure function

Deviations that change a number the paper reports (each also marked `DEVIATION n` at the line):
 5. PiSSA / MiLoRA: the initial factors (A0, B0) are saved with the adapter, so the residual base
    W_res = W0 - s B0 A0 is rebuilt exactly at load time from the original W0 (the release never
    builds W_res: no script creates the initial adapters). delta_weight is relative to W0, and
    disable_adapters gives W0 (PEFT's disabled PiSSA model is W_res).
 6. KeepLoRA: the release's initialiser looks gradients up under PEFT-wrapped names
    (`base_model.model.model.layers.0...`) while they are keyed by raw names
    (`model.layers.0...`), so it most likely never runs and trains LoRA-FA (Kaiming A frozen,
    B = 0; `PA: utils/keeplora.py`). Here the names match and the init always runs; it
    fails loudly without `init_batch`. Both randomised SVDs are seeded (`seed`); `exact_svd=True`
    uses full SVDs. The seed gradient is taken in the model's dtype without autocast on the batch
    given (release: first micro-batch of 2, bf16 autocast). W is not compensated (as released),
    so KeepLoRA is not the identity at init.

Implementation notes (differences from HF PEFT / the release that change no reported number):
 1. OFT exact Cayley uses R = (I+Q)(I-Q)^-1, the limit of the Cayley-Neumann series, so one
    generator means one rotation whichever variant is on. PEFT's exact branch computes
    (I-Q)(I+Q)^-1 = R^T (the sign pitfall); a PEFT exact-Cayley generator q maps
    to ours as -q (tests/test_peft_methods.py shows the mapping). Cayley-Neumann follows PEFT
    >= 0.18 term for term (including its T=3 == T=4 quirk).
 2. OFT: a block size that does not divide d_in is refused, with PEFT's substitute and the
    nearest valid sizes in the message; `adjust_block_size=True` does what PEFT does (nearest
    divisor) and prints it. OFT `module_dropout` is not implemented (a no-op for Linear in PEFT).
 3. No in-place merge: merged weights are computed out of place in fp32 and cast; the master W is
    never mutated (PEFT's merge/unmerge mutates W and drifts in bf16).
    `unmerge_weight(layer, W_merged)` inverts a merge exactly where the math allows.
 4. IA3 unmerge divides by l exactly (PEFT divides by l + 1e-8).
 7. AdaLoRA: the orthogonality regulariser and the budget/rank allocation are implemented as
    `adalora_regularizer(model)` and `adalora_update_and_allocate(model, step, total_steps)`.
    The official release never calls either: its AdaLoRA is a fixed rank-12
    SVD-form LoRA, which is what you get if the SFT loop does not call them. Pruned triplets are
    masked in E (as PEFT during training); tensors are never resized, so the parameter count
    stays 12(d_in+d_out)+12.
 8. Adapter tensors default to the base weight's dtype (the arena casts the wrapped model to
    bf16); `adapter_dtype=torch.float32` keeps fp32 adapters on a bf16 base. PEFT's default
    upcasts adapters to fp32.
 9. MiLoRA is not in PEFT; it uses PiSSA's 1/s factor convention with the r smallest triplets.
10. PEFT export (interop.py) of PiSSA / MiLoRA is PEFT's own PiSSA->LoRA conversion: a rank-2r LoRA
    [A; A0], [B, -B0] with alpha doubled (x sqrt 2 for rsLoRA), applied to the ORIGINAL base W0, so
    a PEFT user needs no residual base; the PiSSA/MiLoRA identity is lost (it imports back as LoRA).
    An imported PEFT PiSSA adapter (init_lora_weights="pissa") rebuilds W_res from the base's full
    SVD, as PEFT's from_pretrained does; "pissa_niter_K" (randomised) and inits that rewrite the
    base (olora, corda, loftq, ...) are refused. KeepLoRA and Full FT have no PEFT form (merged export).
    Imported PEFT options we do not implement (rank_pattern, alpha_pattern, modules_to_save,
    layers_to_transform, exclude_modules, OFT by block count r, module_dropout, ...) are errors.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import interop
import loading

FORMAT_VERSION = 1
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEVER_WRAPPED = ("lm_head",)  # PEFT-Arena: all-linear targets; lm_head, embeddings, norms stay frozen
ADAPTER_FILE, FULL_FILE, CONFIG_FILE = "adapter.safetensors", "model.safetensors", "adapter_config.json"
VERA_SHARED_ATTR = "peft_vera_shared"   # model-level shared tensors live in `peft_<method>_shared` modules
STATE_ATTR = "peft_arena_state"         # plain attribute on the wrapped model: method, config, targets


# -----------------------------------------------------------------------------
# 1. Pure math: small functions the wrappers and the tests share
# -----------------------------------------------------------------------------

def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    # [Hu+21 LoRA, §4.1] s = alpha / r ; [Kalajdzievski 23 rsLoRA] s = alpha / sqrt(r)
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class HparamError(ValueError):
    """A hyperparameter that does not fit the model; `field` names the config field at fault
    (r, init_r, block_size, feedforward_modules, target_modules), so that callers such as
    `arena.py run`'s validation can point at it without parsing the message."""

    def __init__(self, msg: str, field: str):
        super().__init__(msg)
        self.field = field


def check_rank(method: str, name: str, r: int, d_in: int, d_out: int, field: str = "r") -> None:
    """A rank above min(d_in, d_out) cannot be reached by any factorisation: refuse it."""
    if r <= 0 or r > min(d_in, d_out):
        raise HparamError(f"{method}: rank r={r} is invalid for module '{name}' (d_in={d_in}, d_out={d_out}); "
                         f"need 1 <= r <= min(d_in, d_out) = {min(d_in, d_out)}", field)


def svd_factors(W: torch.Tensor, r: int, scaling: float, *, minor: bool = False,
                niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA / MiLoRA factors in fp32 (Meng et al. 2024 PiSSA; Wang et al. 2024 MiLoRA).

    [Meng+24 PiSSA, Eq. 2-3] W = U S V^T; A = diag(sqrt(S_r/s)) V_r^T (r, d_in),
    B = U_r diag(sqrt(S_r/s)) (d_out, r), so s*B@A = U_r S_r V_r^T exactly (PEFT's 1/s convention).
    minor=True takes the r smallest triplets (MiLoRA; needs the full SVD).
    """
    W = W.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (d_out,k) (k,) (k,d_in), k = min(d)
        idx = slice(S.numel() - r, S.numel()) if minor else slice(0, r)
        U, S, Vh = U[:, idx], S[idx], Vh[idx]
    else:
        if minor:
            raise ValueError("MiLoRA needs the full SVD: a randomised low-rank SVD cannot find the minor subspace")
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)   # PEFT "pissa_niter_K" (no oversampling)
        Vh = V.T
    sqrt_S = torch.sqrt(S / scaling)                        # (r,)
    A = sqrt_S[:, None] * Vh                                # (r, d_in)
    B = U * sqrt_S[None, :]                                 # (d_out, r)
    return A.contiguous(), B.contiguous()


def row_norm(W: torch.Tensor) -> torch.Tensor:
    """||W||_row: the norm over d_in of each output row = DoRA's column norm ||.||_c (Liu et al. 2024)."""
    return torch.linalg.norm(W, dim=1)                      # (d_out,)


def lerp_exact(start: torch.Tensor, end: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) start + alpha end in fp32: the interpolation of PEFT-Arena Sec. 5 (rewinding).

    torch.lerp computes start + a (end - start) for a < 0.5 and end - (1 - a)(end - start)
    otherwise, so it returns `start` bit-exactly at a = 0 and `end` bit-exactly at a = 1; the naive
    W0 + 1 * (W_ft - W0) is off by an ulp.
    """
    return torch.lerp(start.float(), end.float(), float(alpha))


def generator_coefficient(alpha: float, gen_map: str = "sqrt") -> float:
    """The factor s(alpha) applied to an OFT generator: Q(alpha) = s(alpha) Q.

    sqrt by default (the paper's iOFT caption "Q_m(alpha) = sqrt(alpha) Q_m"); linear = alpha.
    """
    if gen_map == "sqrt":
        if alpha < 0:
            raise ValueError(f"generator map sqrt needs alpha >= 0, got {alpha}")
        return math.sqrt(alpha)
    if gen_map == "linear":
        return float(alpha)
    raise ValueError(f"generator map must be 'sqrt' or 'linear', not {gen_map!r}")


def scaled(t: torch.Tensor, c: float) -> torch.Tensor:
    """c t as an fp32 product cast back: c = 1 returns t exactly, c = 0 returns zeros exactly."""
    return (t.float() * c).to(t.dtype)


def triu_index(b: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.triu_indices(b, b, 1)                        # strict upper triangle, row-major (built on CPU)
    return idx[0].to(device), idx[1].to(device)


def skew_from_triu(q: torch.Tensor, b: int, rows=None, cols=None) -> torch.Tensor:
    """(n, b(b-1)/2) generator -> (n, b, b) skew-symmetric Q = U - U^T (OFTv2)."""
    if rows is None:
        rows, cols = triu_index(b, q.device)
    U = q.new_zeros(q.shape[0], b, b)
    U = U.index_put((torch.arange(q.shape[0], device=q.device)[:, None], rows[None], cols[None]), q)
    return U - U.transpose(-1, -2)                          # (n, b, b)


def cayley_neumann(Q: torch.Tensor, num_terms: int) -> torch.Tensor:
    """Truncated Cayley transform (I+Q)(I-Q)^-1 = I + 2Q + 2Q^2 + ... (OFTv2, arXiv 2506.19847 §3).

    T = num_terms, exactly as PEFT >= 0.18 (OFTv2, Qiu et al. 2025): T=1 -> I; T=2 -> I + 2Q;
    T>=4 -> I + 2 sum_{k=1}^{T-2} Q^k + Q^{T-1} (T=5, the default: I + 2Q + 2Q^2 + 2Q^3 + Q^4).
    T=3 gives the same matrix as T=4 (PEFT's loop bound; kept so checkpoints mean the same thing).
    Built with T-2 batched matmuls in Q's dtype; converges only for ||Q|| < 1 (not checked, as PEFT).
    """
    n, b, _ = Q.shape
    I = torch.eye(b, device=Q.device, dtype=Q.dtype).expand(n, b, b)
    if num_terms <= 1:
        return I.clone()
    R = torch.add(I, Q, alpha=2.0)          # a fresh tensor: the in-place adds below are autograd-safe
    if num_terms == 2:
        return R
    P = Q
    last = max(num_terms - 1, 3)            # highest power, taken once
    for _ in range(2, last):
        P = torch.bmm(P, Q)                 # (n, b, b): Q^k
        R.add_(P, alpha=2.0)
    return R.add_(torch.bmm(P, Q))          # + Q^last


def cayley_exact(Q: torch.Tensor) -> torch.Tensor:
    """R = (I+Q)(I-Q)^-1, exactly orthogonal for skew Q; solved in fp32, cast back.

    DEVIATION 1: PEFT's exact branch is (I-Q)(I+Q)^-1 = R^T. We use the direction the Neumann series
    converges to, so a generator means the same rotation in both variants (q_ours = -q_PEFT).
    """
    n, b, _ = Q.shape
    with torch.autocast(device_type=Q.device.type, enabled=False):
        Qf = Q.float()
        I = torch.eye(b, device=Q.device, dtype=torch.float32).expand(n, b, b)
        R = torch.linalg.solve(I - Qf, I + Qf, left=False)  # X (I - Q) = I + Q
    return R.to(Q.dtype)


def oft_rotation(q: torch.Tensor, b: int, *, use_cayley_neumann: bool = True, num_terms: int = 5,
                 rows=None, cols=None) -> torch.Tensor:
    """Generator (n, b(b-1)/2) -> rotation blocks R (n, b, b). Zero generator -> exactly I."""
    Q = skew_from_triu(q, b, rows, cols)
    return cayley_neumann(Q, num_terms) if use_cayley_neumann else cayley_exact(Q)


def coft_project(q: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT [Qiu+23 OFT, §3.3]: keep each block's ||Q_i||_F <= eps' = eps / sqrt(rows).

    ||Q_i||_F = sqrt(2) ||q_i|| because Q = U - U^T holds every entry twice (PEFT `_project_batch`).
    """
    eps_ = eps / math.sqrt(q.shape[0])
    norm = math.sqrt(2.0) * q.norm(dim=1, keepdim=True)     # (rows, 1)
    return torch.where(norm <= eps_, q, q * (eps_ / norm.clamp_min(1e-30)))


def oft_rotate_input(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """OFTv2 input-centric rotation: x'_i = x_i R_i per block of b features (no d_in x d_in matrix).

    x (..., d_in), R (n, b, b) or (1, b, b) when blocks share one rotation.
    """
    rows, b, _ = R.shape
    xb = x.unflatten(-1, (-1, b))                           # (..., n, b)
    if rows == 1:
        out = xb @ R[0]                                     # (..., n, b) @ (b, b)
    else:
        out = torch.einsum("...nk,nkc->...nc", xb, R)      # block i: (..., b) @ (b, b)
    return out.flatten(-2)                                  # (..., d_in)


def oft_merge_blockwise(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """W' = W R_bd^T computed block by block: W'[:, block i] = W[:, block i] R_i^T."""
    rows, b, _ = R.shape
    Wb = W.unflatten(1, (-1, b))                            # (d_out, n, b)
    if rows == 1:
        out = Wb @ R[0].T
    else:
        out = torch.einsum("onk,nck->onc", Wb, R)          # (d_out, n, b)
    return out.flatten(1)                                   # (d_out, d_in)


def oft_merge_reference(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Plain reference: build the dense block-diagonal R_bd (d_in, d_in) and multiply (slow, obvious)."""
    n_blocks = W.shape[1] // R.shape[1]
    blocks = [R[0] if R.shape[0] == 1 else R[i] for i in range(n_blocks)]
    return W @ torch.block_diag(*blocks).T                  # (d_out, d_in) @ (d_in, d_in)


def peft_adjusted_block_size(d_in: int, b: int) -> int:
    """The divisor of d_in PEFT substitutes for a non-dividing block size (`adjust_oft_parameters`)."""
    if b >= d_in:
        return d_in
    hi = b
    while hi <= d_in and d_in % hi:
        hi += 1
    lo = b
    while lo > 1 and d_in % lo:
        lo -= 1
    return lo if (b - lo) <= (hi - b) else hi


def miss_delta(D: torch.Tensor, d_in: int) -> torch.Tensor:
    """[Kang+ MiSS/Bone] dW = [D^T D^T ... D^T] tiled along d_in; remainder columns take D^T[:, :d_in % r]."""
    r = D.shape[0]
    reps = -(-d_in // r)                                    # ceil(d_in / r)
    return D.T.repeat(1, reps)[:, :d_in]                    # (d_out, d_in)


def vera_shared_matrices(r: int, d_in_max: int, d_out_max: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's frozen shared A (r, D_in), B (D_out, r): Kaiming-uniform, gain sqrt(2), fan_in = dim 1,
    drawn from a CPU generator seeded with `seed`, A first (PEFT `projection_prng_key`)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def kaiming(shape):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=g)
    A = kaiming((r, d_in_max))
    B = kaiming((d_out_max, r))
    return A, B


def adalora_budget(step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int,
                   total_step: int, deltaT: int) -> tuple[int, bool]:
    """[Zhang+23 AdaLoRA, Eq. 12] cubic budget schedule -> (budget, mask now?). As PEFT `budget_schedule`."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * mul ** 3 + target_bgt), step % deltaT == 0


def keeplora_factors(W: torch.Tensor, G: torch.Tensor, r: int, principal_rank: int, *,
                     niter: int = 2, seed: int = 0, exact_svd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """KeepLoRA init (Luo et al. 2026, as `PA: utils/keeplora.py`), fp32.

    V_k = top-k right singular vectors of W; G_res = G - (G V_k) V_k^T (drop the gradient inside
    W's principal input subspace); G_res ~ U S V^T (rank r); B = U diag(S), A = V^T, zero-padded.
    """
    W, G = W.float(), G.float()
    devices = [W.device] if W.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        k = max(1, min(principal_rank, *W.shape))
        if exact_svd:
            V = torch.linalg.svd(W, full_matrices=False)[2][:k].T      # (d_in, k)
        else:
            V = torch.svd_lowrank(W, q=k, niter=niter)[2]               # (d_in, k)
        G_res = G - (G @ V) @ V.T                                       # (d_out, d_in)
        q = max(1, min(r, *G.shape))
        if exact_svd:
            U, S, Vh = torch.linalg.svd(G_res, full_matrices=False)
            U, S, Vr = U[:, :q], S[:q], Vh[:q].T
        else:
            U, S, Vr = torch.svd_lowrank(G_res, q=q, niter=niter)
    A = G.new_zeros(r, G.shape[1])
    B = G.new_zeros(G.shape[0], r)
    A[:q] = Vr.T                                                        # (q, d_in)
    B[:, :q] = U * S[None, :]                                           # (d_out, q)
    return A, B


# -----------------------------------------------------------------------------
# 2. The wrapper every method derives from
# -----------------------------------------------------------------------------

class AdapterLinear(nn.Module):
    """Wraps a frozen nn.Linear (kept as `.base_layer`) and adds one method's adapter.

    A subclass defines its tensors in __init__ and implements `adapted_forward(x)` (the fast path)
    and `merged_weight()` (fp32 W_eff, the plain reference). Everything else has a default:
      reference_forward(x)   F.linear(x, merged_weight(), merged_bias())   (slow, obvious)
      delta_weight()         merged_weight() - original_weight()
      unmerge_weight(W')     recovers base_layer.weight from a merged weight (exact where possible)
    """
    method = "?"

    def __init__(self, base_layer: nn.Linear, cfg, *, name: str, dtype: torch.dtype | None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{self.method}: module '{name}' is {type(base_layer).__name__}, only nn.Linear can be wrapped")
        self.base_layer = base_layer
        self.cfg = cfg
        self.name = name
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        # DEVIATION 8: adapters default to the base dtype (arena: everything bf16); PEFT upcasts to fp32
        self.adapter_dtype = dtype or base_layer.weight.dtype
        self.adapter_disabled = False
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)

    # HF code occasionally reads module.weight / module.bias: point them at the frozen base.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _param(self, *shape, fill: float | None = None) -> nn.Parameter:
        w = self.base_layer.weight
        t = torch.empty(*shape, device=w.device, dtype=self.adapter_dtype)
        if fill is not None and not t.is_meta:
            t.fill_(fill)
        return nn.Parameter(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_disabled:
            return self.base_forward(x)
        return self.adapted_forward(x)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def original_weight(self) -> torch.Tensor:
        """fp32 W0 (the weight before finetuning)."""
        return self.base_layer.weight.float()

    def additive_update(self) -> torch.Tensor:
        """fp32 dW of a method whose update adds to the frozen weight (W' = W0 + dW); a method whose
        update does not add (DoRA rescales columns, IA3 scales, OFT rotates) overrides merged_weight."""
        raise NotImplementedError(f"{self.method}: define additive_update or merged_weight")

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight.float() + self.additive_update()

    def merged_bias(self) -> torch.Tensor | None:
        b = self.base_layer.bias
        return None if b is None else b.float()

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.original_weight()

    def unmerge_weight(self, W_merged: torch.Tensor) -> torch.Tensor:
        return W_merged.float() - self.additive_update()

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.merged_weight(), self.merged_bias())

    def scale_update_(self, c: float) -> None:
        """dW -> c dW in place, when dW is linear in the one tensor named in `factor_tensors`."""
        if len(self.factor_tensors) == 1 and self.factor_is_dense:
            with torch.no_grad():
                getattr(self, self.factor_tensors[0]).mul_(c)
            return
        raise NotImplementedError(
            f"{self.method}: dW is not linear in one adapter tensor, so it cannot be scaled in factor form; "
            f"use W0 + c * delta_weight(layer) (module '{self.name}')")

    # ---- rewinding (rewind.py asks the class, never a table of method names) -------------------
    # The factor path moves the adapter's own tensors with alpha: alpha = 0 is the identity adapter
    # (the base model), alpha = 1 the final tensors exactly. Default: dW is linear in the tensors
    # named in `factor_tensors`, so scaling them by alpha walks the dense path W0 + alpha dW
    # (`factor_is_dense`). A method that names none has the dense path W0 + alpha (W_ft - W0) only,
    # which every method has; a method whose path is not a scaling overrides `factor_point`.
    factor_tensors: tuple[str, ...] = ()
    factor_is_dense = True            # False: the factor path is a different model between the endpoints
    factor_label = "adapter factor path"   # plot/CSV label; "{gen}" is replaced by the generator map
    dense_label = "dense W0+a*dW"
    rho_measures = ("dw",)            # rewinding strength measures this method defines; [0] is the default

    @classmethod
    def factor_point(cls, tensors: dict[str, torch.Tensor], alpha: float, *, W0: torch.Tensor | None = None,
                     gen_map: str = "sqrt") -> dict[str, torch.Tensor] | None:
        """The tensors that change at factor-path point alpha, from the FINAL `tensors` (by their
        wrapper names); None when the method has no factor path. W0 (base weight): DoRA only."""
        if not cls.factor_tensors:
            return None
        return {k: scaled(tensors[k], float(alpha)) for k in cls.factor_tensors}

    @torch.no_grad()
    def merged_weight_at(self, new: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 merged weight with the adapter tensors `new` in place of the current ones (restored after)."""
        own = {k: v for k, v in self.named_parameters(recurse=False)}
        own.update((k, v) for k, v in self.named_buffers(recurse=False) if k not in self._non_persistent_buffers_set)
        saved = {k: own[k].detach().clone() for k in new}
        for k, v in new.items():
            own[k].copy_(v)
        W = self.merged_weight()
        for k, v in saved.items():
            own[k].copy_(v)
        return W

    # ---- rewinding (h-rewind): what rewind.py asks a method's class, nothing else in this file uses it
    @classmethod
    def has_factor_path(cls) -> bool:
        """True when the method's own tensors define a factor path (it names `factor_tensors` or
        overrides `factor_point`); False: its only rewinding path is the dense W0 + alpha dW."""
        return bool(cls.factor_tensors) or cls.factor_point.__func__ is not AdapterLinear.factor_point.__func__

    @torch.no_grad()
    def rewind_strength(self, new: dict[str, torch.Tensor], measure: str, W0: torch.Tensor) -> float:
        """Strength rho of this module with its adapter tensors at `new` (a factor point):
        ||W - W0||_F (measure "dw", every method; rewind.py note 8). OFT adds its own measures."""
        return float(torch.linalg.norm(self.merged_weight_at(new) - W0))

    def finalize_init(self) -> None:
        """Called by apply_peft once every wrapper is built (PiSSA writes its residual base here)."""

    # load hooks: PiSSA / MiLoRA rebuild the residual base from the loaded initial factors
    def before_load(self):
        return None

    def after_load(self, state) -> None:
        pass

    def extra_repr(self) -> str:
        return f"method={self.method}, d_in={self.in_features}, d_out={self.out_features}"


# -----------------------------------------------------------------------------
# 3. Methods: one Config dataclass + one wrapper (+ an optional model-level `prepare`) each
# -----------------------------------------------------------------------------

# ---- Full FT: nothing to wrap; every parameter trains --------------------------------------------

@dataclass
class FullConfig:
    pass


# ---- LoRA / rsLoRA (Hu et al. 2021; Kalajdzievski 2023) ------------------------------------------

@dataclass
class LoraConfig:
    r: int = 8                 # PEFT-Arena main table: r8a16 (r4a8, r16a32, r32a64)
    alpha: float = 16.0
    dropout: float = 0.05      # arena SFT default (adapter branch only)
    use_rslora: bool = False   # s = alpha/sqrt(r) instead of alpha/r


class LoraLinear(AdapterLinear):
    """[Hu+21 LoRA, Eq. 3] h = W0 x + s B A x; A (r, d_in) Kaiming-uniform, B (d_out, r) = 0."""
    method = "lora"
    # [Hu+21 LoRA, Eq. 3] dW = s B A is linear in B: B <- alpha B (the paper's "LoRA B <- alpha B")
    factor_tensors = ("lora_B",)
    factor_label = "adapter B<-aB"

    def __init__(self, base_layer, cfg: LoraConfig, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        check_rank(self.method, name, cfg.r, self.in_features, self.out_features)
        self.scaling = lora_scaling(cfg.r, cfg.alpha, cfg.use_rslora)
        self.lora_A = self._param(cfg.r, self.in_features)               # (r, d_in)
        self.lora_B = self._param(self.out_features, cfg.r, fill=0.0)     # (d_out, r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # same init as nn.Linear(d_in, r).weight (fan_in = d_in), as PEFT `init_lora_weights=True`
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        xa = self.dropout(x.to(self.lora_A.dtype))
        # s is applied to the (..., r) intermediate, not the (..., d_out) output: same math, less work
        return F.linear(F.linear(xa, self.lora_A) * self.scaling, self.lora_B)  # (..., r) -> (..., d_out)

    def adapted_forward(self, x):
        result = self.base_layer(x)                                       # (..., d_out)
        # out of place on purpose: for 3-D x, nn.Linear's output is a view, and an in-place add on a
        # view costs CopySlices / AsStrided buffers in backward (measured with tests/bench_peft.py)
        return result + self.lora_branch(x).to(result.dtype)

    def additive_update(self):
        # W' = W + s B A (Hu et al. 2021); linear in B, so scale_update_ scales lora_B
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


# ---- DoRA (Liu et al. 2024) ----------------------------------------------------------------------

@dataclass
class DoraConfig(LoraConfig):
    pass


class DoraLinear(LoraLinear):
    """[Liu+24 DoRA, Eq. 5] W' = m * (W + sBA) / ||W + sBA||_row, the norm detached (DoRA §4.3)."""
    method = "dora"
    factor_is_dense = False
    factor_label = "DoRA B<-aB, m lerp"

    @classmethod
    def factor_point(cls, tensors, alpha, *, W0=None, gen_map="sqrt"):
        # [Liu+24 DoRA, Eq. 5] W' = m (W + s B A) / ||W + s B A||_row. Scale the direction update
        # (B <- alpha B) and move the magnitude from its init ||W0||_row to m. Not additive (Deviation 3).
        if W0 is None:
            raise ValueError("factor_point(dora) needs W0 (the base weight) for the initial magnitude ||W0||_row")
        a, m = float(alpha), tensors["magnitude"]
        m0 = row_norm(W0.to(m.dtype)).to(m.dtype)                       # (d_out,) as DoRA's init computes it
        return {"lora_B": scaled(tensors["lora_B"], a), "magnitude": lerp_exact(m0, m, a).to(m.dtype)}

    def __init__(self, base_layer, cfg: DoraConfig, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        m = self._param(self.out_features)                                # (d_out,)
        if not m.is_meta:
            with torch.no_grad():  # B = 0 at init, so m = ||W||_row computed in W's dtype (as PEFT)
                m.copy_(row_norm(self.base_layer.weight).to(m.dtype))
        self.magnitude = m

    def _norm(self, W: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
        return row_norm(W + self.scaling * dW).detach()                  # (d_out,)

    def adapted_forward(self, x):
        result = self.base_layer(x)                                       # (..., d_out) incl. bias
        return result + self.dora_branch(x, result).to(result.dtype)

    def dora_branch(self, x, result):
        """(g-1) W x + g s B A x (the locals die here, before the caller's add: lower peak memory)."""
        xa = x.to(self.lora_A.dtype)
        W = self.base_layer.weight.to(xa.dtype)
        dW = (self.lora_B @ self.lora_A).to(xa.dtype)                     # (d_out, d_in), materialised each step
        g = (self.magnitude / self._norm(W, dW.detach()))                 # (d_out,)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = result if self.base_layer.bias is None else result - self.base_layer.bias
        else:
            # with dropout in training the base product is recomputed on the dropped x (PEFT)
            xa = self.dropout(xa)
            base = F.linear(xa, W)
        lora = F.linear(F.linear(xa, self.lora_A) * self.scaling, self.lora_B)
        # y = g (W x + s B A x) + b  =  base(x) + (g-1) W x + g s B A x
        return (g - 1) * base + g * lora

    def merged_weight(self):
        W = self.base_layer.weight.float()
        V = W + self.additive_update()
        return (self.magnitude.float() / row_norm(V))[:, None] * V

    def unmerge_weight(self, W_merged):
        W = self.base_layer.weight.float()
        dW = self.additive_update()
        g = self.magnitude.float() / row_norm(W + dW)
        return W_merged.float() / g[:, None] - dW


# ---- PiSSA and MiLoRA (Meng et al. 2024; Wang et al. 2024) ---------------------------------------

@dataclass
class PissaConfig(LoraConfig):
    svd_niter: int | None = None   # None: full SVD ("pissa"); K: torch.svd_lowrank niter=K ("pissa_niter_K")


@dataclass
class MiloraConfig(LoraConfig):
    pass


class PissaLinear(LoraLinear):
    """[Meng+24 PiSSA] A, B = principal r triplets (1/s convention); base W_res = W0 - s B0 A0.

    The initial factors A0, B0 are kept as buffers and saved, so W_res is rebuilt from W0 at load
    time and delta_weight is relative to W0: dW = s (B A - B0 A0).
    """
    method = "pissa"
    factor_is_dense = False
    factor_label = "PiSSA factor lerp"

    @classmethod
    def factor_point(cls, tensors, alpha, *, W0=None, gen_map="sqrt"):
        # dW = s (B A - B0 A0): no single linear tensor. Interpolate both factors from their init
        # (A0, B0) (rewind Deviation 3): s B(a) A(a) = s B0 A0 + a (...) + a^2 s (B - B0)(A - A0).
        A, B = tensors["lora_A"], tensors["lora_B"]
        return {"lora_A": lerp_exact(tensors["lora_A0"], A, alpha).to(A.dtype),
                "lora_B": lerp_exact(tensors["lora_B0"], B, alpha).to(B.dtype)}
    minor = False

    def __init__(self, base_layer, cfg, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        w = self.base_layer.weight
        self.register_buffer("lora_A0", torch.zeros(cfg.r, self.in_features, device=w.device, dtype=self.adapter_dtype))
        self.register_buffer("lora_B0", torch.zeros(self.out_features, cfg.r, device=w.device, dtype=self.adapter_dtype))
        if init and not w.is_meta:
            A0, B0 = svd_factors(w, cfg.r, self.scaling, minor=self.minor, niter=getattr(cfg, "svd_niter", None))
            with torch.no_grad():
                self.lora_A0.copy_(A0)
                self.lora_B0.copy_(B0)
                self.lora_A.copy_(A0)
                self.lora_B.copy_(B0)
            self._pending_W0 = w.detach().float()   # (a plain tensor; W_res is written by finalize_init)

    def finalize_init(self):
        W0 = self.__dict__.pop("_pending_W0", None)
        if W0 is not None:
            self.after_load(W0)          # from the factors actually stored (adapter dtype)

    def initial_update(self) -> torch.Tensor:
        return self.scaling * (self.lora_B0.float() @ self.lora_A0.float())   # (d_out, d_in)

    def base_forward(self, x):
        # DEVIATION 5: disabled adapter = the ORIGINAL model W0 = W_res + s B0 A0 (PEFT: W_res)
        result = self.base_layer(x)
        x0 = x.to(self.lora_A0.dtype)
        return result + F.linear(F.linear(x0, self.lora_A0) * self.scaling, self.lora_B0).to(result.dtype)

    def original_weight(self):
        return self.base_layer.weight.float() + self.initial_update()

    def delta_weight(self):
        return self.scaling * (self.lora_B.float() @ self.lora_A.float() - self.lora_B0.float() @ self.lora_A0.float())

    def before_load(self):
        return self.original_weight()

    def after_load(self, W0):
        # fp32 residual from the stored factors, cast once (PEFT: W_res in fp32 then cast)
        with torch.no_grad():
            self.base_layer.weight.copy_((W0 - self.initial_update()).to(self.base_layer.weight.dtype))


class MiloraLinear(PissaLinear):
    """[Wang+25 MiLoRA] as PiSSA with the r smallest singular triplets (full SVD).

    DEVIATION 9: not in PEFT; PiSSA's 1/s factor convention (unverified vs the arena).
    """
    method = "milora"
    factor_label = "MiLoRA factor lerp"
    minor = True


# ---- KeepLoRA (Luo et al. 2026, arXiv 2601.19659) ------------------------------------------------

@dataclass
class KeepLoraConfig(LoraConfig):
    principal_rank: int = 0     # k of W's principal subspace; 0 -> 4r (release default)
    svd_niter: int = 2          # torch.svd_lowrank default, as the release
    seed: int = 0               # seeds both randomised SVDs (the release does not)
    exact_svd: bool = False     # full SVDs instead of randomised ones


def _collect_seed_gradients(model: nn.Module, init_batch: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """One forward/backward on `init_batch` of the UNWRAPPED model: G = dL/dW per target.

    DEVIATION 6: keyed by the same module names the wrappers are looked up with (the release's
    key mismatch means its init most likely never runs); fp32/model dtype, no autocast.
    """
    if not isinstance(init_batch, dict) or "input_ids" not in init_batch:
        raise ValueError("keeplora: init_batch must be a dict with 'input_ids' (and optionally "
                         "'attention_mask', 'labels'); got " + type(init_batch).__name__)
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {n: modules[n].weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    batch = dict(init_batch)
    if "labels" not in batch:  # token-mean CE over the non-padding tokens
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    try:
        loss = model(**batch).loss
        loss.backward()
        grads = {n: w.grad.detach().float().clone() for n, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return grads


def _keeplora_prepare(model, cfg, targets, init_batch, init):
    if not init:
        return None
    if any(lin.weight.is_meta for lin in targets.values()):
        return None
    if init_batch is None:
        raise ValueError("keeplora: initialisation needs `init_batch` (one batch of the training data) to compute "
                         "the seed gradient (KeepLoRA init); pass apply_peft(model, 'keeplora', init_batch=batch)")
    return {"grads": _collect_seed_gradients(model, init_batch, list(targets))}


class KeepLoraLinear(LoraLinear):
    """KeepLoRA as released (`PA: utils/keeplora.py`): A, B from the residual-subspace gradient, A frozen,
    W not compensated, so dW = s U_r S_r V_r^T of G_res at step 0 (not the identity at init).

    In the release, `initialize_keeplora_adapters` looks G up by PEFT-wrapped module names while
    `_collect_keeplora_seed_gradients` keys it by raw HF names: every lookup likely misses and the
    run silently trains LoRA-FA (frozen Kaiming A, B = 0). Here `ctx["grads"]` is keyed by the very
    names the wrappers get, and a missing init_batch is an error (Deviation 6).
    """
    method = "keeplora"

    def __init__(self, base_layer, cfg: KeepLoraConfig, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        self.lora_A.requires_grad_(False)   # only B trains: r * d_out per module
        if init and ctx is not None:
            k = cfg.principal_rank if cfg.principal_rank > 0 else 4 * cfg.r
            A, B = keeplora_factors(self.base_layer.weight, ctx["grads"][name], cfg.r, k,
                                    niter=cfg.svd_niter, seed=cfg.seed, exact_svd=cfg.exact_svd)
            with torch.no_grad():
                self.lora_A.copy_(A)
                self.lora_B.copy_(B)


# ---- AdaLoRA (Zhang et al. 2023) -----------------------------------------------------------------

@dataclass
class AdaLoraConfig:
    r: int = 8                  # target average rank (PEFT target_r; the arena's r)
    init_r: int = 12            # PEFT default; the arena's r=8 does not change it
    alpha: float = 16.0         # arena lora_alpha; forward scale alpha / (ranknum + 1e-5)
    dropout: float = 0.05
    orth_reg_weight: float = 0.5
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    total_step: int | None = None   # may also be passed to adalora_update_and_allocate


class AdaLoraLinear(AdapterLinear):
    """[Zhang+23 AdaLoRA, Eq. 3] dW = B (A * E) alpha / (ranknum + 1e-5), P=B, Lambda=E, Q=A."""
    method = "adalora"
    # [Zhang+23 AdaLoRA, Eq. 3] dW = B (A * E) alpha/(ranknum + 1e-5): linear in E
    factor_tensors = ("lora_E",)
    factor_label = "AdaLoRA E<-aE"

    def __init__(self, base_layer, cfg: AdaLoraConfig, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        r = cfg.init_r
        check_rank(self.method, name, r, self.in_features, self.out_features, field="init_r")
        self.lora_A = self._param(r, self.in_features)        # (r, d_in)   Q
        self.lora_E = self._param(r, 1, fill=0.0)             # (r, 1)      singular values
        self.lora_B = self._param(self.out_features, r)       # (d_out, r)  P
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        w = self.base_layer.weight
        self.register_buffer("ranknum", torch.full((1,), float(r), device=w.device, dtype=self.adapter_dtype))
        self.register_buffer("rank_mask", torch.ones(r, device=w.device, dtype=self.adapter_dtype))
        self.scaling = cfg.alpha if cfg.alpha > 0 else float(r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._ipt: dict[str, dict[str, torch.Tensor]] = {}   # sensitivity EMAs (allocation state)

    def adapted_forward(self, x):
        result = self.base_layer(x)
        return result + self.adalora_branch(x).to(result.dtype)

    def adalora_branch(self, x):
        xa = self.dropout(x.to(self.lora_A.dtype))
        # the scalar alpha/(ranknum+eps) is folded into the small (r, d_in) matrix
        AE = self.lora_A * self.lora_E * (self.scaling / (self.ranknum + 1e-5))    # (r, d_in)
        return F.linear(F.linear(xa, AE), self.lora_B)                             # (..., r) -> (..., d_out)

    def additive_update(self):
        return (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.scaling / (self.ranknum.float() + 1e-5)


# ---- VeRA (Kopiczko et al. 2024) -----------------------------------------------------------------

@dataclass
class VeraConfig:
    r: int = 256               # PEFT-Arena main table
    dropout: float = 0.05
    d_initial: float = 0.1     # lambda_d init; lambda_b = 0
    projection_seed: int = 0   # PEFT projection_prng_key


class VeraShared(nn.Module):
    """The one frozen pair (A, B) all VeRA layers slice. Non-persistent: saved by save_adapter."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A, persistent=False)    # (r, D_in)
        self.register_buffer("B", B, persistent=False)    # (D_out, r)


def _vera_prepare(model, cfg, targets, init_batch, init):
    d_in = max(l.in_features for l in targets.values())
    d_out = max(l.out_features for l in targets.values())
    w = next(iter(targets.values())).weight
    if w.is_meta:
        A = torch.empty(cfg.r, d_in, device="meta")
        B = torch.empty(d_out, cfg.r, device="meta")
    else:
        A, B = vera_shared_matrices(cfg.r, d_in, d_out, cfg.projection_seed)
    return VeraShared(A, B)   # apply_peft attaches it to the model once every wrapper is built


class VeraLinear(AdapterLinear):
    """[Kopiczko+24 VeRA, Eq. 1] h = W0 x + Lambda_b B Lambda_d A x, A and B frozen and shared."""
    method = "vera"
    # [Kopiczko+24 VeRA, Eq. 1] dW = diag(lambda_b) B diag(lambda_d) A: linear in lambda_b
    factor_tensors = ("lambda_b",)
    factor_label = "VeRA lb<-a*lb"

    def __init__(self, base_layer, cfg: VeraConfig, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        if ctx.A.shape[1] < self.in_features or ctx.B.shape[0] < self.out_features:
            raise ValueError(f"vera: shared matrices {tuple(ctx.A.shape)}/{tuple(ctx.B.shape)} too small for '{name}'")
        # a list hides the shared module from this module's children (it belongs to the model root)
        self._shared = [ctx]
        w = base_layer.weight
        if not ctx.A.is_meta and (ctx.A.dtype != self.adapter_dtype or ctx.A.device != w.device):
            ctx.to(device=w.device, dtype=self.adapter_dtype)
        self.lambda_d = self._param(cfg.r, fill=cfg.d_initial)           # (r,)
        self.lambda_b = self._param(self.out_features, fill=0.0)         # (d_out,)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def _AB(self):
        sh = self._shared[0]
        return sh.A[:, : self.in_features], sh.B[: self.out_features, :]   # (r, d_in), (d_out, r)

    def adapted_forward(self, x):
        result = self.base_layer(x)
        return result + self.vera_branch(x).to(result.dtype)         # (..., d_out)

    def vera_branch(self, x):
        A, B = self._AB()
        xa = self.dropout(x.to(self.lambda_d.dtype))
        h = F.linear(xa, A.to(xa.dtype))                              # (..., r)
        del xa   # A is frozen, so backward never needs xa: free it now (peak memory)
        # (folding the vectors into A and B instead is slower: it needs dense (r, d_in) gradients)
        return self.lambda_b * F.linear(self.lambda_d * h, B.to(h.dtype))   # (..., d_out)

    def additive_update(self):
        A, B = self._AB()
        return (self.lambda_b.float()[:, None] * B.float()) @ (self.lambda_d.float()[:, None] * A.float())


# ---- IA3 (Liu et al. 2022) -----------------------------------------------------------------------

@dataclass
class Ia3Config:
    # PEFT-Arena: all-linear targets, feedforward_modules=["down_proj"]: down_proj scales its
    # INPUT, every other target scales its OUTPUT (bias included).
    feedforward_modules: tuple = ("down_proj",)


class Ia3Linear(AdapterLinear):
    """[Liu+22 (IA)^3] non-FF: y = l * (W x + b); FF: y = W (l * x) + b; l = 1 at init."""
    method = "ia3"
    factor_label = "IA3 l<-1+a(l-1)"

    @classmethod
    def factor_point(cls, tensors, alpha, *, W0=None, gen_map="sqrt"):
        # W' = diag(l) W (or W diag(l)): dW linear in (l - 1); lerp(1, l) is exact at alpha = 1
        l = tensors["ia3_l"]
        return {"ia3_l": lerp_exact(torch.ones_like(l), l, alpha).to(l.dtype)}

    def __init__(self, base_layer, cfg: Ia3Config, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        self.is_feedforward = any(_name_matches(name, p) for p in cfg.feedforward_modules)
        self.ia3_l = self._param(self.in_features if self.is_feedforward else self.out_features, fill=1.0)

    def adapted_forward(self, x):
        if self.is_feedforward:
            return self.base_layer((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        result = self.base_layer(x)
        return (result * self.ia3_l).to(result.dtype)

    def merged_weight(self):
        W, l = self.base_layer.weight.float(), self.ia3_l.float()
        return W * l[None, :] if self.is_feedforward else l[:, None] * W

    def merged_bias(self):
        b = self.base_layer.bias
        if b is None:
            return None
        return b.float() if self.is_feedforward else b.float() * self.ia3_l.float()

    def unmerge_weight(self, W_merged):
        # DEVIATION 4: exact division by l (PEFT divides by l + 1e-8)
        l = self.ia3_l.float()
        return W_merged.float() / l[None, :] if self.is_feedforward else W_merged.float() / l[:, None]

    def scale_update_(self, c):
        with torch.no_grad():  # dW = diag(l-1) W (or W diag(l-1)) is linear in l-1
            self.ia3_l.copy_(1 + c * (self.ia3_l - 1))


# ---- MiSS (Kang et al. 2024) ---------------------------------------------------------------------

@dataclass
class MissConfig:
    r: int = 8                 # PEFT-Arena main table: r8, r64 (alpha ignored)
    dropout: float = 0.05


class MissLinear(AdapterLinear):
    """MiSS default ("balance") mode: dW = D^T tiled along d_in, D (r, d_out) = 0 at init."""
    method = "miss"
    # dW = tile(D^T) is linear in D (the paper's "MiSS D <- alpha D")
    factor_tensors = ("miss_D",)
    factor_label = "MiSS D<-aD"

    def __init__(self, base_layer, cfg: MissConfig, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        check_rank(self.method, name, cfg.r, self.in_features, self.out_features)
        self.miss_D = self._param(cfg.r, self.out_features, fill=0.0)   # (r, d_out)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def adapted_forward(self, x):
        result = self.base_layer(x)
        return result + self.miss_branch(x).to(result.dtype)

    def miss_branch(self, x):
        r = self.miss_D.shape[0]
        xd = self.dropout(x.to(self.miss_D.dtype))
        pad = (-self.in_features) % r
        if pad:
            xd = F.pad(xd, (0, pad))                                 # zero-pad d_in to a multiple of r
        z = xd.unflatten(-1, (-1, r)).sum(-2)                        # (..., d_in/r, r) -> (..., r)
        del xd   # no backward needs the dropped x: free it before the matmul allocates (peak memory)
        return z @ self.miss_D                                       # (..., r) @ (r, d_out)

    def additive_update(self):
        return miss_delta(self.miss_D.float(), self.in_features)


# ---- OFT v2 (Qiu et al. 2025) --------------------------------------------------------------------

@dataclass
class OftConfig:
    block_size: int = 16            # b; PEFT-Arena main table: b16-b128, b32 representative
    use_cayley_neumann: bool = True
    num_terms: int = 5              # Cayley-Neumann terms T
    block_share: bool = False       # one rotation for all blocks
    coft: bool = False              # constrained OFT
    eps: float = 6e-5               # COFT radius
    adjust_block_size: bool = False # True: PEFT's silent nearest-divisor adjustment (printed here)


class OftLinear(AdapterLinear):
    """[Qiu+25 OFTv2] y = W R_bd^T x + b with R_bd = blockdiag(R_1..R_n), R_i = Cayley(Q_i).

    Fast path rotates the INPUT block by block (x'_i = x_i R_i), then calls the frozen base layer;
    `merged_weight` is the weight-centric reference. Bias is untouched.
    """
    method = "oft"
    factor_is_dense = False
    factor_label = "OFT generator (iOFT, {gen}*Q)"
    dense_label = "OFT dense-delta W0+a(W_ft-W0)"
    rho_measures = ("q", "r_minus_i", "dw")   # rewind Deviation 4: rho = ||Q||_F by default

    @classmethod
    def factor_point(cls, tensors, alpha, *, W0=None, gen_map="sqrt"):
        # [iOFT, PEFT-Arena Sec. 5] Q_m(alpha) = sqrt(alpha) Q_m for every block generator; the
        # wrapper then builds R = Cayley(-Neumann)(Q(alpha)) and W = W0 blockdiag(R)^T. q holds Q's
        # upper triangle, so scaling q scales Q.
        return {"oft_q": scaled(tensors["oft_q"], generator_coefficient(float(alpha), gen_map))}

    def merged_weight_at(self, new):
        return self.merged_weight_from(new["oft_q"])

    # ---- rewinding (h-rewind): rho of one OFT module, rewind Deviation 4
    @torch.no_grad()
    def rewind_strength(self, new, measure, W0):
        """measure "q": ||Q||_F of the module's whole block-diagonal generator; "r_minus_i": ||R - I||_F
        of its rotation; "dw" as every method. A shared block (rows = 1) stands for all n blocks."""
        if measure == "dw":
            return super().rewind_strength(new, measure, W0)
        q, b = new["oft_q"].float(), self.block_size                   # (rows, b(b-1)/2)
        if measure == "q":
            sq = skew_from_triu(q, b).pow(2).sum()                       # Q (rows, b, b)
        else:
            R = oft_rotation(q, b, use_cayley_neumann=self.cfg.use_cayley_neumann, num_terms=self.cfg.num_terms)
            sq = (R - torch.eye(b, dtype=R.dtype, device=R.device)).pow(2).sum()
        return math.sqrt(float(sq) * (self.n_blocks / q.shape[0]))

    def __init__(self, base_layer, cfg: OftConfig, *, name, dtype, ctx=None, init=True):
        super().__init__(base_layer, cfg, name=name, dtype=dtype)
        d_in, b = self.in_features, cfg.block_size
        if b <= 1 or d_in % b != 0:
            nearest = peft_adjusted_block_size(d_in, max(b, 2))
            if not cfg.adjust_block_size:
                # DEVIATION 2: PEFT silently adjusts; we refuse unless asked
                divisors = [k for k in range(2, d_in + 1) if d_in % k == 0]
                near = sorted(divisors, key=lambda k: (abs(k - b), k))[:3]
                raise HparamError(
                    f"oft: block size b={b} does not divide d_in={d_in} of module '{name}' "
                    f"(d_in % b = {d_in % b if b > 0 else 'n/a'}). Refusing (PEFT would silently use b={nearest}). "
                    f"Nearest valid block sizes: {sorted(near)}; or pass adjust_block_size=True to adjust like PEFT.", "block_size")
            print(f"oft: module '{name}': block size {b} does not divide d_in={d_in}; adjusted to {nearest} (as PEFT)")
            b = nearest
        self.block_size = b
        self.n_blocks = d_in // b
        rows = 1 if cfg.block_share else self.n_blocks
        self.oft_q = self._param(rows, b * (b - 1) // 2, fill=0.0)      # (rows, b(b-1)/2), zero -> R = I
        r_idx, c_idx = triu_index(b, base_layer.weight.device)
        self.register_buffer("triu_rows", r_idx, persistent=False)       # cached (PEFT PR #2805)
        self.register_buffer("triu_cols", c_idx, persistent=False)

    def rotation(self, q: torch.Tensor | None = None) -> torch.Tensor:
        """R blocks (rows, b, b) from the layer's generator, or from a given one (rewinding)."""
        q = self.oft_q if q is None else q
        return oft_rotation(q, self.block_size, use_cayley_neumann=self.cfg.use_cayley_neumann,
                            num_terms=self.cfg.num_terms, rows=self.triu_rows, cols=self.triu_cols)

    def _maybe_coft(self):
        # COFT: in-place no-grad projection before each forward (PEFT); rows already inside the
        # ball are left alone so a checkpointed recompute does not modify saved tensors.
        if self.cfg.coft:
            with torch.no_grad():
                proj = coft_project(self.oft_q.float(), self.cfg.eps).to(self.oft_q.dtype)
                if not torch.equal(proj, self.oft_q) and (proj - self.oft_q).abs().max() > 1e-12:
                    self.oft_q.copy_(proj)

    def adapted_forward(self, x):
        self._maybe_coft()
        R = self.rotation()                                             # (rows, b, b), adapter dtype
        x_rot = oft_rotate_input(x.to(R.dtype), R)                      # (..., d_in)
        return self.base_layer(x_rot.to(x.dtype))

    def merged_weight_from(self, q: torch.Tensor) -> torch.Tensor:
        R = self.rotation(q.to(self.oft_q.dtype)).float()
        return oft_merge_blockwise(self.base_layer.weight.float(), R)

    def merged_weight(self):
        self._maybe_coft()
        return self.merged_weight_from(self.oft_q)

    def merged_weight_reference(self):
        return oft_merge_reference(self.base_layer.weight.float(), self.rotation().float())

    def unmerge_weight(self, W_merged):
        # W = W' (R_bd^T)^-1 block by block (Neumann R is only approximately orthogonal: solve, not transpose)
        R = self.rotation().float()
        Wb = W_merged.float().unflatten(1, (-1, self.block_size)).transpose(0, 1)   # (n, d_out, b)
        Rt = R.transpose(-1, -2).expand(self.n_blocks, -1, -1)                       # (n, b, b)
        out = torch.linalg.solve(Rt, Wb, left=False)                                 # X R_i^T = W'_i
        return out.transpose(0, 1).flatten(1)


# -----------------------------------------------------------------------------
# 4. Registry: one entry per method (the generic tests iterate over it)
# -----------------------------------------------------------------------------

@dataclass
class Method:
    config: type                                   # hyperparameter dataclass
    layer: type | None                             # AdapterLinear subclass (None: Full FT)
    per_module: Callable[[int, int, Any], int]     # closed-form trainable params of one (d_in, d_out) module
    prepare: Callable | None = None                # model-level set-up before wrapping -> ctx for each layer
    identity_at_init: bool = True
    doc: str = ""


METHODS: dict[str, Method] = {
    "full": Method(FullConfig, None, lambda i, o, c: i * o, doc="all parameters train"),
    "lora": Method(LoraConfig, LoraLinear, lambda i, o, c: c.r * (i + o), doc="W + s B A"),
    "dora": Method(DoraConfig, DoraLinear, lambda i, o, c: c.r * (i + o) + o, doc="magnitude * direction"),
    "pissa": Method(PissaConfig, PissaLinear, lambda i, o, c: c.r * (i + o), doc="principal-SVD LoRA, residual base"),
    "milora": Method(MiloraConfig, MiloraLinear, lambda i, o, c: c.r * (i + o), doc="minor-SVD LoRA, residual base"),
    "keeplora": Method(KeepLoraConfig, KeepLoraLinear, lambda i, o, c: c.r * o, prepare=_keeplora_prepare,
                       identity_at_init=False, doc="residual-gradient LoRA, A frozen, W not compensated"),
    "adalora": Method(AdaLoraConfig, AdaLoraLinear, lambda i, o, c: c.init_r * (i + o) + c.init_r, doc="SVD-form LoRA"),
    "vera": Method(VeraConfig, VeraLinear, lambda i, o, c: o + c.r, prepare=_vera_prepare, doc="shared random A, B"),
    "ia3": Method(Ia3Config, Ia3Linear, None, doc="learned rescaling vectors"),
    "miss": Method(MissConfig, MissLinear, lambda i, o, c: c.r * o, doc="tiled shard update"),
    "oft": Method(OftConfig, OftLinear, None, doc="block-diagonal Cayley rotation of the input"),
}


def _ia3_per_module(d_in, d_out, cfg, name=""):
    return d_in if any(_name_matches(name, p) for p in cfg.feedforward_modules) else d_out


def _oft_per_module(d_in, d_out, cfg, name=""):
    b = cfg.block_size if d_in % cfg.block_size == 0 else peft_adjusted_block_size(d_in, cfg.block_size)
    return (1 if cfg.block_share else d_in // b) * (b * (b - 1) // 2)   # = d_in (b-1)/2 without sharing


METHODS["ia3"].per_module = _ia3_per_module
METHODS["oft"].per_module = _oft_per_module


def closed_form_count(method: str, shapes: dict[str, tuple[int, int]], cfg=None) -> int:
    """Sum of the per-module closed form over {module name: (d_in, d_out)} (PEFT-Arena poster parameter counts)."""
    spec, cfg = METHODS[method], cfg or make_config(method)
    total = 0
    for name, (i, o) in shapes.items():
        try:
            total += spec.per_module(i, o, cfg, name)
        except TypeError:
            total += spec.per_module(i, o, cfg)
    return total


# -----------------------------------------------------------------------------
# 5. Model-level API
# -----------------------------------------------------------------------------

def _check_method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown PEFT method '{method}'; known: {', '.join(METHODS)}")
    return METHODS[method]


def make_config(method: str, **hparams):
    """The hyperparameter dataclass of `method`, e.g. make_config("lora", r=8, alpha=16)."""
    spec = _check_method(method)
    names = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(hparams) - names)
    if unknown:
        raise ValueError(f"{method}: unknown hyperparameter(s) {unknown}; valid: {sorted(names)}")
    for k, v in list(hparams.items()):
        if isinstance(v, list):
            hparams[k] = tuple(v)
    return spec.config(**hparams)



# CLI flag -> config field names, shared by train_sft.py and train_grpo.py
_FLAG_ALIASES = {"r": ("r", "rank"), "alpha": ("alpha", "lora_alpha"),
                 "block_size": ("block_size", "oft_block_size", "b"),
                 "dropout": ("dropout", "lora_dropout", "p")}


def hparams_from_flags(method: str, flags: dict, hp_items=(), total_steps: int | None = None) -> dict:
    """Training-script flags -> `make_config` kwargs, checked against the method's fields.

    `flags` holds r / alpha / block_size / dropout (None = the method's default); `hp_items` are
    "KEY=VALUE" strings (--hp, value parsed as JSON, else a string); `total_steps` fills AdaLoRA's
    budget-schedule length unless given. A flag the method has no field for is an error naming it.
    """
    fields = {f.name for f in dataclasses.fields(make_config(method))}
    hp = {}
    for flag, names in _FLAG_ALIASES.items():
        if flags.get(flag) is None:
            continue
        field = next((n for n in names if n in fields), None)
        if field is None:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --method {method} "
                             f"(its fields: {sorted(fields)})")
        hp[field] = flags[flag]
    for item in hp_items:
        key, sep, val = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--hp {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            hp[key] = json.loads(val)
        except ValueError:
            hp[key] = val
    if total_steps is not None and "total_step" in fields and "total_step" not in hp:
        hp["total_step"] = total_steps   # AdaLoRA's budget schedule length
    return hp

def _name_matches(name: str, pattern: str) -> bool:
    """'q_proj' matches any module whose last name parts are q_proj; otherwise a full regex match."""
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def find_targets(model: nn.Module, target_modules=DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """{module name: nn.Linear} matched by the patterns; lm_head and embeddings are never matched.

    Every pattern must match at least one nn.Linear; a pattern matching a non-Linear module is an error.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, AdapterLinear)
               and ".base_layer" not in n and n.split(".")[-1] not in NEVER_WRAPPED}
    out: dict[str, nn.Linear] = {}
    for p in target_modules:
        if p == "all-linear":
            hits = list(linears)
        else:
            hits = [n for n in linears if _name_matches(n, p)]
        if not hits:
            other = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and _name_matches(n, p)]
            leaves = sorted({n.split(".")[-1] for n in linears})
            if other:
                raise HparamError(f"target pattern '{p}' matches {other[:3]} but no nn.Linear; only nn.Linear "
                                  f"modules can be wrapped (Linear leaves in {type(model).__name__}: {leaves})",
                                  "target_modules")
            raise HparamError(f"target pattern '{p}' matches no nn.Linear module in {type(model).__name__} "
                              f"({len(linears)} candidate Linear modules; leaf names: {leaves})", "target_modules")
        for n in hits:
            out[n] = linears[n]
    return dict(sorted(out.items(), key=lambda kv: list(linears).index(kv[0])))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted module path `name` (wrapping, unwrapping; rewind.py swaps too)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """{wrapped module name (HF name, no wrapper prefix): wrapper}."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def peft_state(model: nn.Module) -> dict | None:
    """{'method', 'config', 'target_modules', 'modules', 'adapter_dtype'} of a wrapped model, else None."""
    return getattr(model, STATE_ATTR, None)


def apply_peft(model: nn.Module, method: str, config=None, *, target_modules=DEFAULT_TARGETS,
               adapter_dtype: torch.dtype | None = None, init_batch: dict | None = None,
               _init: bool = True, **hparams) -> list[str]:
    """Wrap the targeted nn.Linear modules of `model` in place and freeze everything else.

    method "full" wraps nothing and makes every parameter trainable. `init_batch` is needed by
    keeplora only. `_init=False` skips data-dependent initialisation (load_adapter, counting).
    Returns the wrapped (or, for "full", the matched) module names.
    """
    spec = _check_method(method)
    if peft_state(model) is not None or adapter_layers(model):
        st = peft_state(model) or {"method": "?"}
        raise ValueError(f"model already has '{st['method']}' adapters; apply_peft works on a plain model")
    if config is None:
        config = make_config(method, **hparams)
    elif hparams:
        config = dataclasses.replace(config, **hparams)
    if not isinstance(config, spec.config):
        raise TypeError(f"{method}: config must be {spec.config.__name__}, got {type(config).__name__}")
    targets = find_targets(model, target_modules)
    if method == "ia3":
        for p in config.feedforward_modules:
            if not any(_name_matches(n, p) for n in targets):
                raise HparamError(f"ia3: feedforward module pattern '{p}' matches none of the {len(targets)} targets",
                                  "feedforward_modules")
    state = {"method": method, "config": config, "target_modules": list(target_modules) if not
             isinstance(target_modules, str) else [target_modules], "modules": list(targets),
             "adapter_dtype": adapter_dtype}
    if spec.layer is None:                       # Full FT: every parameter trains, nothing wrapped
        for p in model.parameters():
            p.requires_grad_(True)
        setattr(model, STATE_ATTR, state)
        return list(targets)
    ctx = spec.prepare(model, config, targets, init_batch, _init) if spec.prepare else None
    # build every wrapper first, so a bad module (rank, block size) leaves the model untouched
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        wrappers = {name: spec.layer(lin, config, name=name, dtype=adapter_dtype, ctx=ctx, init=_init)
                    for name, lin in targets.items()}
    except Exception:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(ctx, nn.Module):               # model-level shared tensors (VeRA's A, B)
        setattr(model, f"peft_{method}_shared", ctx)
    for name, wrapper in wrappers.items():
        wrapper.finalize_init()                  # PiSSA/MiLoRA: write the residual base now
        wrapper.train(targets[name].training)    # a new module defaults to train mode; keep the model's
        set_submodule(model, name, wrapper)
    setattr(model, STATE_ATTR, state)
    return list(targets)


def count_trainable(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def delta_weight(layer: AdapterLinear) -> torch.Tensor:
    """fp32 (d_out, d_in): W_eff - W_original (PiSSA/MiLoRA: relative to the original W0)."""
    return layer.delta_weight()


def merged_weight(layer: AdapterLinear) -> torch.Tensor:
    """fp32 (d_out, d_in) effective dense weight."""
    return layer.merged_weight()


def unmerge_weight(layer: AdapterLinear, W_merged: torch.Tensor) -> torch.Tensor:
    """Invert a merge: the base_layer weight (fp32) that `W_merged` was merged from."""
    return layer.unmerge_weight(W_merged)


def scale_update_(layer: AdapterLinear, c: float) -> None:
    """In place, dW -> c * dW through the one tensor dW is linear in (rewinding's additive path)."""
    layer.scale_update_(c)


def oft_generator(layer: AdapterLinear) -> nn.Parameter:
    """The OFT generator parameter (rows, b(b-1)/2) of a wrapped module (iOFT / SafeRho rewinding)."""
    if not isinstance(layer, OftLinear):
        raise TypeError(f"module '{getattr(layer, 'name', '?')}' is {getattr(layer, 'method', type(layer).__name__)}, not oft")
    return layer.oft_q


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF parameter names (no wrapper prefixes) -> merged weights/biases in the base dtype.

    Adapter tensors are dropped. Load it into a fresh base model (or vLLM) to get the finetuned
    dense model.
    """
    out: dict[str, torch.Tensor] = {}
    for group in iter_merged_state(model):
        out.update(group)
    return out


def _group_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'model.layers.3'; other names are their own group."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[:i + 2])
    return name


def iter_merged_state(model: nn.Module):
    """merged_state_dict one decoder layer at a time: yields {HF name: merged tensor} per layer (and
    one dict per other tensor), so a weight push holds one layer's merged copies at once, not the
    whole model's (~13 GiB at 7B). Plain tensors are the model's own (no copy)."""
    # DEVIATION 3: computed out of place in fp32 then cast; PEFT merges into W in place (bf16 drift)
    layers = adapter_layers(model)
    groups: dict[str, list] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        mod = k.rpartition(".")[0]
        if ".base_layer" in k or mod in layers:
            continue                               # replaced below / adapter tensors
        groups.setdefault(_group_of(k), []).append((k, v))
    for name in layers:
        groups.setdefault(_group_of(name), []).append((name, None))
    for g, entries in groups.items():
        out: dict[str, torch.Tensor] = {}
        for k, v in entries:
            if v is not None:
                out[k] = v.detach()
                continue
            layer = layers[k]
            with torch.no_grad():
                out[f"{k}.weight"] = layer.merged_weight().to(layer.base_layer.weight.dtype)
                b = layer.merged_bias()
                if b is not None:
                    out[f"{k}.bias"] = b.to(layer.base_layer.bias.dtype)
        yield out


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every wrapper by a plain nn.Linear holding the merged weight (in place; returns model)."""
    for name, layer in adapter_layers(model).items():
        base = layer.base_layer
        with torch.no_grad():
            lin = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                            device=base.weight.device, dtype=base.weight.dtype)
            lin.weight.copy_(layer.merged_weight().to(base.weight.dtype))
            if base.bias is not None:
                lin.bias.copy_(layer.merged_bias().to(base.bias.dtype))
        lin.requires_grad_(False)
        set_submodule(model, name, lin)
    drop_peft_state(model)
    return model


def drop_peft_state(model: nn.Module) -> None:
    """Remove what apply_peft attached to the model itself: the method state and the shared
    modules (VeRA's frozen A, B); the caller has already put plain modules in the wrappers' places."""
    for attr in _shared_modules(model):
        delattr(model, attr)
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block, forward = the base model (PiSSA/MiLoRA: the original W0)."""
    st = peft_state(model)
    if st is not None and st["method"] == "full":
        raise RuntimeError("disable_adapters: full fine-tuning keeps no copy of the base weights; load the base model")
    layers = list(adapter_layers(model).values())
    old = [l.adapter_disabled for l in layers]
    for l in layers:
        l.adapter_disabled = True
    try:
        yield model
    finally:
        for l, o in zip(layers, old):
            l.adapter_disabled = o


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in adapter_layers(model).items():
        for k, v in list(layer.named_parameters()) + list(layer.named_buffers()):
            if k.startswith("base_layer."):
                continue
            if k in layer._buffers and k in layer._non_persistent_buffers_set:
                continue
            out[f"{name}.{k}"] = v
    for attr, shared in _shared_modules(model).items():   # e.g. VeRA's frozen A, B (non-persistent buffers)
        for k, v in shared.named_buffers():
            out[f"{attr}.{k}"] = v
    return out


def _shared_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {k: v for k, v in model._modules.items() if k.startswith("peft_") and k.endswith("_shared")}


def _dtype_name(dt) -> str | None:
    return None if dt is None else str(dt).replace("torch.", "")


def save_adapter(model: nn.Module, out_dir, *, base_model: str, extra: dict | None = None) -> None:
    """adapter.safetensors (+ adapter_config.json); method "full": model.safetensors (all weights)."""
    import transformers
    st = peft_state(model)
    if st is None:
        raise ValueError("save_adapter: model has no adapters (call apply_peft or load_adapter first)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = {}
    for n in st["modules"]:
        m = model.get_submodule(n)
        modules[n] = {"d_in": m.in_features, "d_out": m.out_features, "bias": m.bias is not None}
    cfg = {
        "format": "peft-arena-adapter", "format_version": FORMAT_VERSION,
        "method": st["method"], "hparams": dataclasses.asdict(st["config"]),
        "target_modules": st["target_modules"], "modules": modules, "base_model": base_model,
        "model_class": type(model).__name__, "adapter_dtype": _dtype_name(st["adapter_dtype"]),
        "trainable_params": count_trainable(model),
        "versions": {"peft_methods": FORMAT_VERSION, "torch": torch.__version__, "transformers": transformers.__version__},
        "extra": extra or {},
    }
    if st["method"] == "full":
        # tied tensors (embed_tokens / lm_head) are stored once; the config lists the aliases
        seen, tensors, tied = {}, {}, {}
        for k, v in model.state_dict().items():
            key = (v.data_ptr(), tuple(v.shape)) if v.numel() else (k,)
            if key in seen:
                tied[k] = seen[key]
                continue
            seen[key] = k
            tensors[k] = v
        cfg["tied"] = tied
        loading.atomic_save_file(tensors, out_dir / FULL_FILE, metadata={"method": "full"})
    else:
        loading.atomic_save_file(_adapter_tensors(model), out_dir / ADAPTER_FILE, metadata={"method": st["method"]})
    loading.atomic_write_json(out_dir / CONFIG_FILE, cfg)


# Checkpoint discovery: our run dirs, the release's global_step_<k>/ (verl, adapter possibly nested)
# and TRL's checkpoint-<k>/; an HF PEFT directory is read by interop.py.
RELEASE_CKPT_RE = re.compile(r"global_step_\d+$")       # the release's checkpoint dirs (verl trainer)
CHECKPOINT_DIR_RE = re.compile(r"(?:global_step_|checkpoint-)(\d+)$")   # + TRL's checkpoint-<k>/


def find_adapter_dir(path) -> Path | None:
    """The directory holding the adapter files of checkpoint `path`: `path` itself when it has an
    adapter_config.json; for the release's `global_step_<k>/` also a unique nested one (up to 3 levels,
    e.g. `global_step_<k>/actor/lora_adapter/`). None if there is none."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if path.is_dir() and RELEASE_CKPT_RE.search(path.name):
        hits = [f.parent for depth in ("*", "*/*", "*/*/*") for f in path.glob(f"{depth}/{CONFIG_FILE}")]
        if len(hits) == 1:
            return hits[0]
    return None


def run_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """[(step, dir)] of the checkpoints in a training run dir (global_step_<k>/, checkpoint-<k>/), by step."""
    out = []
    for d in Path(run_dir).iterdir():
        m = CHECKPOINT_DIR_RE.search(d.name)
        if m and d.is_dir() and find_adapter_dir(d) is not None:
            out.append((int(m.group(1)), d))
    return sorted(out, key=lambda t: t[0])


def read_adapter_config(adapter_dir) -> dict:
    """Our adapter_config.json, or an HF PEFT one translated to the same fields (interop.py)."""
    adapter_dir = find_adapter_dir(adapter_dir) or Path(adapter_dir)
    path = adapter_dir / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no adapter config (expected {CONFIG_FILE} written by save_adapter "
                                "or by HF PEFT's save_pretrained)")
    cfg = interop.read_json(path)
    if "peft_type" in cfg:
        return interop.peft_to_arena_config(cfg, adapter_dir)
    if cfg.get("format") != "peft-arena-adapter":
        raise ValueError(f"{path}: not a peft-arena adapter config (format={cfg.get('format')!r})")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {cfg['format_version']} is newer than this file ({FORMAT_VERSION})")
    return cfg


def load_adapter(model: nn.Module, adapter_dir) -> list[str]:
    """Re-apply the saved method onto a plain base model (or one already wrapped with the same
    method) and load the tensors. Shapes, method and module set are checked; errors name them."""
    adapter_dir = find_adapter_dir(adapter_dir) or Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("format") == "peft":              # an HF PEFT adapter (interop.py)
        return interop.load_peft_adapter(model, cfg)
    method = cfg["method"]
    _check_method(method)
    st = peft_state(model)
    if st is not None and st["method"] != method:
        raise ValueError(f"load_adapter: {adapter_dir} holds a '{method}' adapter but the model already has "
                         f"'{st['method']}' adapters")
    _check_saved_modules(model, cfg)
    hp = make_config(method, **cfg["hparams"])
    if method == "full":
        return _load_full(model, cfg, hp, adapter_dir, wrap=st is None)
    if st is None:
        dt = getattr(torch, cfg["adapter_dtype"]) if cfg.get("adapter_dtype") else None
        names = apply_peft(model, method, hp, target_modules=cfg["target_modules"], adapter_dtype=dt, _init=False)
    else:
        names = list(adapter_layers(model))
    if sorted(names) != sorted(cfg["modules"]):
        extra_m = sorted(set(names) - set(cfg["modules"]))
        missing_m = sorted(set(cfg["modules"]) - set(names))
        raise ValueError(f"load_adapter: the target patterns {cfg['target_modules']} wrap {len(names)} modules here but the "
                         f"adapter has {len(cfg['modules'])}: not in adapter {extra_m[:3]}, not in model {missing_m[:3]}")
    tensors = load_file(str(adapter_dir / ADAPTER_FILE))
    own = _adapter_tensors(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"load_adapter: tensor names differ from a '{method}' adapter with these hyperparameters: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise ValueError(f"load_adapter: '{k}' has shape {tuple(v.shape)} in {adapter_dir} but {tuple(own[k].shape)} "
                             f"in the model ({method}, hparams {cfg['hparams']})")
    layers = adapter_layers(model)
    states = {n: l.before_load() for n, l in layers.items()}
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
    for n, l in layers.items():
        l.after_load(states[n])
    return names


def _check_saved_modules(model: nn.Module, cfg: dict) -> None:
    """Architecture check: every saved module must exist in `model` with the same shape."""
    for n, s in cfg["modules"].items():
        try:
            m = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"load_adapter: module '{n}' of the adapter ({s['d_in']} -> {s['d_out']}) does not exist in "
                             f"{type(model).__name__} (adapter saved from {cfg.get('model_class')} / {cfg.get('base_model')})") from None
        if (getattr(m, "in_features", None), getattr(m, "out_features", None)) != (s["d_in"], s["d_out"]):
            raise ValueError(f"load_adapter: module '{n}' is {getattr(m, 'in_features', '?')} -> {getattr(m, 'out_features', '?')} "
                             f"in the model but {s['d_in']} -> {s['d_out']} in the adapter (saved from {cfg.get('base_model')})")


def _load_full(model: nn.Module, cfg: dict, hp, adapter_dir: Path, *, wrap: bool) -> list[str]:
    """Full FT checkpoint: every parameter of the model from the saved state dict (tied aliases re-added)."""
    if wrap:
        apply_peft(model, "full", hp, target_modules=cfg["target_modules"])
    tensors = load_file(str(adapter_dir / FULL_FILE))
    for alias, src in cfg.get("tied", {}).items():
        tensors[alias] = tensors[src]
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"load_adapter (full): missing {missing[:5]}, unexpected {unexpected[:5]} (of {len(own)} tensors)")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise ValueError(f"load_adapter (full): '{k}' is {tuple(own[k].shape)} in the model, {tuple(v.shape)} in the file")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
    return list(cfg["modules"])


# -----------------------------------------------------------------------------
# 6. AdaLoRA training hooks (callable from any SFT loop; the release never calls them)
# -----------------------------------------------------------------------------

def _adalora_layers(model) -> dict[str, AdaLoraLinear]:
    layers = {n: l for n, l in adapter_layers(model).items() if isinstance(l, AdaLoraLinear)}
    if not layers:
        raise ValueError("model has no adalora adapters")
    return layers


def adalora_regularizer(model: nn.Module) -> torch.Tensor:
    """orth_reg_weight * mean over A, B of ||A A^T - I||_F, ||B^T B - I||_F ([Zhang+23 AdaLoRA, Eq. 4]).

    DEVIATION 7: a function the SFT loop calls (the release never adds it).

    Add it to the loss: loss = ce + adalora_regularizer(model). PEFT adds it only when the loss
    comes from model(labels=...); the release computes its loss outside, so it is never added.
    """
    layers = _adalora_layers(model)
    w = next(iter(layers.values())).cfg.orth_reg_weight
    terms = []
    for l in layers.values():
        for P, cov in ((l.lora_A, l.lora_A @ l.lora_A.T), (l.lora_B, l.lora_B.T @ l.lora_B)):
            I = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
            terms.append(torch.linalg.norm(cov - I, ord="fro"))
    return w * torch.stack(terms).mean()


@torch.no_grad()
def adalora_update_and_allocate(model: nn.Module, step: int, total_steps: int | None = None) -> dict:
    """Budget / rank allocation ([Zhang+23 AdaLoRA, §3.2-3.3]; PEFT `update_and_allocate`).

    Call every step after loss.backward() (and optimizer.step()) and BEFORE optimizer.zero_grad():
    it reads .grad. Sensitivity I = |p * grad| is smoothed (beta1) with an uncertainty EMA (beta2);
    a triplet's score is s(E_i) + mean_j s(A_ij) + mean_j s(B_ji); triplets at or below the
    (init_bgt - budget)-th smallest score get E_i = 0. After total - tfinal the final pattern is
    re-applied each step. Returns {"budget", "masked", "rank_pattern"}.
    """
    layers = _adalora_layers(model)
    cfg = next(iter(layers.values())).cfg
    total = total_steps if total_steps is not None else cfg.total_step
    if total is None or total <= 0:
        raise ValueError("adalora_update_and_allocate: total_steps is required (or set AdaLoraConfig.total_step)")
    if cfg.tinit >= total - cfg.tfinal:
        raise ValueError(f"adalora: tinit={cfg.tinit} must be < total_steps - tfinal = {total - cfg.tfinal}")
    init_bgt = sum(l.lora_E.shape[0] for l in layers.values())
    target_bgt = cfg.r * len(layers)
    end = total - cfg.tfinal

    def update_ipt():
        for n, l in layers.items():
            for pn in ("lora_A", "lora_B", "lora_E"):
                p = getattr(l, pn)
                if p.grad is None:
                    raise RuntimeError(f"adalora: {n}.{pn}.grad is None; call adalora_update_and_allocate after "
                                       f"loss.backward() and before optimizer.zero_grad()")
                s = l._ipt.setdefault(pn, {"avg": torch.zeros_like(p), "unc": torch.zeros_like(p)})
                ipt = (p * p.grad).abs()
                s["avg"] = cfg.beta1 * s["avg"] + (1 - cfg.beta1) * ipt
                s["unc"] = cfg.beta2 * s["unc"] + (1 - cfg.beta2) * (ipt - s["avg"]).abs()

    def mask_to_budget(budget):
        scores = {}
        for n, l in layers.items():
            sc = {pn: l._ipt[pn]["avg"] * l._ipt[pn]["unc"] for pn in ("lora_A", "lora_B", "lora_E")}
            scores[n] = sc["lora_E"].view(-1) + sc["lora_A"].mean(1) + sc["lora_B"].mean(0)   # (r,)
        k = init_bgt - budget
        pattern = {}
        if k <= 0:
            return {n: l.rank_mask.bool().tolist() for n, l in layers.items()}
        thr = torch.kthvalue(torch.cat([s.float() for s in scores.values()]), k=k)[0].item()
        for n, l in layers.items():
            keep = scores[n] > thr
            l.lora_E.masked_fill_(~keep[:, None], 0.0)
            l.rank_mask.copy_(keep.to(l.rank_mask.dtype))
            pattern[n] = keep.tolist()
        return pattern

    if step < end:
        update_ipt()
        budget, do_mask = adalora_budget(step, init_bgt=init_bgt, target_bgt=target_bgt, tinit=cfg.tinit,
                                         tfinal=cfg.tfinal, total_step=total, deltaT=cfg.deltaT)
        pattern = mask_to_budget(budget) if do_mask else None
        return {"budget": budget, "masked": do_mask, "rank_pattern": pattern}
    if step == end:
        budget, _ = adalora_budget(step, init_bgt=init_bgt, target_bgt=target_bgt, tinit=cfg.tinit,
                                   tfinal=cfg.tfinal, total_step=total, deltaT=cfg.deltaT)
        pattern = mask_to_budget(budget)
        for l in layers.values():
            l._ipt.clear()
        return {"budget": budget, "masked": True, "rank_pattern": pattern}
    for l in layers.values():   # final phase: keep the frozen pattern
        l.lora_E.masked_fill_(~l.rank_mask.bool()[:, None], 0.0)
    return {"budget": target_bgt, "masked": True, "rank_pattern": {n: l.rank_mask.bool().tolist() for n, l in layers.items()}}


# -----------------------------------------------------------------------------
# 7. CLI: trainable-parameter counts at the paper's settings (meta device, no weights)
# -----------------------------------------------------------------------------

SHAPES_DIR = Path(__file__).resolve().parent / "configs" / "model_shapes"

# (label, method, hparams, poster Qwen2.5-7B, poster Llama-3.2-3B) -- PEFT-Arena poster main table (SFT rows)
PAPER_SETTINGS = [
    ("OFT b16", "oft", {"block_size": 16}, "8.49M", "7.08M"),
    ("OFT b32", "oft", {"block_size": 32}, "17.55M", "11.55M"),
    ("OFT b64", "oft", {"block_size": 64}, "35.68M", "24.97M"),
    ("OFT b128", "oft", {"block_size": 128}, "71.92M", "47.34M"),
    ("LoRA r4a8", "lora", {"r": 4, "alpha": 8}, "10.09M", "6.90M"),
    ("LoRA r8a16", "lora", {"r": 8, "alpha": 16}, "20.19M", "12.16M"),
    ("LoRA r16a32", "lora", {"r": 16, "alpha": 32}, "40.37M", "24.31M"),
    ("LoRA r32a64", "lora", {"r": 32, "alpha": 64}, "80.74M", "48.63M"),
    ("AdaLoRA r8a16", "adalora", {"r": 8, "alpha": 16}, "30.28M", "18.24M"),
    ("PiSSA r8a16", "pissa", {"r": 8, "alpha": 16}, "20.19M", "12.16M"),
    ("MiLoRA r8a16", "milora", {"r": 8, "alpha": 16}, "20.19M", "12.16M"),
    ("MiSS r8", "miss", {"r": 8}, "11.12M", "6.19M"),
    ("MiSS r64", "miss", {"r": 64}, "89.00M", "49.55M"),
    ("VeRA r256", "vera", {"r": 256}, "1.44M", "0.82M"),
    ("DoRA r8a16", "dora", {"r": 8, "alpha": 16}, "21.58M", "12.93M"),
    ("IA3", "ia3", {}, "1.82M", "0.92M"),
    ("KeepLoRA r8", "keeplora", {"r": 8, "alpha": 16}, "-", "-"),
]
POSTER_ANOMALIES = {  # PEFT-Arena poster main table: poster cells that do not follow the closed forms
    ("llama-3.2-3b", "OFT b16"): "poster 7.08M; closed form 5.59M",
    ("llama-3.2-3b", "OFT b64"): "poster 24.97M; closed form 23.48M",
    ("llama-3.2-3b", "LoRA r4a8"): "poster 6.90M; closed form 6.08M",
}


def load_shape_config(shape_name: str, **overrides):
    """transformers config from configs/model_shapes/<name>.json (public dimensions, no weights).

    `overrides` replace config fields (the tests build a 1-layer copy: every layer has the same shapes).
    """
    import transformers
    path = SHAPES_DIR / f"{shape_name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model-shape config (available: {sorted(p.stem for p in SHAPES_DIR.glob('*.json'))})")
    d = json.loads(path.read_text())
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    d.update(overrides)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def build_meta_model(shape_name: str, **overrides):
    """An HF causal LM on the meta device (no memory, no weights) from configs/model_shapes/<name>.json."""
    import transformers
    config = load_shape_config(shape_name, **overrides)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def paper_counts(shape_name: str) -> list[dict]:
    rows = []
    model = build_meta_model(shape_name)   # built once (seconds); each setting wraps a deep copy
    n_total = sum(p.numel() for p in model.parameters())
    n_embed = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    rows.append({"setting": "Full FT", "method": "full", "count": n_total, "non_embedding": n_total - n_embed})
    for label, method, hp, pq, pl in PAPER_SETTINGS:
        m = copy.deepcopy(model)
        apply_peft(m, method, _init=False, **hp)
        rows.append({"setting": label, "method": method, "count": count_trainable(m),
                     "poster": pq if shape_name.startswith("qwen") else pl,
                     "note": POSTER_ANOMALIES.get((shape_name, label), "")})
    return rows


def _cli_count(args) -> None:
    results = {}
    for shape in args.models:
        rows = paper_counts(shape)
        results[shape] = rows
        print(f"\n{shape} (from {SHAPES_DIR / (shape + '.json')}, meta device; targets {', '.join(DEFAULT_TARGETS)})")
        print(f"{'setting':<15}{'trainable':>16}{'(M)':>9}{'poster':>9}  note")
        for r in rows:
            if r["method"] == "full":
                print(f"{r['setting']:<15}{r['count']:>16,}{r['count'] / 1e9:>8.2f}B{'':>9}  "
                      f"non-embedding {r['non_embedding'] / 1e9:.2f}B (poster lists non-embedding size)")
                continue
            print(f"{r['setting']:<15}{r['count']:>16,}{r['count'] / 1e6:>9.2f}{r['poster']:>9}  {r['note']}")
    print("\nAlso in the PEFT-Arena poster main table: RLVR 'OFT b32' lists 8.49M on Qwen (the b16 count) and RLVR "
          "'LoRA r8a16' lists 24.31M on Llama (the r16 count).")
    if args.json:
        loading.atomic_write_json(args.json, results)
        print(f"wrote {args.json}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="PEFT methods of the arena (library; CLI for parameter counts).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("count", help="trainable parameters at the paper's settings, from configs/model_shapes/*.json")
    g = c.add_argument_group("models")
    g.add_argument("--models", nargs="+", default=["qwen2.5-7b", "llama-3.2-3b"],
                   help="shape config names under configs/model_shapes/ (no weights are loaded)")
    o = c.add_argument_group("output")
    o.add_argument("--json", default=None, help="also write the table as JSON to this path")
    args = ap.parse_args(argv)
    if args.cmd == "count":
        _cli_count(args)


if __name__ == "__main__":
    main(sys.argv[1:])
