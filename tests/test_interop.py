"""HF PEFT interop (interop.py): PEFT format out and in, merged dense export, and the
paper's diagnostics (geometry.py, rewind.py) on runs of PEFT checkpoints. HF PEFT 0.21 is the oracle.

Models: tiny random Llama-shaped (d=24, ff=40) and Qwen2-shaped (d=36, ff=60, q/k/v biases) models,
shapes no other test uses. Run: python -m pytest tests/test_interop.py -q
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate as ev
import geometry as geo
import interop
import loading
import peft_methods as pm
import rewind as rw
from toy_world import build_random_toy_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [8, 6, 2, 10, 1, 12, 5, 9]])   # (B=2, T=8)


def tiny_model(arch: str):
    torch.manual_seed(3)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        m = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(vocab_size=52, hidden_size=36, intermediate_size=60, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True)
        m = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():                 # non-zero biases, so IA3's bias scaling is exercised
            for n, p in m.named_parameters():
                if n.endswith("proj.bias"):
                    p.normal_(0, 0.1)
    return m.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()                    # (B, T, V)


# ours: (method, hparams per arch); PEFT's block size / rank must fit both shapes
OURS = {
    "lora": dict(r=4, alpha=8), "rslora": dict(r=4, alpha=8, use_rslora=True), "dora": dict(r=4, alpha=8),
    "pissa": dict(r=4, alpha=8), "milora": dict(r=3, alpha=5, use_rslora=True), "vera": dict(r=8),
    "ia3": {}, "oft": dict(block_size=4), "oft_exact": dict(block_size=4, use_cayley_neumann=False),
    "oft_share": dict(block_size=4, block_share=True), "miss": dict(r=7), "adalora": dict(init_r=6, r=4, alpha=8),
}


def _method(key):
    return {"rslora": "lora", "oft_exact": "oft", "oft_share": "oft"}.get(key, key)


def _randomise(model, seed=5):
    """Non-zero, non-identity adapter values (PiSSA's A0/B0 and AdaLoRA's buffers stay)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in sorted(pm._adapter_tensors(model).items()):
            if t.dtype not in (torch.float32,) or n.endswith(("lora_A0", "lora_B0", "ranknum", "rank_mask")) \
                    or n.startswith(pm.VERA_SHARED_ATTR):
                continue
            noise = torch.randn(t.shape, generator=g)
            if n.endswith(("ia3_l", "magnitude", "lambda_d")):
                t.mul_(1 + 0.2 * noise)
            else:
                t.add_(0.1 * noise)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("key", list(OURS))
def test_export_to_peft_gives_our_logits(key, arch, tmp_path):
    base = tiny_model(arch)
    ours = copy.deepcopy(base)
    hp = dict(OURS[key])
    if key != "ia3" and _method(key) not in ("oft",):
        hp.setdefault("dropout", 0.0)
    pm.apply_peft(ours, _method(key), **hp)
    _randomise(ours)
    want = logits(ours)
    interop.save_peft_adapter(ours, tmp_path / "peft", base_model="tiny")
    pcfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pcfg["peft_type"] == interop._PEFT_TYPE[_method(key)]
    pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(pmodel), want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(logits(base), want, atol=1e-3)          # the adapter really changes the model


PEFT_CFGS = {
    "lora": lambda T: peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, lora_dropout=0.05),
    "rslora": lambda T: peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, use_rslora=True),
    "dora": lambda T: peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, use_dora=True),
    "pissa": lambda T: peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, init_lora_weights="pissa"),
    "vera": lambda T: peft.VeraConfig(r=8, target_modules=T),
    "ia3": lambda T: peft.IA3Config(target_modules=T, feedforward_modules=["down_proj"]),
    "oft": lambda T: peft.OFTConfig(oft_block_size=4, r=0, target_modules=T),
    "oft_exact": lambda T: peft.OFTConfig(oft_block_size=4, r=0, target_modules=T, use_cayley_neumann=False),
    "oft_share": lambda T: peft.OFTConfig(oft_block_size=4, r=0, target_modules=T, block_share=True),
    "oft_coft": lambda T: peft.OFTConfig(oft_block_size=4, r=0, target_modules=T, coft=True, eps=0.05),
    "miss": lambda T: peft.MissConfig(r=7, target_modules=T),
    "adalora": lambda T: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=T, total_step=10),
}


