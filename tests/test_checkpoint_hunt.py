"""Checkpoint loading and conversion against hostile and unusual inputs, found by a
bug hunt: each broken input below is refused with a ModelLoadError naming the file
and the cause (not a raw TypeError, not a model that loads and then fails its first
request inside MLX, not a shape MLX silently wraps round, not a read that blocks), and
the process goes on loading good checkpoints with MLX memory back where it was.

Tests whose docstring says what used to happen fail without their fix; "(No bug)" ones
pin behaviour the hunt probed and found right. Convert round trips are compared with
transformers on PyTorch CPU and with mlx_lm.convert's files."""

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
    from tests.helpers.decoding import prefill_logits
    from tests.test_train_lora import on_worker
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.decoding import prefill_logits
    from test_train_lora import on_worker

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def q4(qwen, tmp_path_factory):
    return amlx.convert(qwen, tmp_path_factory.mktemp("q") / "q4", quantize=4, group_size=32, progress=False)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("sharded"), "qwen3", max_shard_size="100KB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    return path


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


@pytest.mark.parametrize("name", ["model.norm.weight\0x", "\0"])
def test_a_tensor_name_with_a_nul_character_is_refused_as_such(qwen, tmp_path, name):
    """MLX reads tensor names as C strings: a name with a NUL came back cut short, and the
    load failed with a wrong cause, "the file changed while it was being loaded"."""
    d = _copy(qwen, tmp_path / "c")
    header, body = _header(d / "model.safetensors")
    header[name] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    _write_raw(d / "model.safetensors", header, body)
    _refused(d, str(d / "model.safetensors"), repr(name), "NUL character")


@pytest.mark.parametrize("case", ["listed twice, the last wrong", "shard missing", "a tensor in two shards"])
def test_a_lying_shard_index_is_refused(sharded, tmp_path, case):
    """(No bug: the index's own checks, pinned.) JSON keeps the last of a key listed twice."""
    d = _copy(sharded, tmp_path / "c")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    home = index["weight_map"]["model.norm.weight"]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
    if case == "listed twice, the last wrong":
        text = json.dumps(index)[:-2] + f', "model.norm.weight": "{other}"}}}}'
        (d / "model.safetensors.index.json").write_text(text)
        needles = ["model.safetensors.index.json", "'model.norm.weight'", "does not hold it"]
    elif case == "shard missing":
        (d / other).unlink()
        needles = ["model.safetensors.index.json", "missing", other]
    else:
        shutil.copyfile(d / home, d / other)
        needles = ["appears in more than one shard"]
    with pytest.raises(ModelLoadError) as info:
        read_checkpoint(d)
    for n in needles:
        assert n in str(info.value)


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


# -- convert round trips -----------------------------------------------------------------------
# The source (`sharded`): a Qwen 3 with tied embeddings, in shards (model-0000N-of-0000M.safetensors
# and the index), against transformers on PyTorch CPU.

IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 600]


def _logits(path: Path) -> np.ndarray:
    return prefill_logits(path, IDS)


def _reference(path: Path) -> np.ndarray:
    from tests.helpers.checkpoints import load_reference, reference_logits

    return reference_logits(load_reference(path), IDS)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


# (dtype, bits): the largest error against transformers' float32 logits, relative to the largest
# logit (measured 0, 0.014, 0.002, 0.021, 0.036 on this model)
FLOAT_AND_8_BIT = [(None, None, 1e-4), ("bfloat16", None, 0.05), ("float16", None, 0.01), (None, 8, 0.06),
                   ("bfloat16", 8, 0.08)]


@pytest.mark.parametrize("dtype, bits, bound", FLOAT_AND_8_BIT)
def test_converting_a_sharded_tied_checkpoint_keeps_its_logits(sharded, tmp_path, monkeypatch, dtype, bits, bound):
    from amlx.models import cpu_matmul

    monkeypatch.setattr(cpu_matmul, "INT8", False)  # the float kernels: the bound is the format's alone
    out = amlx.convert(sharded, tmp_path / "out", quantize=bits, dtype=dtype, progress=False)
    header, _ = _header(out / "model.safetensors")
    assert "lm_head.weight" not in header  # tied: the embedding serves as the output layer
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    want = _reference(sharded)
    got = _logits(out)
    assert _rel(got, want) < bound
    if bits is None and dtype is None:
        np.testing.assert_array_equal(got, _logits(sharded))


