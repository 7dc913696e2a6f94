"""Broken checkpoints and adapters found by fuzzing the loaders: each is refused with
a ModelLoadError that names the file and the cause, never a raw TypeError, KeyError,
ZeroDivisionError or re.error from deep inside, nor a model that silently computes
something else (NaN logits, integers read as floats)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import save_file

import amlx
from amlx.errors import ModelLoadError
from amlx.models import load_model
from amlx.train import lora

try:  # the worker helper and the small qwen3 checkpoint (a module fixture) of the LoRA tests
    from tests.test_train_lora import on_worker, qwen  # noqa: F401
except ImportError:  # tests/ itself on sys.path
    from test_train_lora import on_worker, qwen  # noqa: F401

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
Q_PROJ = "model.layers.0.self_attn.q_proj"  # (64, 64) in the small qwen3
V_PROJ = "model.layers.1.self_attn.v_proj"  # (32, 64)


@pytest.fixture(scope="module")
def loaded(qwen):
    lm = on_worker(lambda: load_model(qwen, progress=False))
    yield lm
    on_worker(lm.model.close)


def _ab(rank=2, out=64, inp=64, seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((rank, inp)) * 0.1).astype(np.float32),
            (rng.standard_normal((out, rank)) * 0.1).astype(np.float32))


def amlx_adapter(d, **config):
    """A valid amlx-format adapter on q_proj of layer 0, with `config` overriding its config."""
    d.mkdir(parents=True, exist_ok=True)
    a, b = _ab()
    save_file({f"{Q_PROJ}.lora_a": a, f"{Q_PROJ}.lora_b": b}, str(d / "adapters.safetensors"))
    meta = {"format": "amlx-lora", "version": 1, "rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q_proj"],
            "num_layers": None, "layers": None, "use_rslora": False, "modules": {Q_PROJ: {"rank": 2, "scale": 2.0}}}
    meta.update(config)
    (d / "adapter_config.json").write_text(json.dumps(meta))
    return d


def peft_adapter(d, tensors=None, **config):
    """A valid PEFT LoRA adapter on q_proj of layer 0, `config` overriding its config."""
    d.mkdir(parents=True, exist_ok=True)
    a, b = _ab()
    name = f"base_model.model.{Q_PROJ}"
    save_file(tensors or {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}, str(d / "adapter_model.safetensors"))
    meta = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj"],
            "bias": "none"}
    meta.update(config)
    (d / "adapter_config.json").write_text(json.dumps(meta))
    return d


def mlx_lm_adapter(d, **params):
    d.mkdir(parents=True, exist_ok=True)
    a, b = _ab(out=32)
    save_file({f"{V_PROJ}.lora_a": np.ascontiguousarray(a.T), f"{V_PROJ}.lora_b": np.ascontiguousarray(b.T)},
              str(d / "adapters.safetensors"))
    lp = {"rank": 2, "scale": 10.0, "dropout": 0.0}
    lp.update(params)
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                       "lora_parameters": lp}))
    return d


def refused(loaded, adapter, *needles) -> str:
    with pytest.raises(ModelLoadError) as info:
        on_worker(lambda: lora.load_adapter(loaded.model, adapter, loaded.config))
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# -- adapter configs ------------------------------------------------------------------

NOT_A_NUMBER = st.one_of(st.text(max_size=4), st.lists(st.integers(), max_size=2), st.just({"a": 1}),
                         st.sampled_from([math.nan, math.inf, -math.inf, True, False]))
NOT_AN_INTEGER = st.one_of(NOT_A_NUMBER, st.sampled_from([1.5, 2.25, 0, -1]))

AMLX_BAD = {
    "rank": NOT_AN_INTEGER,
    "alpha": NOT_A_NUMBER,
    "dropout": st.one_of(NOT_A_NUMBER, st.sampled_from([1.0, 2, -0.5])),
    "targets": st.one_of(st.integers(), st.floats(allow_nan=False), st.just(True), st.just([5]), st.just([""]),
                         st.just({"q_proj": 1})),
    "layers": st.one_of(st.floats(allow_nan=False), st.just("x"), st.just(["x"]), st.just([99]), st.just(True)),
    "use_rslora": st.one_of(st.text(min_size=1, max_size=3), st.integers(), st.just([True])),
}


def test_a_valid_hand_made_adapter_of_each_format_loads(loaded, tmp_path):
    """The adapters the tests below break, unbroken."""
    for d in (amlx_adapter(tmp_path / "amlx"), peft_adapter(tmp_path / "peft"), mlx_lm_adapter(tmp_path / "mlxlm")):
        on_worker(lambda: lora.load_adapter(loaded.model, d, loaded.config))
        assert on_worker(lambda: lora.lora_modules(loaded.model))
    on_worker(lambda: lora.remove_lora(loaded.model))


@HYPOTHESIS
@given(data=st.data(), key=st.sampled_from(sorted(AMLX_BAD)))
def test_bad_amlx_adapter_config_values_name_the_file_and_key(loaded, tmp_path, data, key):
    """rank [5], targets 5, layers 1.5, alpha "x" ... were a raw TypeError, ValueError or
    OverflowError from int()/float()/tuple() in _load_amlx; use_rslora "x" was read as true."""
    value = data.draw(AMLX_BAD[key], label=key)
    d = amlx_adapter(tmp_path / "ad", **{key: value})
    refused(loaded, d, str(d / "adapter_config.json"), key)
    shutil.rmtree(d)


@HYPOTHESIS
@given(value=st.one_of(NOT_A_NUMBER, st.sampled_from([1e7, -1e12, 1e308])))
def test_bad_module_scale_is_refused(loaded, tmp_path, value):
    """A NaN, infinite or huge per-module scale loaded, and the model's logits were NaN."""
    d = amlx_adapter(tmp_path / "ad", modules={Q_PROJ: {"rank": 2, "scale": value}})
    refused(loaded, d, str(d), Q_PROJ, "scale")
    shutil.rmtree(d)