def _peft_randomised(base, key, seed=9):
    pmodel = peft.get_peft_model(copy.deepcopy(base), PEFT_CFGS[key](list(pm.DEFAULT_TARGETS)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(pmodel.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if "oft" in key else 0.1))
    return pmodel.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("key", list(PEFT_CFGS))
def test_import_peft_adapter_gives_peft_logits(key, arch, tmp_path):
    base = tiny_model(arch)
    pmodel = _peft_randomised(base, key)
    want = logits(pmodel)
    pmodel.save_pretrained(str(tmp_path / "a"))
    ours = copy.deepcopy(base)
    names = pm.load_adapter(ours, tmp_path / "a")
    assert len(names) == 7 * 2
    assert pm.peft_state(ours)["method"] == {"rslora": "lora"}.get(key, key.split("_")[0])
    torch.testing.assert_close(logits(ours.eval()), want, atol=2e-5, rtol=1e-5)
    # and back out again: PEFT reads our re-export to the same logits
    interop.save_peft_adapter(ours, tmp_path / "b")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).eval()
    torch.testing.assert_close(logits(again), want, atol=2e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the paper's diagnostics on runs of PEFT checkpoints (a short PEFT training loop, no hub)

def _peft_run(base, config, run_dir: Path, prefix: str, steps=(1, 2, 3)) -> Path:
    """TRL-like run: PEFT training steps on random tokens, `<prefix><k>/` saved after each."""
    torch.manual_seed(0)
    pmodel = peft.get_peft_model(copy.deepcopy(base), config)
    opt = torch.optim.Adam([p for p in pmodel.parameters() if p.requires_grad], lr=2e-2)
    pmodel.train()
    for k in range(1, max(steps) + 1):
        ids = torch.randint(3, 200, (2, 12))
        loss = pmodel(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if k in steps:
            d = run_dir / f"{prefix}{k}"
            pmodel.save_pretrained(str(d))
            (d / "trainer_state.json").write_text(json.dumps({"global_step": k}))
    return run_dir


@pytest.fixture(scope="module")
def peft_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    base, tok = build_random_toy_model(seed=0)
    base.save_pretrained(str(tmp / "base"))
    tok.save_pretrained(str(tmp / "base"))
    T = list(pm.DEFAULT_TARGETS)
    lora = _peft_run(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=T), tmp / "lora_run", "checkpoint-")
    oft = _peft_run(base, peft.OFTConfig(oft_block_size=16, r=0, target_modules=T), tmp / "oft_run", "global_step_")
    return tmp, lora, oft


def test_run_dirs_of_peft_checkpoints_are_discovered(peft_runs):
    tmp, lora, oft = peft_runs
    final, traj = rw.discover_run(lora)
    assert final.name == "checkpoint-3" and [s for s, _ in traj] == [1, 2, 3]
    final, traj = rw.discover_run(oft / "global_step_2")        # one checkpoint: its numbered siblings
    assert [s for s, _ in traj] == [1, 2]
    cfg = pm.read_adapter_config(oft / "global_step_3")
    assert cfg["method"] == "oft" and cfg["extra"] == {"step": 3} and len(cfg["modules"]) == 4 * 7
    # the release layout: the adapter one level down in global_step_<k>/
    nested = tmp / "nested_run" / "global_step_7" / "actor"
    nested.parent.mkdir(parents=True)
    shutil.copytree(oft / "global_step_3", nested)
    assert pm.find_adapter_dir(nested.parent) == nested
    assert [s for s, _ in pm.run_checkpoints(tmp / "nested_run")] == [7]


def test_geometry_end_to_end_on_peft_runs(peft_runs):
    tmp, lora, oft = peft_runs
    (tmp / "g.txt").write_text("\n".join(f"general prompt number {i} about things" for i in range(10)))
    (tmp / "t.jsonl").write_text("\n".join(json.dumps({"problem": f"What is {i}+{i}?"}) for i in range(10)))
    out = tmp / "geo"
    rows = geo.main(["--base", str(tmp / "base"), "--checkpoint", str(lora), "--checkpoint", str(oft / "global_step_3"),
                     "--general-prompts", str(tmp / "g.txt"), "--target-prompts", str(tmp / "t.jsonl"),
                     "--max-tokens", "60", "--max-prompts", "6", "--out", str(out)])
    assert len(rows) == 2
    m_lora = json.loads((out / "lora_run" / "metrics.json").read_text())
    m_oft = json.loads((out / "global_step_3" / "metrics.json").read_text())
    assert m_lora["method"] == "lora" and m_lora["checkpoint"].endswith("checkpoint-3")
    assert m_oft["method"] == "oft"
    # dW of the PEFT run equals PEFT's own merge (merge_check is ours vs reference; here vs PEFT)
    pmodel = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "base")),
                                            str(lora / "checkpoint-3"))
    name = "model.layers.1.mlp.down_proj"
    W_peft = copy.deepcopy(pmodel).merge_and_unload().get_submodule(name).weight
    ours, _, _ = geo.load_finetuned(str(tmp / "base"), lora, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(pm.merged_weight(ours.get_submodule(name)), W_peft, atol=1e-6, rtol=1e-5)


def test_rewind_end_to_end_on_peft_runs(peft_runs):
    tmp, lora, oft = peft_runs
    out = tmp / "rw"
    res = rw.main(["--base", str(tmp / "base"), "--checkpoint", str(lora), "--checkpoint", str(oft),
                   "--grid", "0,0.5,1", "--rewind", "minrho", "--eval", "none", "--save", "all", "--out", str(out)])
    assert [r["method"] for r in res["runs"]] == ["lora", "oft"]
    assert (out / "results.json").is_file()
    saved = sorted(p.parent for p in (out / "points").rglob("adapter_config.json"))
    assert saved, "rewound points are saved as checkpoints"
    assert {pm.read_adapter_config(p)["method"] for p in saved} == {"lora", "oft"}


# -----------------------------------------------------------------------------
# merged dense export

def test_merged_export_loads_and_matches(tmp_path):
    base, tok = build_random_toy_model(seed=0)
    base.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    ours = copy.deepcopy(base)
    pm.apply_peft(ours, "dora", r=4, alpha=8, dropout=0.0)
    _randomise(ours)
    pm.save_adapter(ours, tmp_path / "ck", base_model=str(tmp_path / "base"))
    want = logits(copy.deepcopy(ours).eval())
    merged_sd = pm.merged_state_dict(ours)
    out32 = interop.export_merged(tmp_path / "ck", tmp_path / "m32", dtype="fp32", max_shard_size="200KB")
    assert (out32 / "model.safetensors.index.json").is_file() and len(list(out32.glob("*.safetensors"))) > 1
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out32 / f).is_file(), f
    m32 = transformers.AutoModelForCausalLM.from_pretrained(str(out32)).eval()
    torch.testing.assert_close(logits(m32), want, atol=2e-5, rtol=1e-5)
    # bf16: every weight is our fp32 merge rounded once; logits within bf16 rounding
    r = subprocess.run([sys.executable, "interop.py", "export", str(tmp_path / "ck"), "--to", "merged",
                        "--out", str(tmp_path / "m16"), "--dtype", "bf16"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m16 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m16"))
    assert m16.dtype == torch.bfloat16
    sd16 = m16.state_dict()
    for k, v in merged_sd.items():
        if k in sd16:
            assert torch.equal(sd16[k], v.to(torch.bfloat16)), k
    torch.testing.assert_close(logits(m16.float().eval()), want, atol=0.05, rtol=0.02)
    # a PEFT adapter dir merges the same way (base given on the command line)
    interop.save_peft_adapter(ours, tmp_path / "p")
    outp = interop.export_merged(tmp_path / "p", tmp_path / "mp", dtype="fp32", base_model=str(tmp_path / "base"))
    torch.testing.assert_close(logits(transformers.AutoModelForCausalLM.from_pretrained(str(outp)).eval()), want,
                               atol=2e-5, rtol=1e-5)


def test_export_cli_peft_from_our_checkpoint(tmp_path):
    base = tiny_model("llama")
    ours = copy.deepcopy(base)
    pm.apply_peft(ours, "pissa", r=4, alpha=8, dropout=0.0)
    _randomise(ours)
    pm.save_adapter(ours, tmp_path / "ck", base_model="tiny-llama")
    interop.export_peft(tmp_path / "ck", tmp_path / "p")
    pcfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert pcfg["r"] == 8 and pcfg["lora_alpha"] == 16 and pcfg["base_model_name_or_path"] == "tiny-llama"
    pmodel = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    torch.testing.assert_close(logits(pmodel), logits(ours.eval()), atol=2e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# bad input: one line naming the file / option

def _peft_lora_dir(tmp_path, **cfg_kw) -> Path:
    base = tiny_model("llama")
    pmodel = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], **cfg_kw))
    d = tmp_path / "a"
    pmodel.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("edit,option", [
    ({"rank_pattern": {"q_proj": 3}}, "rank_pattern"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"), ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
    ({"layers_to_transform": [0]}, "layers_to_transform"), ({"peft_type": "LOHA"}, "peft_type"),
    ({"lora_bias": True}, "lora_bias")])
def test_unsupported_peft_option_is_an_error_naming_it(edit, option, tmp_path):
    d = _peft_lora_dir(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(edit)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(interop.InteropError, match=rf"adapter_config.json: PEFT option {option}=") as e:
        pm.load_adapter(tiny_model("llama"), d)
    assert "\n" not in str(e.value)


def test_oft_by_block_count_is_refused(tmp_path):
    pmodel = peft.get_peft_model(tiny_model("llama"), peft.OFTConfig(r=6, oft_block_size=0, target_modules=["q_proj"]))
    pmodel.save_pretrained(str(tmp_path / "o"))
    with pytest.raises(interop.InteropError, match=r"PEFT option r=6 .*oft_block_size"):
        pm.read_adapter_config(tmp_path / "o")


def test_broken_files_name_the_file(tmp_path):
    d = _peft_lora_dir(tmp_path)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(interop.InteropError, match=r"adapter_model.safetensors: unreadable safetensors"):
        pm.load_adapter(tiny_model("llama"), d)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(interop.InteropError, match=r"adapter_config.json: malformed JSON"):
        pm.read_adapter_config(d)
    f.unlink()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    with pytest.raises(interop.InteropError, match=r"adapter_model.safetensors: not found"):
        pm.load_adapter(tiny_model("llama"), d)


def test_peft_adapter_for_another_model_names_the_tensor(tmp_path):
    d = _peft_lora_dir(tmp_path)
    with pytest.raises(interop.InteropError, match=r"lora_A.weight' has shape"):
        pm.load_adapter(tiny_model("qwen2"), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "embed_tokens"]}))
    with pytest.raises(interop.InteropError, match=r"adapter_config.json: target pattern 'embed_tokens'"):
        pm.load_adapter(tiny_model("llama"), d)


