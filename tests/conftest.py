"""Shared pytest fixtures: the committed toy base model and a random model of the same shape.

Run the suite with `python -m pytest` (see README). Everything runs on CPU; CUDA-only tests are
marked with `skipif(not torch.cuda.is_available())`.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


@pytest.fixture
def tiny_random():
    """(model, tokenizer): the toy architecture with random weights, fp32, CPU, eval mode."""
    from toy_world import build_random_toy_model
    return build_random_toy_model(seed=0)


@pytest.fixture
def toy():
    """(model, tokenizer): a fresh copy of the committed pretrained toy base (fp32, CPU)."""
    from loading import TOY_MODEL_DIR, load_model
    if not (TOY_MODEL_DIR / "config.json").exists():
        pytest.skip("toy_model/ is not built yet (python arena.py pretrain-toy)")
    return load_model("toy", dtype="float32", device="cpu")


@pytest.fixture
def vllm_double(monkeypatch):
    """`import vllm` returns tests/vllm_double.py (vLLM 0.34.0's API over a transformers model);
    evaluate.py's CUDA check is bypassed so `--backend vllm` runs on CPU. Yields the double module
    (`live_engines()`, `CREATED`)."""
    import vllm_double as vd
    vd.install(monkeypatch)
    import evaluate
    monkeypatch.setattr(evaluate, "vllm_available", lambda: True)
    yield vd
    vd.reset()