@pytest.mark.parametrize("group", [32, 64])
def test_a_4_bit_conversion_computes_its_dequantized_weights(sharded, tmp_path, monkeypatch, group):
    """4 bits move this random model's logits too far for a bound to mean much; exact
    instead: transformers on the numpy-dequantized weights of the converted files."""
    from amlx.models import cpu_matmul
    from tests.test_models import write_dequantized

    monkeypatch.setattr(cpu_matmul, "INT8", False)
    out = amlx.convert(sharded, tmp_path / "out", quantize=4, group_size=group, progress=False)
    assert _rel(_logits(out), _reference(write_dequantized(out, tmp_path / "dq"))) < 1e-4


def test_convert_is_the_files_mlx_lm_writes(qwen, tmp_path):
    """Byte for byte the tensors mlx_lm.convert writes from the same source (names, dtypes,
    shapes, packed values), the same index and quantization entry."""
    mlx_lm = pytest.importorskip("mlx_lm")
    ours = amlx.convert(qwen, tmp_path / "amlx", quantize=4, group_size=64, dtype="bfloat16", progress=False)
    theirs = tmp_path / "mlx_lm"
    mlx_lm.convert(str(qwen), str(theirs), quantize=True, q_group_size=64, q_bits=4, dtype="bfloat16")
    (h1, b1), (h2, b2) = _header(ours / "model.safetensors"), _header(theirs / "model.safetensors")
    assert list(h1) == list(h2) and h1["__metadata__"] == h2["__metadata__"] == {"format": "mlx"}

    def tensor(header, body, name):  # (the data's order in the file is free: the offsets differ)
        start, end = header[name]["data_offsets"]
        return header[name]["dtype"], header[name]["shape"], body[start:end]
    for name in (n for n in h1 if n != "__metadata__"):
        assert tensor(h1, b1, name) == tensor(h2, b2, name), name
    i1, i2 = (json.loads((p / "model.safetensors.index.json").read_text()) for p in (ours, theirs))
    assert i1 == i2
    c1, c2 = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    for key in ("quantization", "quantization_config"):  # (mlx-lm of this version adds "mode": "affine")
        assert c1[key] == {k: v for k, v in c2[key].items() if k != "mode"} == {"group_size": 64, "bits": 4}


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_convert_into_its_source_or_a_full_directory_changes_nothing(qwen, tmp_path):
    src = _copy(qwen, tmp_path / "src")
    before = _snapshot(src)
    for dst in (src, src / ".", tmp_path / "link"):
        if dst.name == "link":
            dst.symlink_to(src)
        with pytest.raises(ValueError, match="outside the source"):
            amlx.convert(src, dst, quantize=4, progress=False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        amlx.convert(src, full, quantize=8, progress=False)
    assert _snapshot(src) == before and _snapshot(full) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "link", "src"]  # no staging directory left


# -- tokenizer.json ------------------------------------------------------------------------------


def test_tokenizer_json_over_its_size_limit_is_refused_before_it_is_read(qwen, tmp_path, monkeypatch):
    """Tokenizer.from_dir handed tokenizer.json to the tokenizers library's from_file, which
    read any size in full (a sparse file of 100 GB: 100 GB of memory). amlx.load checks the
    side files first, but a draft model's tokenizer (load(..., draft=)) and the speculative
    helpers read it with from_dir alone. The limit is lowered here so a valid file is over it."""
    import amlx.tokenizer as tok

    d = _copy(qwen, tmp_path / "c")
    size = (d / "tokenizer.json").stat().st_size
    monkeypatch.setattr(tok, "TOKENIZER_JSON_LIMIT", size - 1)
    with pytest.raises(ModelLoadError, match=f"{size} bytes, more than the {size - 1}") as info:
        tok.Tokenizer.from_dir(d)
    assert str(d / "tokenizer.json") in str(info.value)


def _json_paths(obj, prefix=()):
    """Paths into a JSON document: its keys (the first 20 of each object) and list items (the first 3)."""
    yield prefix
    items = list(obj.items())[:20] if isinstance(obj, dict) else list(enumerate(obj[:3])) if isinstance(obj, list) \
        else []
    for key, value in items:
        yield from _json_paths(value, (*prefix, key))


