"""Model loading: the toy spec, a local HF-format directory, and clear errors for bad specs.

    python -m pytest tests/test_loading.py -q
"""
import json
import platform

import pytest
import torch
import transformers

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


# -----------------------------------------------------------------------------
# Run directories (loading.prepare_run_dir and friends)

def _ckpt(out, k, complete=True):
    d = out / f"global_step_{k}"
    d.mkdir(parents=True)
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"step": k}))
    return d


def test_list_checkpoints_complete_only_numeric_order(tmp_path):
    out = tmp_path / "run"
    for k in (10, 2):
        _ckpt(out, k)
    _ckpt(out, 11, complete=False)                     # no completeness marker: not a checkpoint
    (out / ".tmp-global_step_12").mkdir()             # half-written
    (out / "global_step_3.old").mkdir()               # atomic_replace_dir's aside copy
    (out / "global_step_x").mkdir()
    assert loading.list_checkpoints(out) == [(2, out / "global_step_2"), (10, out / "global_step_10")]
    assert loading.latest_checkpoint(out) == out / "global_step_10"
    assert loading.latest_checkpoint(tmp_path / "absent") is None
    assert loading.finished_checkpoint(out) is None    # no summary.json yet
    (out / "summary.json").write_text("{}")
    assert loading.finished_checkpoint(out) == out / "global_step_10"


def test_config_diff_union_sorted_or_new_keys_in_order():
    old = {"lr": 1.0, "steps": 5, "out": "a", "recorded": 7}
    new = {"steps": 6, "lr": 2.0, "out": "b"}
    assert loading.config_diff(old, new, {"out"}) == {"lr": (1.0, 2.0), "recorded": (7, None), "steps": (5, 6)}
    assert list(loading.config_diff(old, new, {"out"})) == ["lr", "recorded", "steps"]
    d = loading.config_diff(old, new, {"out"}, new_keys_only=True)
    assert list(d) == ["steps", "lr"] and d["lr"] == (1.0, 2.0)
    assert loading.config_diff(old, old, set()) == {}


def test_prepare_run_dir_refuses_resumes_and_overwrites(tmp_path):
    out = tmp_path / "run"
    kw = dict(script="train_x", free_keys={"resume", "overwrite"}, owned_files=("config.json", "summary.json"))
    cfg = {"lr": 1.0, "resume": False, "overwrite": False}
    assert loading.prepare_run_dir(out, cfg, **kw) is None              # absent dir: fresh run
    out.mkdir()
    assert loading.prepare_run_dir(out, cfg, **kw) is None              # empty dir: fresh run
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds files; pass --resume"):
        loading.prepare_run_dir(out, cfg, **kw)
    with pytest.raises(FileExistsError, match="no config.json, so it is not a train_x run"):
        loading.prepare_run_dir(out, dict(cfg, resume=True), **kw)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileExistsError, match="already holds this run already"):
        loading.prepare_run_dir(out, cfg, **kw)
    with pytest.raises(FileExistsError, match=r"a different run \(differing settings .*'lr': \(1.0, 2.0\)"):
        loading.prepare_run_dir(out, dict(cfg, lr=2.0), **kw)
    with pytest.raises(ValueError, match="holds a different run; differing settings"):
        loading.prepare_run_dir(out, dict(cfg, lr=2.0, resume=True), **kw)
    assert loading.prepare_run_dir(out, dict(cfg, resume=True), **kw) is None   # no checkpoint yet
    _ckpt(out, 1)
    _ckpt(out, 2)
    assert loading.prepare_run_dir(out, dict(cfg, resume=True), **kw) == out / "global_step_2"
    (out / ".tmp-global_step_3").mkdir()
    assert loading.prepare_run_dir(out, dict(cfg, overwrite=True), is_main=False, **kw) is None
    assert (out / "global_step_2").exists()                             # other ranks delete nothing
    assert loading.prepare_run_dir(out, dict(cfg, lr=2.0, overwrite=True), **kw) is None
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]      # only what the script owns went


def test_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    assert loading.resume_or_overwrite(out) == (False, False)
    out.mkdir()
    assert loading.resume_or_overwrite(out) == (False, False)
    (out / "stray.txt").write_text("")
    assert loading.resume_or_overwrite(out) == (False, True)
    (out / "config.json").write_text("{}")
    assert loading.resume_or_overwrite(out) == (True, False)


def test_environment_block():
    env = loading.environment()
    assert env == {"python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    json.dumps(env)


def test_read_records_reads_every_format_and_names_the_bad_line(tmp_path):
    """The one data reader: JSONL, JSON array and parquet give the same rows; a malformed line is
    an error naming file:line, or skipped and counted with skip_bad_rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.parquet"):
        got, n_bad = loading.read_records(tmp_path / name)
        assert [r for r, _ in got] == rows and n_bad == 0
    assert loading.read_records(tmp_path / "a.jsonl")[0][1][1].endswith("a.jsonl:2")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n[1]\n")
    with pytest.raises(loading.DataError, match=r"bad\.jsonl:2: malformed JSONL line"):
        loading.read_records(tmp_path / "bad.jsonl")
    got, n_bad = loading.read_records(tmp_path / "bad.jsonl", skip_bad_rows=True)
    assert [r for r, _ in got] == rows[:1] and n_bad == 2
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(loading.DataError, match=r"--train-data .*a\.csv: expected"):
        loading.read_records(tmp_path / "a.csv", "--train-data")
    with pytest.raises(loading.DataFileNotFound, match="missing.jsonl"):
        loading.read_records(tmp_path / "missing.jsonl")


def test_run_config_records_the_environment_and_resume_ignores_it(tmp_path):
    """config.json carries python/torch/transformers/threads; a changed environment is not a
    different run (config_diff skips it), a changed setting is."""
    saved = loading.write_run_config(tmp_path, {"lr": 1e-4, "resume": False})
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored == saved and stored["environment"]["torch"] == torch.__version__
    stored["environment"]["torch"] = "0.0"
    assert loading.config_diff(stored, {"lr": 1e-4, "resume": True}, {"resume"}) == {}
    assert loading.config_diff(stored, {"lr": 2e-4, "resume": True}, {"resume"}) == {"lr": (1e-4, 2e-4)}


def test_write_summary_has_the_one_schema(tmp_path):
    s = loading.write_summary(tmp_path, script="train_sft.py", cfg={"model": "toy", "method": "lora"},
                              steps=3, trainable_params=10, final_checkpoint=tmp_path / "global_step_3",
                              train_seconds=1.5, train_last=0.25, train_last_name="loss", tokens_seen=7)
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    assert list(s)[:10] == ["script", "out", "model", "method", "steps", "trainable_params",
                            "final_checkpoint", "train_seconds", "train_last", "train_last_name"]
    assert s["final_checkpoint"].endswith("global_step_3") and s["tokens_seen"] == 7
