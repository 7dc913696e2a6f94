"""Parity with transformers on less common but legal model configurations.

Found by fuzzing configurations (sizes, head layouts, rope scalings, windows,
config styles) against Hugging Face transformers on PyTorch CPU (float32,
eager attention); each test here is one fault that fuzzing found, on the
smallest checkpoint that shows it. Tolerance as in tests/test_models.py:
max|amlx - transformers| / max|transformers| < 1e-4 over every position.
"""

from __future__ import annotations

import numpy as np
import pytest

from amlx import _mlx as mx
from amlx.models import load_model

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
except ImportError:  # tests/ itself on sys.path (rootdir-less run)
    from helpers.checkpoints import load_reference, make_checkpoint, reference_logits

RTOL_F32 = 1e-4
PROMPT = [5, 17, 42, 99, 3, 64, 120, 7, 250, 31, 8, 77, 150, 12, 90, 45, 33, 201, 66, 10]


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def amlx_logits(path, ids, dtype=None) -> np.ndarray:
    lm = load_model(path, dtype=dtype)
    try:
        with mx.array(np.asarray(ids, np.int32).reshape(1, -1)) as x, lm.model(x) as out:
            return out.astype(mx.float32).numpy()[0]
    finally:
        lm.model.close()


def assert_parity(path, ids=PROMPT, dtype=None) -> None:
    want = reference_logits(load_reference(path), ids)
    got = amlx_logits(path, ids, dtype)
    assert got.shape == want.shape
    assert rel_err(got, want) < RTOL_F32


# ---------------------------------------------------------------------------
# Gemma 3: final_logit_softcapping


@pytest.mark.parametrize("arch", ["gemma3", "gemma3_text"])
def test_final_logit_softcapping_is_applied_where_transformers_applies_it(arch, tmp_path):
    """transformers' Gemma3ForCausalLM caps the logits (tanh(x / c) * c); its multimodal
    Gemma3ForConditionalGeneration never does, whatever text_config says. amlx capped
    both, so a multimodal checkpoint's logits were 0.6 off relative (argmax unchanged,
    log-probabilities and sampling not)."""
    path = make_checkpoint(tmp_path / arch, arch, final_logit_softcapping=5.0)
    assert_parity(path)