@pytest.mark.parametrize("method", ["keeplora", "full"])
def test_no_peft_counterpart_points_to_merged_export(method, tmp_path):
    m, tok = build_random_toy_model(seed=0)
    m.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    batch = tok(["a b c"], return_tensors="pt")
    pm.apply_peft(m, method, init_batch=dict(batch) if method == "keeplora" else None)
    pm.save_adapter(m, tmp_path / "ck", base_model=str(tmp_path / "base"))
    r = subprocess.run([sys.executable, "interop.py", "export", str(tmp_path / "ck"), "--to", "peft",
                        "--out", str(tmp_path / "p")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no HF PEFT counterpart" in r.stderr and "--to merged" in r.stderr
    assert not (tmp_path / "p").exists()
    # ... and the export it points to works
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01)
    pm.save_adapter(m, tmp_path / "ck", base_model=str(tmp_path / "base"))
    out = interop.export_merged(tmp_path / "ck", tmp_path / "merged", dtype="fp32")
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(dense), logits(m.eval()), atol=2e-5, rtol=1e-5)


def test_import_adalora_after_peft_rank_allocation(tmp_path):
    """A PEFT AdaLoRA run whose budget allocation pruned triplets saves resized tensors + rank_pattern."""
    base = tiny_model("llama")
    pc = peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=list(pm.DEFAULT_TARGETS),
                            total_step=8, tinit=1, tfinal=2, deltaT=1)
    pmodel = peft.get_peft_model(copy.deepcopy(base), pc)
    opt = torch.optim.SGD([p for p in pmodel.parameters() if p.requires_grad], lr=0.2)
    for step in range(8):
        pmodel(input_ids=IDS, labels=IDS).loss.backward()
        pmodel.base_model.update_and_allocate(step)
        opt.step()
        opt.zero_grad()
    pmodel.eval()
    want = logits(pmodel)
    pmodel.save_pretrained(str(tmp_path / "a"))
    pattern = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and not all(all(v) for v in pattern.values())       # some triplets really were pruned
    ours = copy.deepcopy(base)
    pm.load_adapter(ours, tmp_path / "a")
    torch.testing.assert_close(logits(ours.eval()), want, atol=2e-5, rtol=1e-5)
    kept = sum(int(l.rank_mask.sum()) for l in pm.adapter_layers(ours).values())
    assert kept == sum(sum(v) for v in pattern.values())
    interop.save_peft_adapter(ours, tmp_path / "b")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "b")).eval()
    torch.testing.assert_close(logits(again), want, atol=2e-5, rtol=1e-5)


