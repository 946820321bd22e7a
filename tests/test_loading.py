"""Model loading: the toy spec, a local HF-format directory, and clear errors for bad specs.

    python -m pytest tests/test_loading.py -q
"""
import json

import pytest
import torch

import loading


def test_pick_dtype_defaults_and_names():
    assert loading.pick_dtype(None, "cpu") == torch.float32
    assert loading.pick_dtype(None, "cuda") == torch.bfloat16
    assert loading.pick_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        loading.pick_dtype("float8", "cpu")


def test_load_toy(toy):
    model, tok = toy
    assert model.config.model_type == "qwen2"
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.name_or_path == "toy"
    assert not model.training
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 5_000_000, n
    # every Linear in/out dimension a multiple of 64 (OFT b16/b32, LoRA r <= 32)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 64 == 0 and mod.out_features % 64 == 0, name


def test_load_local_hf_dir(tmp_path, tiny_random):
    model, tok = tiny_random
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, t2 = loading.load_model(str(tmp_path / "m"), dtype="float32", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, m2(ids).logits, atol=1e-6)
    assert t2.eos_token == tok.eos_token and t2.chat_template == tok.chat_template


def test_bad_specs_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.load_model("./no/such/model")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"method": "lora"}))
    with pytest.raises(FileNotFoundError, match="no config.json.*--adapter"):
        loading.load_model(str(tmp_path / "adapter"))
    f = tmp_path / "weights.bin"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        loading.load_model(str(f))


def test_unknown_hub_id_offline_names_local_path_option():
    # HF_HUB_OFFLINE=1 (conftest): a hub id cannot be fetched, and the error must say how to fix it
    with pytest.raises(OSError, match="pass its local directory"):
        loading.load_model("no-such-org/no-such-model-xyz")


def test_render_chat_template_and_fallback(tiny_random):
    _, tok = tiny_random
    s = loading.render_chat(tok, "What is 2 + 2?")
    assert s == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"

    class NoTemplate:
        chat_template = None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]
    assert loading.render_chat(NoTemplate(), msgs) == "Be brief.\n\nQ"


def test_atomic_writes(tmp_path):
    loading.atomic_write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 1}
    loading.atomic_save_file({"w": torch.ones(2, 2)}, tmp_path / "w.safetensors")
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.ones(2, 2))
    # replacing a directory keeps exactly one complete copy
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "f").write_text("old")
    loading.atomic_replace_dir(tmp_path / "new", tmp_path / "final")
    assert (tmp_path / "final" / "f").read_text() == "new"
    assert not (tmp_path / "new").exists() and not (tmp_path / "final.old").exists()
    assert not list(tmp_path.glob("**/*.tmp"))