PEFT_BAD = {
    "r": st.one_of(NOT_AN_INTEGER, st.just(None)),
    "lora_alpha": st.one_of(NOT_A_NUMBER, st.sampled_from([1e12, 1e308])),
    "lora_dropout": st.one_of(NOT_A_NUMBER, st.sampled_from([1.0, 2, -0.5])),
    "alpha_pattern": st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.just({"(": 3}),
                               st.just({"q_proj": "x"}), st.just({"[": 1}), st.just({"q_proj": math.nan})),
    "rank_pattern": st.one_of(st.integers(), st.just({"(": 2}), st.just({"q_proj": "x"}), st.just({"q_proj": 0}),
                              st.just({"q_proj": 2.5})),
    "layers_to_transform": st.one_of(st.floats(allow_nan=False), st.just(["x"]), st.just([99])),
    "use_rslora": st.one_of(st.text(min_size=1, max_size=3), st.integers(), st.just([True])),
}


@HYPOTHESIS
@given(data=st.data(), key=st.sampled_from(sorted(PEFT_BAD)))
def test_bad_peft_adapter_config_values_name_the_file_and_key(loaded, tmp_path, data, key):
    """alpha_pattern {"(": 3} was a raw re.error, rank_pattern 5 a TypeError, r inf an
    OverflowError, lora_alpha NaN or 1e308 a model with NaN logits."""
    value = data.draw(PEFT_BAD[key], label=key)
    d = peft_adapter(tmp_path / "ad", **{key: value})
    msg = refused(loaded, d, str(d))
    assert key in msg or "scale" in msg  # (lora_alpha: the scale alpha / r it makes)
    shutil.rmtree(d)


MLX_LM_BAD = {"rank": NOT_AN_INTEGER, "scale": st.one_of(NOT_A_NUMBER, st.sampled_from([1e7, 1e308])),
              "dropout": st.one_of(NOT_A_NUMBER, st.sampled_from([1.0, -0.5]))}


@HYPOTHESIS
@given(data=st.data(), key=st.sampled_from(sorted(MLX_LM_BAD)))
def test_bad_mlx_lm_adapter_config_values_name_the_file_and_key(loaded, tmp_path, data, key):
    """lora_parameters.scale [] or rank {} were a raw TypeError; scale NaN gave NaN logits."""
    value = data.draw(MLX_LM_BAD[key], label=key)
    d = mlx_lm_adapter(tmp_path / "ad", **{key: value})
    msg = refused(loaded, d, str(d))
    assert key in msg
    shutil.rmtree(d)