def test_evaluate_loads_a_peft_adapter_dir(peft_runs):
    tmp, lora, oft = peft_runs
    ck = lora / "checkpoint-2"
    model, tok, info = ev._load_for_eval(str(tmp / "base"), str(ck), dtype="float32", device="cpu")
    assert info["method"] == "lora" and info["format"] == "peft" and info["extra"] == {"step": 2}
    pmodel = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "base")),
                                            str(ck)).eval()
    ids = tok(["What is 2+2?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, pmodel(input_ids=ids).logits, atol=2e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"no config.json; is it an adapter checkpoint.*--adapter"):
        loading.load_model(str(ck))


def test_fp32_peft_adapter_on_bf16_base_keeps_fp32_adapters(tmp_path):
    base = tiny_model("qwen2")
    pmodel = _peft_randomised(base, "lora")
    pmodel.save_pretrained(str(tmp_path / "a"))
    ours = copy.deepcopy(base).to(torch.bfloat16)
    pm.load_adapter(ours, tmp_path / "a")
    layer = next(iter(pm.adapter_layers(ours).values()))
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), str(tmp_path / "a")).eval()
    torch.testing.assert_close(logits(ours.eval()), logits(ref), atol=0.05, rtol=0.02)


def test_peft_file_missing_modules_names_them(tmp_path):
    from safetensors.torch import load_file, save_file
    d = _peft_lora_dir(tmp_path)
    f = d / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "layers.1." not in k}, str(f))
    with pytest.raises(interop.InteropError, match=r"adapter_model.safetensors: .* wrap 2 modules .* adapts 1: "
                                              r"not in file \['model.layers.1.self_attn.q_proj'\]"):
        pm.load_adapter(tiny_model("llama"), d)