@HYPOTHESIS
@given(data=st.data(), file=st.sampled_from(["tokenizer.json", "tokenizer_config.json"]))
def test_mutated_tokenizer_files_load_or_are_refused(qwen, tmp_path_factory, data, file):
    """Any value at any place of tokenizer.json or tokenizer_config.json: a tokenizer that
    encodes, decodes and renders (or raises ChatTemplateError), or a ModelLoadError."""
    from amlx.errors import ChatTemplateError
    from amlx.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    shutil.copytree(qwen, d, dirs_exist_ok=True)
    doc = json.loads((d / file).read_text())
    paths = [p for p in _json_paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(paths), label="path")
        node = doc
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = data.draw(JSON_VALUES, label=str(path))
        except (KeyError, IndexError, TypeError):  # an earlier edit replaced a parent
            pass
    (d / file).write_text(json.dumps(doc))
    try:
        tok = Tokenizer.from_dir(d)
    except ModelLoadError as e:
        assert str(d) in str(e)
        return
    tok.decode(tok.encode("hello <|im_start|> world"))
    try:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    except ChatTemplateError:
        pass


def test_a_panic_inside_the_tokenizer_is_a_value_error(qwen, tmp_path):
    """A pre-tokenizer regex that backtracks ("(a+)+$") on some text made the Rust library
    panic (Onig's retry limit): a pyo3 PanicException, a BaseException that no handler
    caught; the server answered a bare 500 with a traceback in its log."""
    from amlx.tokenizer import Tokenizer

    d = _copy(qwen, tmp_path / "c")
    doc = json.loads((d / "tokenizer.json").read_text())
    doc["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    (d / "tokenizer.json").write_text(json.dumps(doc))
    tok = Tokenizer.from_dir(d)
    with pytest.raises(ValueError, match="the checkpoint's tokenizer failed on this text: .*retry-limit"):
        tok.encode("a" * 3000 + "b")
    assert tok.encode("hello")  # other texts still encode


def test_a_panic_inside_the_tokenizers_decoder_is_a_value_error(qwen, tmp_path):
    """The same panic from a decoder's regex (a Replace decoder) on decoded text."""
    from amlx.tokenizer import Tokenizer

    d = _copy(qwen, tmp_path / "c")
    doc = json.loads((d / "tokenizer.json").read_text())
    doc["decoder"] = {"type": "Sequence", "decoders": [
        doc["decoder"], {"type": "Replace", "pattern": {"Regex": "(a+)+$"}, "content": ""}]}
    (d / "tokenizer.json").write_text(json.dumps(doc))
    tok = Tokenizer.from_dir(d)
    ids = tok.encode("a" * 3000 + "b", add_special_tokens=False)
    with pytest.raises(ValueError, match="the checkpoint's tokenizer failed on these ids: .*retry-limit"):
        tok.decode(ids)
    assert tok.decode(tok.encode("hello", add_special_tokens=False)) == "hello"


def test_a_tokenizer_json_that_is_a_fifo_is_refused_as_one(qwen, tmp_path):
    """It was reported as "file not found"; a FIFO is refused as not a regular file (no open
    of it ever waits for a writer)."""
    import os

    d = _copy(qwen, tmp_path / "c")
    (d / "tokenizer.json").unlink()
    os.mkfifo(d / "tokenizer.json")
    from amlx.tokenizer import Tokenizer

    with pytest.raises(ModelLoadError, match="not a regular file") as info:
        Tokenizer.from_dir(d)
    assert str(d / "tokenizer.json") in str(info.value)


# -- config.json -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1}},
                                  {"rope_parameters": None, "rope_theta": 1,
                                   "rope_scaling": {"type": "yarn", "factor": 4.0}}])