def test_bad_adapter_through_amlx_load(qwen, tmp_path):
    d = peft_adapter(tmp_path / "ad", alpha_pattern={"q_proj(": 2.0})
    with pytest.raises(ModelLoadError, match="alpha_pattern.*not a regular expression") as info:
        amlx.load_sync(qwen, adapter=d)
    assert str(d / "adapter_config.json") in str(info.value)


# -- adapter tensors -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.uint32, np.complex64])
@pytest.mark.parametrize("fmt", ["amlx", "peft"])
def test_adapter_tensors_that_are_not_floats_are_refused(loaded, tmp_path, fmt, dtype):
    """lora_a stored as integers (a mislabelled tensor: the bytes of floats read as I32)
    was cast to float32 and applied: a wrong model, silently."""
    a, b = _ab()
    bad = a.view(np.int32).astype(dtype) if dtype is not np.complex64 else a.astype(np.complex64)
    if fmt == "amlx":
        d = amlx_adapter(tmp_path / "ad")
        save_file({f"{Q_PROJ}.lora_a": bad, f"{Q_PROJ}.lora_b": b}, str(d / "adapters.safetensors"))
        weights = d / "adapters.safetensors"
    else:
        name = f"base_model.model.{Q_PROJ}"
        d = peft_adapter(tmp_path / "ad", {f"{name}.lora_A.weight": bad, f"{name}.lora_B.weight": b})
        weights = d / "adapter_model.safetensors"
    refused(loaded, d, str(weights), Q_PROJ, "lora_a", np.dtype(dtype).name if dtype is not np.bool_ else "bool",
            "floating")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("leaf", ["lora_a", "lora_b"])
def test_adapter_tensors_holding_nan_or_inf_are_refused(loaded, tmp_path, leaf, value):
    """An adapter from a diverged training run loaded, and every logit was NaN."""
    a, b = _ab()
    (a if leaf == "lora_a" else b)[1, 1] = value
    d = amlx_adapter(tmp_path / "ad")
    save_file({f"{Q_PROJ}.lora_a": a, f"{Q_PROJ}.lora_b": b}, str(d / "adapters.safetensors"))
    refused(loaded, d, str(d / "adapters.safetensors"), Q_PROJ, leaf, "NaN or infinite")


def test_peft_lora_a_of_the_wrong_rank_of_dimensions_is_refused(loaded, tmp_path):
    """A 0-d or 1-d lora_A was an IndexError (its shape[0] read as the rank)."""
    name = f"base_model.model.{Q_PROJ}"
    _, b = _ab()
    for a in (np.float32(1.0), np.zeros((3,), np.float32)):
        d = peft_adapter(tmp_path / "ad", {f"{name}.lora_A.weight": np.asarray(a), f"{name}.lora_B.weight": b})
        refused(loaded, d, str(d), Q_PROJ, "do not fit")
        shutil.rmtree(d)


# -- checkpoints ---------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _load_refused(path, *needles) -> str:
    with pytest.raises(ModelLoadError) as info:
        on_worker(lambda: load_model(path, progress=False).model.close())
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def q4(qwen, tmp_path_factory):
    return amlx.convert(qwen, tmp_path_factory.mktemp("q") / "q4", quantize=4, group_size=32, progress=False)


LAYER = "model.layers.0.mlp.up_proj"


@HYPOTHESIS
@given(key=st.sampled_from(["group_size", "bits"]),
       value=st.one_of(st.integers(max_value=0), st.text(max_size=3), st.floats().filter(lambda f: not f.is_integer()),
                       st.just([4]), st.just(True)))
def test_bad_per_layer_quantization_is_refused_when_the_config_is_read(qwen, key, value):
    """A layer's own entry {"group_size": 0} was a ZeroDivisionError in the builder,
    {"bits": "x"} a raw ValueError from int()."""
    from amlx.models.config import normalize_config

    raw = json.loads((qwen / "config.json").read_text())
    raw["quantization"] = {"group_size": 32, "bits": 4, LAYER: {key: value}}
    with pytest.raises(ModelLoadError) as info:
        normalize_config(raw, qwen / "config.json")
    assert str(qwen / "config.json") in str(info.value) and f"quantization.{LAYER}.{key}" in str(info.value)


