"""`amlx convert` probed against references: float conversions load to the source's
logits exactly, quantized ones to the logits of their numpy-dequantized weights,
and what a checkpoint carries besides its weights survives the conversion."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import amlx

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.decoding import prefill_logits
    from tests.test_train_lora import on_worker
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.decoding import prefill_logits
    from test_train_lora import on_worker

IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def _logits(path, dtype=None) -> np.ndarray:
    return prefill_logits(path, IDS, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_float_conversion_gives_the_sources_logits(qwen, tmp_path, dtype):
    out = amlx.convert(qwen, tmp_path / "out", dtype=dtype, progress=False)
    np.testing.assert_array_equal(_logits(out), _logits(qwen, dtype))


def test_additional_chat_templates_are_carried(qwen, tmp_path):
    """The named chat templates of additional_chat_templates/ (what transformers
    writes beside chat_template.jinja, e.g. a "tool_use" template) were dropped:
    copy_carried copied plain files only, so the converted checkpoint's tokenizer
    lost every template but the default."""
    src = tmp_path / "src"
    shutil.copytree(qwen, src)
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    out = amlx.convert(src, tmp_path / "out", quantize=4, group_size=32, progress=False)
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    assert (out / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