def test_yarn_with_a_rope_theta_of_1_is_a_config_error(qwen, tmp_path, rope):
    """YaRN's correction dimensions divide by log(rope_theta): rope_theta 1 was a raw
    ZeroDivisionError from amlx.models.rope while the model was being built."""
    d = _copy(qwen, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(rope)
    (d / "config.json").write_text(json.dumps(cfg))
    _refused(d, str(d / "config.json"), "YaRN scaling needs a rope_theta other than 1")


@pytest.mark.parametrize("file, ids", [("config.json", 709), ("config.json", [702, 10 ** 9]),
                                       ("generation_config.json", [702, 5000])])
def test_an_eos_id_beyond_the_vocabulary_is_a_config_error(qwen, tmp_path, file, ids):
    """An eos_token_id the model can never produce (the vocabulary has 709 tokens) loaded,
    and every constrained request then failed ("llguidance cannot use this tokenizer.json
    ...: EOS token ID 5000 is out of range")."""
    d = _copy(qwen, tmp_path / "c")
    cfg = json.loads((d / file).read_text())
    cfg["eos_token_id"] = ids
    (d / file).write_text(json.dumps(cfg))
    _refused(d, str(d / file), "eos_token_id", "beyond the vocabulary of 709 tokens")


# -- the Hugging Face cache ------------------------------------------------------------------------


def _resolve_refused(cache: Path) -> str:
    from amlx.hub import resolve_model

    with pytest.raises(ModelLoadError) as info:
        resolve_model("acme/tiny", cache_dir=cache, download=False)
    return str(info.value)


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_a_corrupt_cached_ref_is_a_load_error(tmp_path, kind):
    """refs/main as a directory, or bytes that are not UTF-8: a raw IsADirectoryError or
    UnicodeDecodeError from huggingface_hub's lookup."""
    ref = tmp_path / "hub" / "models--acme--tiny" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    if kind == "directory":
        ref.mkdir()
    else:
        ref.write_bytes(b"\xff\xfe\x00")
    msg = _resolve_refused(tmp_path / "hub")
    assert str(ref) in msg and ("not a regular file" if kind == "directory" else "not UTF-8") in msg


def test_a_fifo_as_the_cached_ref_does_not_block(tmp_path):
    """huggingface_hub reads refs/main with a plain open(): a FIFO there blocked amlx.load
    ("org/name") forever. (A watchdog writes to the FIFO should the lookup block, so a
    regression fails instead of hanging the suite.)"""
    import os
    import threading

    ref = tmp_path / "hub" / "models--acme--tiny" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    os.mkfifo(ref)
    result: dict = {}

    def lookup():
        try:
            result["msg"] = _resolve_refused(tmp_path / "hub")
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        with open(ref, "w") as f:  # the blocked reader takes this and goes on
            f.write("0" * 40)
        thread.join()
        pytest.fail("the lookup blocked reading a FIFO at refs/main")
    assert "error" not in result, result.get("error")
    assert str(ref) in result["msg"] and "not a regular file" in result["msg"]


# -- broad fuzz, and the process afterwards ------------------------------------------------------------

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "hidden_act",
               "rope_theta", "rope_scaling", "rope_parameters", "layer_types", "sliding_window", "use_sliding_window",
               "max_window_layers", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
               "quantization", "quantization_config", "attention_bias", "model_type", "text_config",
               "query_pre_attn_scalar", "final_logit_softcapping", "sliding_window_pattern", "rope_local_base_freq"]


@HYPOTHESIS
@given(model_type=st.sampled_from(["qwen3", "qwen2", "llama", "mistral", "gemma3_text"]),
       edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=3))
def test_any_json_values_in_config_json_are_a_config_error_or_a_config(qwen, model_type, edits):
    from amlx.models.config import parse_config

    raw = {**json.loads((qwen / "config.json").read_text()), "model_type": model_type, **edits}
    try:
        parse_config(raw, qwen / "config.json")
    except ModelLoadError as e:
        assert str(qwen / "config.json") in str(e)


