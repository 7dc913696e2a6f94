"""Checkpoint loading and conversion against hostile and unusual inputs, found by a
bug hunt: each broken input below is refused with a ModelLoadError naming the file
and the cause (not a raw TypeError, not a model that loads and then fails its first
request inside MLX, not a shape MLX silently wraps round), and the process goes on
loading good checkpoints with MLX memory back where it was."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import load_file, save_file

import amlx
from amlx.checkpoint import read_checkpoint, read_header
from amlx.errors import ModelLoadError
from amlx.models import load_model

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.test_train_lora import on_worker
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from test_train_lora import on_worker

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def q4(qwen, tmp_path_factory):
    return amlx.convert(qwen, tmp_path_factory.mktemp("q") / "q4", quantize=4, group_size=32, progress=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_raw(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _load(path: Path):
    return on_worker(lambda: load_model(path, progress=False))


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        _load(path).model.close()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# -- safetensors headers ------------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 1 << 66) | st.floats() | st.text(max_size=4),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                         max_size=2),
                           max_leaves=5)


@HYPOTHESIS
@given(field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=JSON_VALUES)
def test_any_json_value_in_a_header_entry_is_a_load_error(qwen, tmp_path_factory, field, value):
    """A dtype that is a list or an object ({"dtype": [1]}) was a raw TypeError
    ("unhashable type") from the dtype lookup in read_header."""
    d = tmp_path_factory.mktemp("hdr")
    header, body = _header(qwen / "model.safetensors")
    name = "model.norm.weight"
    entry = dict(header[name], **{field: value})
    header[name] = entry
    _write_raw(d / "model.safetensors", header, body)
    try:
        read_header(d / "model.safetensors")  # (some values fit: shape [1, 64], dtype "I32")
    except ModelLoadError as e:
        assert str(d / "model.safetensors") in str(e) and repr(name) in str(e)


@pytest.mark.parametrize("dims", [[1 << 31, 0], [1 << 32, 0], [0, (1 << 32) + 3], [0, 1 << 63]])
def test_a_dimension_beyond_int32_is_refused(qwen, tmp_path, dims):
    """MLX's dimensions are int32: a tensor of no elements with a dimension of 2**31 or
    more loaded with the dimension wrapped round ([2**31, 0] became [-2147483648, 0],
    [2**32 + 3, 0] became [3, 0]), and `convert` wrote the negative shape out (seen with
    a multimodal Gemma 3's carried vision tower; here a rotary cache, which the loader drops)."""
    d = _copy(qwen, tmp_path / "c")
    header, body = _header(d / "model.safetensors")
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    header[name] = {"dtype": "F32", "shape": dims, "data_offsets": [0, 0]}
    _write_raw(d / "model.safetensors", header, body)
    with pytest.raises(ModelLoadError, match="invalid shape") as info:
        read_checkpoint(d)
    assert str(d / "model.safetensors") in str(info.value) and repr(name) in str(info.value)


# -- quantization configs that the tensors fit but MLX cannot run ---------------------------------


def _requantized(q4: Path, dst: Path, bits: int, group: int) -> Path:
    """`q4` with every quantized layer rewritten as `bits`-bit groups of `group`: tensors
    of exactly the shapes the config then asks for (random packed values)."""
    d = _copy(q4, dst)
    tensors = load_file(str(d / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name in [n for n in tensors if n.endswith(".scales")]:
        base = name[: -len(".scales")]
        out, inputs = tensors[name].shape[0], tensors[name].shape[1] * 32
        tensors[f"{base}.weight"] = rng.integers(0, 1 << 32, (out, inputs * bits // 32), dtype=np.uint32)
        for leaf in ("scales", "biases"):
            tensors[f"{base}.{leaf}"] = (rng.random((out, inputs // group)) * 0.01).astype(np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "mlx"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"] = {"group_size": group, "bits": bits}
    cfg["quantization_config"] = dict(cfg["quantization"])
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("bits, group, key", [(7, 32, "bits"), (1, 32, "bits"), (16, 32, "bits"),
                                              (4, 16, "group_size"), (8, 16, "group_size")])
def test_quantization_mlx_cannot_run_is_refused_at_load(q4, tmp_path, bits, group, key):
    """bits 7 (or 1, 16) and group_size 16 with tensors of matching shapes loaded, and
    the first request failed inside MLX ("Quantization bits must be 1, 2, 3, 4, 5, 6 or 8",
    "Quantization group size must be 32, 64 or 128")."""
    d = _requantized(q4, tmp_path / "c", bits, group)
    _refused(d, str(d / "config.json"), f"quantization.{key}")


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
def test_every_bit_width_mlx_runs_loads_and_generates(q4, tmp_path, bits):
    """The widths the check above keeps: mlx-community releases use 2, 3, 5 and 6 bits too."""
    d = _requantized(q4, tmp_path / "c", bits, 64)
    with amlx.load_sync(d, max_batch_size=2) as model:
        assert len(model.complete_sync([1, 2, 3], max_tokens=3).token_ids) == 3


# -- tokenizer_config.json ----------------------------------------------------------------------


@pytest.mark.parametrize("template", [5, True, 1.5, {"default": 5}, [{"name": "default", "template": 5}],
                                      [{"name": "default"}], ["a"], [{"name": ["a"], "template": "x"}],
                                      [{"name": 5, "template": "x"}]])
def test_a_chat_template_that_is_not_text_is_a_load_error(qwen, tmp_path, template):
    """chat_template 5 (or true, 1.5, {"default": 5}) loaded, and every chat request
    then generated its tokens and failed at the end with a raw TypeError ("argument of
    type 'int' is not iterable", looking for the tool-call format in the template)."""
    d = _copy(qwen, tmp_path / "c")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="chat_template must be text") as info:
        amlx.load_sync(d).close()
    assert str(d / "tokenizer_config.json") in str(info.value)