@pytest.mark.parametrize("where", ["top", "layer"])
def test_quantization_modes_other_than_affine_are_refused(q4, tmp_path, where):
    """mode "nvfp4" / "mxfp4" loaded the weights as affine-quantized ones."""
    p = _copy(q4, tmp_path / "c")
    cfg = json.loads((p / "config.json").read_text())
    for k in ("quantization", "quantization_config"):
        if where == "top":
            cfg[k]["mode"] = "nvfp4"
        else:
            cfg[k][LAYER] = {"mode": "mxfp4"}
    (p / "config.json").write_text(json.dumps(cfg))
    _load_refused(p, str(p / "config.json"), "mode", "fp4")


def test_zero_group_size_of_one_layer_through_load(q4, tmp_path):
    p = _copy(q4, tmp_path / "c")
    cfg = json.loads((p / "config.json").read_text())
    cfg["quantization"][LAYER] = {"group_size": 0}
    (p / "config.json").write_text(json.dumps(cfg))
    _load_refused(p, str(p / "config.json"), f"quantization.{LAYER}.group_size")


def test_scales_and_biases_of_different_dtypes_are_refused_at_load(q4, tmp_path):
    """The load succeeded and the first request failed inside MLX's quantized matmul
    ("scales and biases must both be ... of one dtype")."""
    from safetensors.numpy import load_file

    p = _copy(q4, tmp_path / "c")
    shard = p / "model.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.1.self_attn.o_proj.biases"
    tensors[name] = tensors[name].astype(np.float16)
    save_file(tensors, str(shard), metadata={"format": "mlx"})
    _load_refused(p, str(shard), repr(name), "F16", "F32", "one dtype")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_an_integer_too_long_to_parse_in_json_is_a_load_error(qwen, tmp_path, name):
    """Python's json refuses integers of more than 4300 digits with a plain ValueError,
    which read_json and read_header let through."""
    p = _copy(qwen, tmp_path / "c")
    if name == "config.json":
        (p / name).write_text('{"model_type": "qwen3", "vocab_size": ' + "9" * 5000 + "}")
        needle = "invalid JSON"
    else:
        big = b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
        (p / name).write_bytes(len(big).to_bytes(8, "little") + big + b"\0" * 4)
        needle = "invalid header"
    _load_refused(p, str(p / name), needle)


def test_a_weight_file_that_links_to_itself_is_a_load_error(qwen, tmp_path):
    """A symlink loop at model.safetensors was a RuntimeError from Path.resolve()."""
    p = _copy(qwen, tmp_path / "c")
    (p / "model.safetensors").unlink()
    (p / "model.safetensors").symlink_to("model.safetensors")
    _load_refused(p, "model.safetensors", "resolve")


@HYPOTHESIS
@given(key=st.sampled_from(["rope_theta", "linear_factor", "rms_norm_eps"]),
       value=st.one_of(st.floats(min_value=3.5e38, allow_infinity=False),
                       st.floats(min_value=1e-300, max_value=1e-39)))
def test_config_numbers_outside_float32_are_refused(qwen, key, value):
    """rope_theta 1e39 or 1e-300, a linear rope factor of 1e-300 (scale 1e300) loaded and gave
    NaN logits: MLX computes with them in float32, where they are infinite or zero."""
    from amlx.models.config import normalize_config

    raw = json.loads((qwen / "config.json").read_text())
    if key == "rope_theta":
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": value}
    elif key == "linear_factor":
        raw["rope_parameters"] = {"rope_type": "linear", "factor": value, "rope_theta": 1e6}
    else:
        raw[key] = value
    with pytest.raises(ModelLoadError) as info:
        normalize_config(raw, qwen / "config.json")
    msg = str(info.value)
    assert str(qwen / "config.json") in msg and "float32" in msg
    assert ("factor" if key == "linear_factor" else key) in msg


@pytest.mark.parametrize("changes, cause", [({"hidden_act": "relu"}, "activation 'relu' is not supported"),
                                            ({"attention_bias": True}, "biases on o_proj or the MLP")])
def test_what_an_architecture_refuses_names_the_config_file(qwen, tmp_path, changes, cause):
    """An architecture's own refusals (an activation, biases it has no weights for) said only
    "qwen3: ...", naming no file."""
    bad = _copy(qwen, tmp_path / "bad")
    _edit_config(bad, **changes)
    _load_refused(bad, str(bad / "config.json"), cause)
