"""Tests for peft_methods.py (issue 3): every method against its own reference and against HF PEFT.

Scope:
  * generic tests parametrised over peft_methods.METHODS (a newly registered method is tested
    without new code): identity at init, merge exactness + unmerge, fast path vs the plain
    merged-weight reference, save/load round trip, parameter count = closed form, a few training
    steps change only adapter tensors, bf16 autocast on CPU, fp32 with gradient checkpointing;
  * equivalence with HF PEFT (test-only oracle) for LoRA, rsLoRA, DoRA, PiSSA, VeRA, IA3, OFT
    (Cayley-Neumann and exact Cayley), MiSS, AdaLoRA (HF PEFT >= 0.18 as the numerical reference);
  * OFT, PiSSA/MiLoRA, KeepLoRA and AdaLoRA specifics; paper parameter counts (PEFT-Arena poster main table);
    bad input.
Run: python -m pytest tests/test_peft_methods.py -q
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import peft_methods as pm

TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
ALL = list(pm.METHODS)
# toy-model hyperparameters per method (defaults otherwise); keeplora uses exact SVDs for checkable math
TOY_HP = {"keeplora": {"exact_svd": True}, "vera": {"r": 32}, "oft": {"block_size": 16}}

_FALLBACK = {}


def _fallback_tiny():
    if "m" not in _FALLBACK:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        torch.manual_seed(0)
        _FALLBACK["m"] = Qwen2ForCausalLM(Qwen2Config(**TINY)).float().eval()
    return copy.deepcopy(_FALLBACK["m"])


@pytest.fixture
def base(request):
    """Random-init toy-architecture model (conftest `tiny_random` when present), fp32, eval,
    with non-zero q/k/v biases so bias handling (IA3 scales them) is exercised."""
    try:
        m = request.getfixturevalue("tiny_random")
        m = m[0] if isinstance(m, tuple) else m
    except pytest.FixtureLookupError:
        m = _fallback_tiny()
    m = m.float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make(method, base, batch, **hp):
    m = copy.deepcopy(base)
    kw = {**TOY_HP.get(method, {}), **hp}
    pm.apply_peft(m, method, init_batch=batch if method == "keeplora" else None, **kw)
    return m.eval()


def perturb(model, std=0.02, seed=3):
    """Random perturbation of every trainable tensor (most methods are the identity at init,
    which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# -----------------------------------------------------------------------------
# Generic tests over the registry
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL)
def test_identity_at_init_and_module_types(method, base, batch):
    ref = logits(base, batch)
    m = make(method, base, batch)
    spec = pm.METHODS[method]
    layers = pm.adapter_layers(m)
    if spec.layer is not None:   # picotron #23: assert nothing was silently left unwrapped
        assert len(layers) == 7 * base.config.num_hidden_layers
        assert all(type(l) is spec.layer and isinstance(l.base_layer, nn.Linear) for l in layers.values())
        assert not any(p.requires_grad for n, p in m.named_parameters() if ".base_layer." in n or "embed" in n)
    out = logits(m, batch)
    if spec.identity_at_init:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    else:   # keeplora (as released) starts away from W0; disabling the adapter gives W0 back
        assert (out - ref).abs().max() > 1e-5
        with pm.disable_adapters(m):
            torch.testing.assert_close(logits(m, batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_merge_exact_unmerge_and_reference(method, base, batch):
    m = make(method, base, batch)
    perturb(m)
    out = logits(m, batch)
    # merged dense model = adapted model
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(pm.merged_state_dict(m))
    torch.testing.assert_close(logits(fresh, batch), out, atol=1e-4, rtol=0)
    merged = pm.merge_and_unload(copy.deepcopy(m))
    assert not pm.adapter_layers(merged)
    torch.testing.assert_close(logits(merged, batch), out, atol=1e-4, rtol=0)
    if pm.METHODS[method].layer is None:
        return
    assert (out - logits(base, batch)).abs().max() > 1e-4          # the perturbation did something
    with pm.disable_adapters(m):
        torch.testing.assert_close(logits(m, batch), logits(base, batch), atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(4)
    for name, layer in pm.adapter_layers(m).items():
        x = torch.randn(3, 5, layer.in_features, generator=g)
        with torch.no_grad():
            # fast path == plain merged-weight reference
            torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=2e-5, rtol=1e-5)
            W = pm.merged_weight(layer)
            # unmerge restores the base_layer weight; delta is relative to the original W0
            torch.testing.assert_close(pm.unmerge_weight(layer, W), layer.base_layer.weight, atol=2e-5, rtol=1e-5)
            W0 = dict(base.named_parameters())[name + ".weight"]
            torch.testing.assert_close(pm.delta_weight(layer), W - W0, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_save_load_round_trip(method, base, batch, tmp_path):
    m = make(method, base, batch)
    perturb(m)
    pm.save_adapter(m, tmp_path / "ckpt", base_model="tiny-random", extra={"step": 7})
    cfg = pm.read_adapter_config(tmp_path / "ckpt")
    assert cfg["method"] == method and cfg["base_model"] == "tiny-random" and cfg["extra"] == {"step": 7}
    assert cfg["trainable_params"] == pm.count_trainable(m)
    assert (tmp_path / "ckpt" / (pm.FULL_FILE if method == "full" else pm.ADAPTER_FILE)).exists()
    fresh = copy.deepcopy(base)                 # the ORIGINAL base (PiSSA rebuilds W_res from it)
    names = pm.load_adapter(fresh, tmp_path / "ckpt")
    assert sorted(names) == sorted(cfg["modules"])
    torch.testing.assert_close(logits(fresh, batch), logits(m, batch), atol=1e-6, rtol=0)
    assert pm.count_trainable(fresh) == pm.count_trainable(m)


@pytest.mark.parametrize("method", ALL)
def test_parameter_count_closed_form(method, base, batch):
    m = make(method, base, batch)
    if method == "full":
        assert pm.count_trainable(m) == sum(p.numel() for p in base.parameters())
        return
    shapes = {n: (l.in_features, l.out_features) for n, l in pm.adapter_layers(m).items()}
    cfg = pm.peft_state(m)["config"]
    assert pm.count_trainable(m) == pm.closed_form_count(method, shapes, cfg) > 0


@pytest.mark.parametrize("method", ALL)
def test_training_changes_only_adapter_params(method, base, batch):
    m = make(method, base, batch)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainable = {n for n, p in m.named_parameters(remove_duplicate=False) if p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = m(**batch, labels=batch["input_ids"]).loss
        if method == "adalora":
            loss = loss + pm.adalora_regularizer(m)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = m.state_dict()
    for k, v in before.items():
        if k in trainable:
            assert not torch.equal(v, after[k]), f"trainable {k} did not change"
        else:
            assert torch.equal(v, after[k]), f"frozen {k} changed"


@pytest.mark.parametrize("method", ALL)
def test_bf16_autocast_and_gradient_checkpointing(method, base, batch):
    labels = batch["input_ids"]
    m = make(method, base, batch)
    perturb(m)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(**batch, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
    # fp32 with gradient checkpointing: same loss and gradients as without
    m1 = make(method, base, batch, **({"dropout": 0.0} if hasattr(pm.make_config(method), "dropout") else {}))
    perturb(m1)
    m2 = copy.deepcopy(m1)
    enable = getattr(m2, "activation_checkpointing_enable", None) or m2.gradient_checkpointing_enable
    enable()
    calls = {"n": 0}
    probe = m2.get_submodule("model.layers.0.self_attn.q_proj")   # early in the layer: recomputed in backward
    probe.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    res = []
    for mm in (m1, m2):
        mm.train()
        loss = mm(**batch, labels=labels).loss
        loss.backward()
        res.append((loss.detach(), {n: p.grad for n, p in mm.named_parameters() if p.requires_grad}))
    assert calls["n"] == 2, "checkpointing did not recompute the layer"
    torch.testing.assert_close(res[0][0], res[1][0], atol=1e-6, rtol=0)
    for n, g in res[0][1].items():
        torch.testing.assert_close(res[1][1][n], g, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# Equivalence with HF PEFT: two Linear layers of awkward sizes, one with bias
# -----------------------------------------------------------------------------

class TwoLayer(nn.Module):
    def __init__(self, d_hidden=40):
        super().__init__()
        self.lin1 = nn.Linear(96, d_hidden, bias=True)
        self.lin2 = nn.Linear(d_hidden, 72, bias=False)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


def two_layer(d_hidden=40):
    torch.manual_seed(5)
    return TwoLayer(d_hidden)


def _peft_layer(pmodel, name):
    return pmodel.base_model.model.get_submodule(name)


def _map(method, peft_cfg_kw):
    """{our tensor name: (PEFT layer -> PEFT tensor, transform)}: how PEFT's tensors map onto ours.
    The transform is linear, so it maps gradients the same way."""
    ident = lambda t: t
    A = (lambda L: L.lora_A["default"].weight, ident)
    B = (lambda L: L.lora_B["default"].weight, ident)
    # Deviation 1 mapping: PEFT's exact Cayley is (I-Q)(I+Q)^-1, which is ours at -q
    sign = -1.0 if (method == "oft" and not peft_cfg_kw.get("use_cayley_neumann", True)) else 1.0
    return {
        "lora": {"lora_A": A, "lora_B": B}, "pissa": {"lora_A": A, "lora_B": B},
        "dora": {"lora_A": A, "lora_B": B, "magnitude": (lambda L: L.lora_magnitude_vector["default"].weight, ident)},
        "vera": {"lambda_d": (lambda L: L.vera_lambda_d["default"], ident),
                 "lambda_b": (lambda L: L.vera_lambda_b["default"], ident)},
        "ia3": {"ia3_l": (lambda L: L.ia3_l["default"], lambda t: t.reshape(-1))},
        "oft": {"oft_q": (lambda L: L.oft_R["default"].weight, lambda t: sign * t)},
        "miss": {"miss_D": (lambda L: L.miss_block["default"], ident)},
        "adalora": {"lora_A": (lambda L: L.lora_A["default"], ident), "lora_E": (lambda L: L.lora_E["default"], ident),
                    "lora_B": (lambda L: L.lora_B["default"], ident)},
    }[method]


def _copy_from_peft(pmodel, ours, method, peft_kw):
    with torch.no_grad():
        for n in ("lin1", "lin2"):
            L, O = _peft_layer(pmodel, n), ours.get_submodule(n)
            for ours_name, (get, tf) in _map(method, peft_kw).items():
                getattr(O, ours_name).copy_(tf(get(L)))


PARITY = [
    ("lora", "lora", dict(r=4, lora_alpha=8), dict(r=4, alpha=8, dropout=0.0)),
    ("rslora", "lora", dict(r=4, lora_alpha=8, use_rslora=True), dict(r=4, alpha=8, dropout=0.0, use_rslora=True)),
    ("dora", "dora", dict(r=4, lora_alpha=8, use_dora=True), dict(r=4, alpha=8, dropout=0.0)),
    ("pissa", "pissa", dict(r=4, lora_alpha=8, init_lora_weights="pissa"), dict(r=4, alpha=8, dropout=0.0)),
    ("vera", "vera", dict(r=16, vera_dropout=0.0), dict(r=16, dropout=0.0)),
    ("ia3", "ia3", dict(feedforward_modules=["lin2"]), dict(feedforward_modules=("lin2",))),
    ("oft", "oft", dict(oft_block_size=8, r=0, use_cayley_neumann=True, num_cayley_neumann_terms=5),
     dict(block_size=8, use_cayley_neumann=True, num_terms=5)),
    ("oft", "oft", dict(oft_block_size=8, r=0, use_cayley_neumann=False), dict(block_size=8, use_cayley_neumann=False)),
    ("oft", "oft", dict(oft_block_size=8, r=0, block_share=True), dict(block_size=8, block_share=True)),
    ("oft", "oft", dict(oft_block_size=8, r=0, coft=True, eps=6e-3), dict(block_size=8, coft=True, eps=6e-3)),
    ("miss", "miss", dict(r=7, miss_dropout=0.0), dict(r=7, dropout=0.0)),
    ("adalora", "adalora", dict(init_r=6, target_r=4, lora_alpha=8, total_step=10, lora_dropout=0.0),
     dict(init_r=6, r=4, alpha=8, dropout=0.0)),
]


def _peft_model(peft_name, kw, model):
    import peft
    cls = {"lora": peft.LoraConfig, "rslora": peft.LoraConfig, "dora": peft.LoraConfig, "pissa": peft.LoraConfig,
           "vera": peft.VeraConfig, "ia3": peft.IA3Config, "oft": peft.OFTConfig, "miss": peft.MissConfig,
           "adalora": peft.AdaLoraConfig}[peft_name]
    return peft.get_peft_model(model, cls(target_modules=["lin1", "lin2"], **kw), autocast_adapter_dtype=False)


def _randomise_peft(pmodel, method, seed=6):
    g = torch.Generator().manual_seed(seed)
    std = {"oft": 0.05, "vera": 0.1, "ia3": 0.1}.get(method, 0.05)
    with torch.no_grad():
        for n, p in sorted(pmodel.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("peft_name,method,peft_kw,our_kw", PARITY,
                         ids=[f"{p[0]}-{i}" for i, p in enumerate(PARITY)])
def test_equivalent_to_hf_peft(peft_name, method, peft_kw, our_kw):
    pytest.importorskip("peft")
    base = two_layer()
    pmodel = _peft_model(peft_name, peft_kw, copy.deepcopy(base))
    ours = copy.deepcopy(base)
    pm.apply_peft(ours, method, target_modules=("lin1", "lin2"), **our_kw)
    if method == "pissa":   # our own SVD init equals PEFT's (factors and residual base)
        for n in ("lin1", "lin2"):
            L, O = _peft_layer(pmodel, n), ours.get_submodule(n)
            torch.testing.assert_close(O.lora_A0, L.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(O.base_layer.weight, L.base_layer.weight, atol=1e-5, rtol=1e-5)
    if method == "vera":    # same seeded shared projections
        torch.testing.assert_close(ours.peft_vera_shared.A, pmodel.base_model.vera_A["default"], atol=0, rtol=0)
        torch.testing.assert_close(ours.peft_vera_shared.B, pmodel.base_model.vera_B["default"], atol=0, rtol=0)
    _randomise_peft(pmodel, method)
    mapping = _map(method, peft_kw)
    _copy_from_peft(pmodel, ours, method, peft_kw)
    if method == "pissa":   # bit-identical residual base for the fp32 comparison below
        with torch.no_grad():
            for n in ("lin1", "lin2"):
                ours.get_submodule(n).base_layer.weight.copy_(_peft_layer(pmodel, n).base_layer.weight)
    x = torch.randn(5, 3, 96, generator=torch.Generator().manual_seed(7))
    w = torch.randn(5, 3, 72, generator=torch.Generator().manual_seed(8))
    for mode in ("eval", "train"):
        outs = []
        for model in (pmodel, ours):
            getattr(model, mode)()
            model.zero_grad()
            xx = x.clone().requires_grad_(True)
            y = model(xx)
            (y * w).sum().backward()
            outs.append((y.detach(), xx.grad))
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-6, rtol=1e-5)
        for n in ("lin1", "lin2"):
            L, O = _peft_layer(pmodel, n), ours.get_submodule(n)
            for ours_name, (get, tf) in mapping.items():
                torch.testing.assert_close(getattr(O, ours_name).grad, tf(get(L).grad), atol=1e-5, rtol=1e-5)
    # merged weights: PEFT merge_and_unload vs ours
    pmerged = copy.deepcopy(pmodel).merge_and_unload()
    for n in ("lin1", "lin2"):
        O = ours.get_submodule(n)
        torch.testing.assert_close(pm.merged_weight(O), pmerged.get_submodule(n).weight, atol=1e-5, rtol=1e-5)
        if O.base_layer.bias is not None:
            torch.testing.assert_close(O.merged_bias(), pmerged.get_submodule(n).bias, atol=1e-6, rtol=1e-5)


def test_dora_train_mode_dropout_matches_peft():
    """DoRA with dropout in training recomputes the base product on the dropped input (PEFT)."""
    pytest.importorskip("peft")
    base = two_layer()
    pmodel = _peft_model("dora", dict(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.3), copy.deepcopy(base))
    ours = copy.deepcopy(base)
    pm.apply_peft(ours, "dora", target_modules=("lin1", "lin2"), r=4, alpha=8, dropout=0.3)
    _randomise_peft(pmodel, "dora")
    _copy_from_peft(pmodel, ours, "dora", {})
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(9))
    pmodel.train(), ours.train()
    torch.manual_seed(10)
    yp = pmodel(x)
    torch.manual_seed(10)
    yo = ours(x)
    torch.testing.assert_close(yo, yp, atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# OFT specifics
# -----------------------------------------------------------------------------

def test_oft_cayley_neumann_terms_vs_peft_and_exact_sign():
    peft_oft = pytest.importorskip("peft.tuners.oft.layer")
    b = 6
    q = torch.randn(3, b * (b - 1) // 2, generator=torch.Generator().manual_seed(11)) * 0.05
    mod = peft_oft.OFTRotationModule(3, q.shape[1], b, 3 * b)
    Q = pm.skew_from_triu(q, b)
    for T in range(1, 7):
        ours = pm.oft_rotation(q, b, use_cayley_neumann=True, num_terms=T)
        theirs = mod._cayley_batch(q, b, True, T)
        torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-6)
    I = torch.eye(b).expand(3, b, b)
    Q2 = Q @ Q
    torch.testing.assert_close(pm.oft_rotation(q, b, num_terms=5), I + 2 * Q + 2 * Q2 + 2 * Q2 @ Q + Q2 @ Q2,
                               atol=1e-7, rtol=0)   # the default T = 5 series written out (PEFT >= 0.18 Cayley-Neumann)
    exact = pm.oft_rotation(q, b, use_cayley_neumann=False)
    # Deviation 1: ours is the limit of the Neumann series; PEFT's exact branch is its transpose
    torch.testing.assert_close(exact, pm.oft_rotation(q, b, num_terms=30), atol=1e-6, rtol=0)
    torch.testing.assert_close(exact, mod._cayley_batch(q, b, False).transpose(-1, -2), atol=1e-6, rtol=0)
    torch.testing.assert_close(exact, mod._cayley_batch(-q, b, False), atol=1e-6, rtol=0)
    eye = torch.eye(b).expand(3, b, b)
    torch.testing.assert_close(exact @ exact.transpose(-1, -2), eye, atol=1e-6, rtol=0)  # orthogonal
    errs = [(R @ R.transpose(-1, -2) - eye).abs().max() for R in
            (pm.oft_rotation(q, b, num_terms=T) for T in (5, 12))]
    assert 0 < errs[0] < 1e-2 and errs[1] < errs[0] / 100   # O(||Q||^T): shrinks with more terms
    # COFT projection = PEFT's _project_batch
    mod2 = peft_oft.OFTRotationModule(3, q.shape[1], b, 3 * b)
    torch.testing.assert_close(pm.coft_project(q, 1e-3), mod2._project_batch(q, eps=1e-3), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("share", [False, True])
def test_oft_fast_input_rotation_equals_dense_reference(share):
    base = two_layer()
    m = copy.deepcopy(base)
    pm.apply_peft(m, "oft", target_modules=("lin1", "lin2"), block_size=8, block_share=share)
    perturb(m, std=0.1)
    layer = m.lin1
    assert layer.oft_q.shape == ((1 if share else 12), 28)
    W_fast, W_ref = layer.merged_weight(), layer.merged_weight_reference()
    torch.testing.assert_close(W_fast, W_ref, atol=1e-6, rtol=1e-6)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W_ref.T + layer.base_layer.bias, atol=1e-5, rtol=1e-5)
    # rewinding internals: zero generator gives W; c*q path is consistent with rotation(c*q)
    torch.testing.assert_close(layer.merged_weight_from(torch.zeros_like(layer.oft_q)), layer.base_layer.weight)
    q = pm.oft_generator(layer).detach()
    torch.testing.assert_close(layer.merged_weight_from(0.5 * q),
                               pm.oft_merge_reference(layer.base_layer.weight, layer.rotation(0.5 * q)), atol=1e-6, rtol=1e-6)


def test_oft_block_size_not_dividing_is_refused_or_adjusted(capsys):
    m = two_layer()
    with pytest.raises(ValueError, match=r"b=16 does not divide d_in=40 of module 'lin2'.*PEFT would silently use b=20"):
        pm.apply_peft(copy.deepcopy(m), "oft", target_modules=("lin1", "lin2"), block_size=16)
    m2 = copy.deepcopy(m)
    pm.apply_peft(m2, "oft", target_modules=("lin1", "lin2"), block_size=16, adjust_block_size=True)
    assert m2.lin1.block_size == 16 and m2.lin2.block_size == 20 == pm.peft_adjusted_block_size(40, 16)
    assert "adjusted to 20" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# PiSSA / MiLoRA / KeepLoRA / AdaLoRA specifics
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_pissa_milora_residual_and_subspace(method, base, batch):
    m = make(method, base, batch)
    for name, layer in pm.adapter_layers(m).items():
        W0 = dict(base.named_parameters())[name + ".weight"].detach()
        torch.testing.assert_close(layer.original_weight(), W0, atol=1e-5, rtol=1e-5)
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        r = layer.cfg.r
        idx = slice(len(S) - r, len(S)) if method == "milora" else slice(0, r)
        torch.testing.assert_close(layer.initial_update(), U[:, idx] @ torch.diag(S[idx]) @ Vh[idx], atol=1e-5, rtol=1e-4)
        assert pm.delta_weight(layer).abs().max() == 0
        break


def test_keeplora_init_runs_everywhere_and_is_residual_gradient(base, batch):
    with pytest.raises(ValueError, match="init_batch"):
        pm.apply_peft(copy.deepcopy(base), "keeplora")
    grads = pm._collect_seed_gradients(copy.deepcopy(base), batch, list(pm.find_targets(base)))
    m = make("keeplora", base, batch)
    layers = pm.adapter_layers(m)
    assert len(layers) == 7 * base.config.num_hidden_layers and all(l.lora_B.abs().max() > 0 for l in layers.values())  # the release's init ran nowhere
    assert all(not l.lora_A.requires_grad and l.lora_B.requires_grad for l in layers.values())
    for name, layer in list(layers.items())[:3]:
        W = layer.base_layer.weight
        r, k = layer.cfg.r, 4 * layer.cfg.r
        Vk = torch.linalg.svd(W, full_matrices=False)[2][:k]                     # (k, d_in)
        assert (layer.lora_A @ Vk.T).abs().max() < 1e-4                          # A avoids W's principal subspace
        G_res = grads[name] - grads[name] @ Vk.T @ Vk
        U, S, Vh = torch.linalg.svd(G_res, full_matrices=False)
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        torch.testing.assert_close(layer.lora_B @ layer.lora_A, best, atol=1e-6, rtol=1e-3)
        torch.testing.assert_close(pm.delta_weight(layer), layer.scaling * best, atol=1e-6, rtol=1e-3)


def test_adalora_regularizer_formula(base, batch):
    m = make("adalora", base, batch)
    perturb(m)
    terms = []
    for l in pm.adapter_layers(m).values():
        terms.append(torch.linalg.norm(l.lora_A @ l.lora_A.T - torch.eye(l.lora_A.shape[0])))
        terms.append(torch.linalg.norm(l.lora_B.T @ l.lora_B - torch.eye(l.lora_B.shape[1])))
    torch.testing.assert_close(pm.adalora_regularizer(m), 0.5 * torch.stack(terms).mean())
    assert pm.adalora_budget(0, init_bgt=24, target_bgt=16, tinit=0, tfinal=0, total_step=10, deltaT=1) == (24, False)
    assert pm.adalora_budget(10, init_bgt=24, target_bgt=16, tinit=0, tfinal=0, total_step=10, deltaT=1) == (16, True)


def test_adalora_update_and_allocate_matches_peft():
    """Same params and grads -> the same importance scores, budgets and E masks as PEFT's RankAllocator."""
    pytest.importorskip("peft")
    base = two_layer()
    total, tinit, tfinal = 8, 1, 2
    pmodel = _peft_model("adalora", dict(init_r=6, target_r=2, lora_alpha=8, total_step=total, tinit=tinit,
                                         tfinal=tfinal, deltaT=1, lora_dropout=0.0), copy.deepcopy(base))
    ours = copy.deepcopy(base)
    pm.apply_peft(ours, "adalora", target_modules=("lin1", "lin2"), init_r=6, r=2, alpha=8, dropout=0.0,
                  tinit=tinit, tfinal=tfinal)
    _randomise_peft(pmodel, "adalora")
    _copy_from_peft(pmodel, ours, "adalora", {})
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(13))
    for step in range(1, total + 2):   # PEFT's order: backward, optimizer step, update_and_allocate, zero_grad
        for model in (pmodel, ours):
            model.zero_grad()
            (model(x) ** 2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad and p.grad is not None:
                        p.add_(-0.1 * p.grad)
        pmodel.base_model.update_and_allocate(step)
        info = pm.adalora_update_and_allocate(ours, step, total)
        for n in ("lin1", "lin2"):
            E_peft = _peft_layer(pmodel, n).lora_E["default"]
            torch.testing.assert_close(ours.get_submodule(n).lora_E, E_peft, atol=1e-6, rtol=1e-5)
    final = sum(int(l.rank_mask.sum()) for l in pm.adapter_layers(ours).values())
    assert final == 2 * 2 and info["budget"] == 4
    assert sum(int((l.lora_E != 0).sum()) for l in pm.adapter_layers(ours).values()) == 4


@pytest.mark.parametrize("method", ALL)
def test_scale_update_is_linear_or_refused(method, base, batch):
    m = make(method, base, batch)
    if pm.METHODS[method].layer is None:
        return
    perturb(m)
    layer = next(iter(pm.adapter_layers(m).values()))
    d = pm.delta_weight(layer).detach()
    try:
        pm.scale_update_(layer, 0.3)
    except NotImplementedError as e:
        assert method in str(e) and method in ("dora", "pissa", "milora", "oft")
        return
    torch.testing.assert_close(pm.delta_weight(layer), 0.3 * d, atol=1e-6, rtol=1e-5)


def test_fp32_adapters_on_bf16_base_and_generate(base, batch):
    m = copy.deepcopy(base).to(torch.bfloat16)
    pm.apply_peft(m, "lora", adapter_dtype=torch.float32)
    layer = next(iter(pm.adapter_layers(m).values()))
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    perturb(m)
    out = m(**batch).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(v.dtype == torch.bfloat16 for k, v in pm.merged_state_dict(m).items() if k.endswith("proj.weight"))
    gen = m.generate(batch["input_ids"][:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, batch["input_ids"].shape[1] + 3)


# -----------------------------------------------------------------------------
# Paper parameter counts (PEFT-Arena poster main table) and bad input
# -----------------------------------------------------------------------------

EXPECTED = {   # closed forms (exact) ; issue 3 lists them rounded to 0.01M
    "qwen2.5-7b": {"OFT b16": 8_494_080, "OFT b32": 17_554_432, "OFT b64": 35_675_136, "OFT b128": 71_916_544,
                   "LoRA r4a8": 10_092_544, "LoRA r8a16": 20_185_088, "LoRA r16a32": 40_370_176,
                   "LoRA r32a64": 80_740_352, "DoRA r8a16": 21_575_680, "PiSSA r8a16": 20_185_088,
                   "MiLoRA r8a16": 20_185_088, "MiSS r8": 11_124_736, "MiSS r64": 88_997_888,
                   "VeRA r256": 1_440_768, "IA3": 1_820_672, "AdaLoRA r8a16": 30_279_984, "KeepLoRA r8": 11_124_736},
    # poster anomalies (PEFT-Arena poster main table): it prints OFT b16 7.08M, b64 24.97M, LoRA r4 6.90M for Llama;
    # we match the closed forms below instead.
    "llama-3.2-3b": {"OFT b16": 5_591_040, "OFT b32": 11_554_816, "OFT b64": 23_482_368, "OFT b128": 47_337_472,
                     "LoRA r4a8": 6_078_464, "LoRA r8a16": 12_156_928, "LoRA r16a32": 24_313_856,
                     "LoRA r32a64": 48_627_712, "DoRA r8a16": 12_931_072, "MiSS r8": 6_193_152,
                     "MiSS r64": 49_545_216, "VeRA r256": 824_320, "IA3": 917_504, "AdaLoRA r8a16": 18_237_744},
}
ISSUE_ROUNDED = {"qwen2.5-7b": {"OFT b16": 8.49, "OFT b32": 17.55, "OFT b64": 35.68, "OFT b128": 71.92,
                                "LoRA r4a8": 10.09, "LoRA r8a16": 20.19, "LoRA r16a32": 40.37, "LoRA r32a64": 80.74,
                                "DoRA r8a16": 21.58, "PiSSA r8a16": 20.19, "MiSS r8": 11.12, "MiSS r64": 89.00,
                                "VeRA r256": 1.44, "IA3": 1.82, "AdaLoRA r8a16": 30.28},
                 "llama-3.2-3b": {"OFT b32": 11.55, "LoRA r8a16": 12.16, "LoRA r16a32": 24.31, "LoRA r32a64": 48.63,
                                  "DoRA r8a16": 12.93, "MiSS r8": 6.19, "MiSS r64": 49.55, "VeRA r256": 0.82,
                                  "IA3": 0.92, "AdaLoRA r8a16": 18.24}}


@pytest.mark.parametrize("shape", ["qwen2.5-7b", "llama-3.2-3b"])
def test_paper_parameter_counts(shape):
    full = pm.build_meta_model(shape)                       # meta device: shapes only
    shapes = {n: (l.in_features, l.out_features) for n, l in pm.find_targets(full).items()}
    assert len(shapes) == 7 * 28
    one = pm.build_meta_model(shape, num_hidden_layers=1)   # every layer has the same shapes
    settings = {label: (meth, hp) for label, meth, hp, *_ in pm.PAPER_SETTINGS}
    for label, want in EXPECTED[shape].items():
        meth, hp = settings[label]
        assert pm.closed_form_count(meth, shapes, pm.make_config(meth, **hp)) == want, label
        m = copy.deepcopy(one)
        pm.apply_peft(m, meth, _init=False, **hp)          # the real wrappers, counted
        assert 28 * pm.count_trainable(m) == want, label
    for label, mil in ISSUE_ROUNDED[shape].items():
        assert round(EXPECTED[shape][label] / 1e6, 2) == mil, label
    if shape == "llama-3.2-3b":   # the three poster cells that do not follow the formulas
        for label, poster in [("OFT b16", 7.08), ("OFT b64", 24.97), ("LoRA r4a8", 6.90)]:
            assert round(EXPECTED[shape][label] / 1e6, 2) != poster


def test_shape_configs_and_bench_smoke(tmp_path):
    """configs/model_shapes/*.json give the published sizes; bench_peft.py runs end to end (tiny)."""
    sizes = {"qwen2.5-7b": (3584, 18944, 4, 152064), "llama-3.2-3b": (3072, 8192, 8, 128256),
             "qwen2.5-1.5b": (1536, 8960, 2, 151936)}
    for name, (h, i, kv, v) in sizes.items():
        c = pm.load_shape_config(name)
        assert (c.hidden_size, c.intermediate_size, c.num_key_value_heads, c.vocab_size, c.num_hidden_layers) == (h, i, kv, v, 28)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    bench = pytest.importorskip("bench_peft")
    pytest.importorskip("peft")
    bench.main(["--smoke", "--methods", "lora r8", "--out", str(tmp_path / "b.md")])
    row = [l for l in (tmp_path / "b.md").read_text().splitlines() if l.startswith("| lora r8 |")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1] == "77,824" and float(cells[2]) > 0 and float(cells[3]) > 0   # trainable, ours ms, PEFT ms
    assert (tmp_path / "b.json").exists()


def test_bad_inputs(base, batch, tmp_path):
    with pytest.raises(ValueError, match="unknown PEFT method 'lorra'.*lora"):
        pm.apply_peft(copy.deepcopy(base), "lorra")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        pm.make_config("lora", rank=8)
    with pytest.raises(ValueError, match=r"r=50 is invalid for module 'lin1' \(d_in=96, d_out=40\).*40"):
        pm.apply_peft(two_layer(), "lora", target_modules=("lin1", "lin2"), r=50)
    with pytest.raises(ValueError, match=r"r=50 is invalid for module 'lin1'"):
        pm.apply_peft(two_layer(), "miss", target_modules=("lin1",), r=50)
    with pytest.raises(ValueError, match="'nonexistent' matches no nn.Linear.*q_proj"):
        pm.apply_peft(copy.deepcopy(base), "lora", target_modules=("q_proj", "nonexistent"))
    with pytest.raises(ValueError, match="'mlp' matches .*no nn.Linear"):
        pm.apply_peft(copy.deepcopy(base), "lora", target_modules=("mlp",))
    # a module failing validation leaves the model untouched (PiSSA would otherwise have rewritten lin1)
    m = two_layer()
    m.lin2 = nn.Linear(40, 8)
    W1 = m.lin1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"r=10 is invalid for module 'lin2' \(d_in=40, d_out=8\)"):
        pm.apply_peft(m, "pissa", target_modules=("lin1", "lin2"), r=10)
    assert torch.equal(m.lin1.weight, W1) and not pm.adapter_layers(m) and pm.peft_state(m) is None
    assert all(p.requires_grad for p in m.parameters())
    m = two_layer()
    pm.apply_peft(m, "lora", target_modules=("lin1", "lin2"))
    with pytest.raises(ValueError, match="already has 'lora' adapters"):
        pm.apply_peft(m, "oft", target_modules=("lin1",))
    pm.save_adapter(m, tmp_path / "lora", base_model="two-layer")
    # wrong architecture: lin1 is 96 -> 48 here, 96 -> 40 in the adapter
    with pytest.raises(ValueError, match=r"module 'lin1' is 96 -> 48 in the model but 96 -> 40 in the adapter"):
        pm.load_adapter(two_layer(48), tmp_path / "lora")
    with pytest.raises(ValueError, match="module 'model.layers.0.self_attn.q_proj'.*does not exist in TwoLayer"):
        q = make("lora", base, batch)
        pm.save_adapter(q, tmp_path / "qwen", base_model="tiny")
        pm.load_adapter(two_layer(), tmp_path / "qwen")
    # another method: the model already has oft adapters, the directory holds lora
    o = two_layer()
    pm.apply_peft(o, "oft", target_modules=("lin1", "lin2"), block_size=8)
    with pytest.raises(ValueError, match="holds a 'lora' adapter but the model already has 'oft' adapters"):
        pm.load_adapter(o, tmp_path / "lora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pm.load_adapter(two_layer(), tmp_path / "nothing")