DTYPES = ["F32", "F16", "BF16", "I32", "U32", "U8", "BOOL", "F8_E4M3", "I64", "C64", "F64", "X"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), cut=st.one_of(st.none(), st.integers(0, 1000)))
def test_mutated_headers_load_or_are_refused_and_leave_no_memory(qwen, tmp_path_factory, data, cut):
    """Up to three header entries rewritten (dtype, shape, offsets, also to values that fit
    their bytes) and the data maybe truncated, through the whole load (host checks, MLX's
    reader, the builder, every weight read): a model or a ModelLoadError naming the
    checkpoint, and MLX memory where it was."""
    d = tmp_path_factory.mktemp("mut")
    shutil.copytree(qwen, d, dirs_exist_ok=True)
    header, body = _header(d / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        name = data.draw(st.sampled_from(names), label="tensor")
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
        start, end = header[name]["data_offsets"]
        header[name][field] = data.draw({
            "dtype": st.sampled_from(DTYPES),
            "shape": st.one_of(st.lists(st.integers(0, 1 << 33), max_size=3), st.just([(end - start) // 4])),
            "data_offsets": st.lists(st.integers(0, len(body) + 8), min_size=2, max_size=2).map(sorted),
        }[field], label=f"{name}.{field}")
    _write_raw(d / "model.safetensors", header, body if cut is None else body[:-cut])
    base = amlx.memory()["active"]
    try:
        _load(d).model.close()
    except ModelLoadError as e:
        assert str(d) in str(e)
    assert amlx.memory()["active"] == base


def _hostile(qwen: Path, q4: Path, root: Path) -> list[Path]:
    """Checkpoints each broken in one way this file covers."""
    out = []

    def broken(name: str, src: Path = qwen) -> Path:
        out.append(_copy(src, root / name))
        return out[-1]

    d = broken("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    d = broken("dtype-list")
    header, body = _header(d / "model.safetensors")
    header["model.norm.weight"]["dtype"] = ["F32"]
    _write_raw(d / "model.safetensors", header, body)
    _requantized(q4, root / "bits7", 7, 32)
    out.append(root / "bits7")
    for name, file, text in [("config", "config.json", '{"model_type": "qwen3", "vocab_size": -1}'),
                             ("tokenizer", "tokenizer.json", '{"model": 5}'),
                             ("template", "tokenizer_config.json", '{"chat_template": 5}')]:
        (broken(name) / file).write_text(text)
    d = broken("index")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    return out


def test_hostile_loads_leave_the_process_usable(qwen, q4, tmp_path):
    """After every refused load, MLX active memory is back where it was, and a good
    checkpoint loads and answers exactly as before."""
    with amlx.load_sync(qwen, max_batch_size=2) as model:
        want = model.complete_sync([1, 2, 3, 4], max_tokens=6).token_ids
    base = amlx.memory()["active"]
    for d in _hostile(qwen, q4, tmp_path):
        with pytest.raises(ModelLoadError) as info:
            amlx.load_sync(d, max_batch_size=2).close()
        assert str(d) in str(info.value)
        assert amlx.memory()["active"] == base, d.name
    with amlx.load_sync(qwen, max_batch_size=2) as model:
        assert model.complete_sync([1, 2, 3, 4], max_tokens=6).token_ids == want
    assert amlx.memory()["active"] == base


# -- files a written checkpoint carries ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["notes.txt", "additional_chat_templates/tool_use.jinja"])
def test_convert_does_not_carry_a_link_out_of_the_checkpoint(qwen, tmp_path, where):
    """A downloaded checkpoint's "notes.txt" -> ~/.ssh/id_rsa was copied, content and all,
    into the converted checkpoint (ready to be uploaded with it)."""
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    src = _copy(qwen, tmp_path / "src")
    (src / where).parent.mkdir(exist_ok=True)
    (src / where).symlink_to(secret)
    with pytest.raises(ModelLoadError, match="links outside the checkpoint directory") as info:
        amlx.convert(src, tmp_path / "out", quantize=8, progress=False)
    assert str(src / where) in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_convert_carries_links_inside_the_checkpoint_and_into_the_hub_blob_store(qwen, tmp_path):
    """What stays allowed: the Hugging Face cache's snapshots/<rev>/f -> ../../blobs/<hash>,
    and links between files of the checkpoint itself."""
    repo = tmp_path / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(qwen.iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    (snapshot / "chat_template.jinja").symlink_to("tokenizer_config.json")  # (inside: any file will do)
    out = amlx.convert(snapshot, tmp_path / "out", quantize=8, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (snapshot / name).read_bytes() and not (out / name).is_symlink()


def test_convert_below_a_file_is_a_value_error(qwen, tmp_path):
    """A destination below a file was a raw FileExistsError, after the source had been read."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        amlx.convert(qwen, tmp_path / "file" / "out", quantize=4, progress=False)
    assert (tmp_path / "file").read_text() == "x"


def test_convert_into_a_link_to_an_empty_directory_writes_where_it_leads(qwen, tmp_path):
    """check_destination follows the link and finds an empty directory; staged_directory
    then called rmdir on the link itself: a raw NotADirectoryError once everything was written."""
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    out = amlx.convert(qwen, tmp_path / "link", quantize=8, progress=False)
    assert (tmp_path / "link").is_symlink() and out == tmp_path / "link"
    assert {p.name for p in (tmp_path / "target").iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


# -- chat templates a checkpoint brings ----------------------------------------------------------------

LEAKY = ["{{ '{0.__class__.__init__.__globals__}'.format(messages) }}", "{{ '{a.__class__}'.format_map({'a': 1}) }}",
         "{{ messages|attr('__class__') }}", "{{ messages|map(attribute='__class__')|list }}",
         "{{ messages|groupby('__class__')|list }}", "{{ messages|sort(attribute='__class__.__name__')|list }}",
         "{{ messages|join(attribute='__class__') }}", "{{ self._TemplateReference__context }}",
         "{{ lipsum.__globals__ }}", "{{ range.__self__ }}", "{% include '/etc/passwd' %}",
         "{% import 'os' as os %}{{ os }}", "{{ strftime_now.__globals__ }}"]


@pytest.mark.parametrize("template", LEAKY)
def test_a_checkpoints_template_reaches_no_python_internals(qwen, tmp_path, template):
    """(No bug.) chat_template.jinja reaching for Python objects through format fields,
    filters' attribute arguments, template internals or loaders: the reply is refused as
    a ChatTemplateError, or the name renders as nothing; the model keeps serving."""
    from amlx.errors import ChatTemplateError

    d = _copy(qwen, tmp_path / "c")
    (d / "chat_template.jinja").write_text(template + "{{ messages[0]['content'] }}")
    with amlx.load_sync(d, max_batch_size=2) as model:
        try:
            text = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        except ChatTemplateError:
            pass
        else:
            assert not any(s in text for s in ("class", "function", "module", "root:", "Context", "range"))
        assert model.complete_sync([1, 2, 3], max_tokens=2).usage.completion_tokens == 2



# -- weights of several floating-point types -----------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_bf16(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3-bf16"), "qwen3", dtype="bfloat16")


def _retyped(src: Path, dst: Path, pick, dtype: str) -> Path:
    from amlx import _mlx as mx
    from amlx._mlx import io

    d = _copy(src, dst)

    def run():
        arrays, _ = io.load_safetensors(d / "model.safetensors")
        out = {k: (a.astype(getattr(mx, dtype)) if pick(k) else a) for k, a in arrays.items()}
        io.save_safetensors(d / "model.safetensors", out, {"format": "pt"})
        for a in {*arrays.values(), *out.values()}:
            a.close()
    on_worker(run)
    return d


@pytest.mark.parametrize("what, pick", [("norms", lambda k: "norm" in k), ("one projection",
                                                                          lambda k: k.endswith("0.mlp.up_proj.weight"))])
def test_a_bfloat16_model_with_some_float32_weights_serves_as_bfloat16(qwen_bf16, tmp_path, what, pick):
    """Mixed float types (a bfloat16 checkpoint keeping its norms in float32) loaded as
    they were, and every request failed in the CPU residual-norm kernel ("x and y must be
    (N, C) floats of one dtype"). They are cast to the config's dtype, as transformers
    loads them: the same logits as the checkpoint stored in bfloat16 alone."""
    d = _retyped(qwen_bf16, tmp_path / "mixed", pick, "float32")
    with amlx.load_sync(qwen_bf16, max_batch_size=2) as model:
        want = model.complete_sync([1, 2, 3, 4], max_tokens=5).token_ids
    with amlx.load_sync(d, max_batch_size=2) as model:
        assert model.info.dtype == "bfloat16"
        assert model.complete_sync([1, 2, 3, 4], max_tokens=5).token_ids == want
    np.testing.assert_array_equal(_logits(d), _logits(qwen_bf16))


def test_scales_of_another_float_type_than_the_model_serve(q4, tmp_path):
    """A float32 quantized model whose embedding's scales and biases are float16: every
    request failed the same way."""
    d = _retyped(q4, tmp_path / "mixed", lambda k: k.startswith("model.embed_tokens.") and not k.endswith("weight"),
                 "float16")
    with amlx.load_sync(d, max_batch_size=2) as model:
        assert len(model.complete_sync([1, 2, 3, 4], max_tokens=5).token_ids) == 5
        assert model.info.dtype == "float32"
