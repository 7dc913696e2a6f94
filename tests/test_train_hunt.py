"""Bug hunt in fine-tuning and its round trips with loading and serving.

Resume (dropout, QLoRA, a stopped run saved with run.save()) equals an
uninterrupted run, and a resume from no adapter or a mismatched optimizer state
is refused naming the directory, before the model's adapter changes; a failed
adapter load leaves the model's adapter as it was; hostile adapter files are
refused with the file and the cause (hypothesis); adapters in mlx-lm's and
PEFT's on-disk layouts (mlx-lm's multimodal Gemma 3 names too) give the trained
model's logits; any adapter's settings round-trip; a padded batch's loss and
gradients equal the token-weighted mean of its examples'; three LoRA steps equal
PEFT + torch AdamW; chat records learn each assistant turn through its end
marker and nothing of the next turn (hypothesis), an EOS the tokenizer appends
is learned, data errors name the first bad line; fused checkpoints equal the
unfused forward (amlx and transformers); training between requests leaves no
stale prefix cache, full fine-tuning under requests saves what it serves, in the
dtype its config names; memory comes back after close.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import amlx
from amlx._mlx import array
from amlx.engine.worker import Worker
from amlx.errors import ModelLoadError
from amlx.models import load_model
from amlx.train import lora

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import load_reference, make_checkpoint, reference_logits

DATA = [{"prompt": "The secret word is", "completion": " banana split"},
        {"prompt": "Say hi:", "completion": " hi there"},
        {"text": "one two three four"}]
IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]


def on_worker(fn):
    return Worker.get().run_sync(fn)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def _adapter(lm) -> dict[str, np.ndarray]:
    return on_worker(lambda: {f"{p}.{k}": getattr(m, k).numpy() for p, m in lora.lora_modules(lm).items()
                              for k in ("lora_a", "lora_b")})


def _logits(lm, ids=IDS) -> np.ndarray:
    return on_worker(lambda: lm(array(np.asarray([ids], np.int32))).numpy()[0])


# -- resume -------------------------------------------------------------------------

async def _train(path, adapter_path, iters, **opts):
    async with await amlx.load(path) as model:
        [ev async for ev in model.train_lora(DATA, iters=iters, adapter_path=adapter_path, **opts)]
        return _adapter(model.engine.model)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
async def test_resume_with_dropout_matches_an_uninterrupted_run(qwen, tmp_path, dropout):
    """The dropout masks of a resumed run's steps are those the uninterrupted run drew
    at those steps (the key follows the step, as the batches do)."""
    opts = dict(batch_size=2, learning_rate=1e-2, seed=4, dropout=dropout, rank=4, save_every=2)
    full = await _train(qwen, tmp_path / "a", 5, **opts)
    await _train(qwen, tmp_path / "b", 2, **opts)
    resumed = await _train(qwen, tmp_path / "b", 5, resume=True, **opts)
    assert set(resumed) == set(full)
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], rtol=1e-5, atol=1e-7, err_msg=k)


# -- hostile adapters -----------------------------------------------------------------

def _write_amlx_adapter(qwen, d, targets=("q_proj", "v_proj"), rank=4, seed=0):
    """A random amlx-format adapter for the qwen checkpoint; returns the model's logits with it."""
    loaded = on_worker(lambda: load_model(qwen, progress=False))
    rng = np.random.default_rng(seed)

    def go():
        lora.apply_lora(loaded.model, rank=rank, targets=list(targets), seed=seed)
        for m in lora.lora_modules(loaded.model).values():
            m.lora_b = array((rng.standard_normal(m.lora_b.shape) * 0.3).astype(np.float32))
        lora.save_adapter(loaded.model, d)

    on_worker(go)
    want = _logits(loaded.model)
    on_worker(loaded.model.close)
    return want


def _edit_tensors(src, dst, edit):
    """Copies the adapter directory src to dst with its tensors passed through edit(dict) -> dict."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    save_file(edit(load_file(str(src / "adapters.safetensors"))), str(dst / "adapters.safetensors"),
              metadata={"format": "mlx"})


async def test_a_failed_resume_leaves_the_models_adapter_as_it_was(qwen, tmp_path):
    """load_adapter replaced layers one by one after dropping the old adapter: an adapter
    whose later layer was malformed left the model with the earlier layers of the bad
    file and none of its own adapter."""
    want = _write_amlx_adapter(qwen, tmp_path / "good", seed=1)
    _write_amlx_adapter(qwen, tmp_path / "other", seed=2)
    last = "model.layers.1.self_attn.v_proj.lora_b"
    _edit_tensors(tmp_path / "other", tmp_path / "bad", lambda t: {**t, last: t[last][:, :3].copy()})
    async with await amlx.load(qwen, adapter=tmp_path / "good") as model:
        lm = model.engine.model
        before = _adapter(lm)
        np.testing.assert_array_equal(_logits(lm), want)
        with pytest.raises(ModelLoadError, match=r"bad.*model\.layers\.1\.self_attn\.v_proj"):
            [ev async for ev in model.train_lora(DATA, iters=2, batch_size=1, adapter_path=tmp_path / "bad",
                                                 resume=True)]
        after = _adapter(lm)
        assert set(after) == set(before)
        for k in before:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        np.testing.assert_array_equal(_logits(lm), want)
        out = await model.complete(IDS, max_tokens=2)
        assert out.token_ids[0] == int(np.argmax(want[-1]))


_LAYERS = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]
_NAMES = [f"{p}.lora_{x}" for p in _LAYERS for x in "ab"]
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                  st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3), st.just({"x": 1}))


@st.composite
def _mutations(draw):
    """(what, how): one hostile change to a good amlx adapter directory."""
    kind = draw(st.sampled_from(["drop", "shape", "dtype", "extra", "nonfinite", "rename", "scale", "unlist",
                                 "config_key", "config_text", "truncate", "flip"]))
    if kind in ("drop", "shape", "dtype", "nonfinite", "rename"):
        arg = (draw(st.sampled_from(_NAMES)),)
        if kind == "shape":
            arg += (tuple(draw(st.lists(st.integers(0, 70), max_size=3))),)
        elif kind == "dtype":
            arg += (draw(st.sampled_from(["int32", "int8", "bool", "float16", "float64", "uint8"])),)
        elif kind == "nonfinite":
            arg += (draw(st.sampled_from([np.nan, np.inf, -np.inf])),)
        elif kind == "rename":
            arg += (draw(st.sampled_from(["model.layers.7.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
                                          "model.embed_tokens", "model.layers.0.input_layernorm", "lm_head", ""])),)
    elif kind == "extra":
        arg = (draw(st.text("abc.lora_", min_size=1, max_size=12)),)
    elif kind in ("scale", "unlist"):
        arg = (draw(st.sampled_from(_LAYERS)), draw(_JUNK))
    elif kind == "config_key":
        arg = (draw(st.sampled_from(["rank", "alpha", "dropout", "targets", "layers", "num_layers", "use_rslora",
                                     "modules", "version", "format"])), draw(_JUNK))
    elif kind == "config_text":
        arg = (draw(st.sampled_from(["", "[]", "null", "{", "\xff", '{"format": "amlx-lora"}', "1e999"])),)
    else:
        arg = (draw(st.integers(0, 10_000)), draw(st.integers(1, 255)))
    return kind, arg


def _mutate(src, dst, kind, arg):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    meta = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapters.safetensors"))
    raw_config = None
    if kind == "drop":
        del tensors[arg[0]]
    elif kind == "shape":
        tensors[arg[0]] = np.ones(arg[1], np.float32)
    elif kind == "dtype":
        tensors[arg[0]] = tensors[arg[0]].astype(arg[1])
    elif kind == "nonfinite":
        tensors[arg[0]].flat[3] = arg[1]
    elif kind == "rename":
        layer, leaf = arg[0].rsplit(".", 1)
        tensors[f"{arg[1]}.{leaf}" if arg[1] else leaf] = tensors.pop(arg[0])
    elif kind == "extra":
        tensors[arg[0]] = np.zeros((2, 2), np.float32)
    elif kind == "scale":
        meta["modules"][arg[0]]["scale"] = arg[1]
    elif kind == "unlist":
        meta["modules"][arg[0]] = arg[1]
    elif kind == "config_key":
        meta[arg[0]] = arg[1]
    elif kind == "config_text":
        raw_config = arg[0]
    save_file(tensors, str(dst / "adapters.safetensors"), metadata={"format": "mlx"})
    text = json.dumps(meta) if raw_config is None else raw_config
    (dst / "adapter_config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    if kind in ("truncate", "flip"):
        f = dst / "adapters.safetensors"
        data = bytearray(f.read_bytes())
        pos = arg[0] % len(data)
        if kind == "truncate":
            data = data[:pos]
        else:
            data[pos] ^= arg[1]
        f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def adapted(qwen, tmp_path_factory):
    """A loaded qwen model carrying a good adapter, and that adapter's directory."""
    good = tmp_path_factory.mktemp("good")
    _write_amlx_adapter(qwen, good, seed=3)
    loaded = on_worker(lambda: load_model(qwen, progress=False))
    on_worker(lambda: lora.load_adapter(loaded.model, good, loaded.config))
    yield loaded, good
    on_worker(loaded.model.close)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_hostile_adapter_files_are_refused_naming_the_file_and_keep_the_adapter(adapted, tmp_path_factory,
                                                                                mutation):
    loaded, good = adapted
    kind, arg = mutation
    before = _adapter(loaded.model)
    d = tmp_path_factory.mktemp("hostile")
    _mutate(good, d / "ad", kind, arg)
    try:
        on_worker(lambda: lora.load_adapter(loaded.model, d / "ad", loaded.config))
    except ModelLoadError as exc:
        assert str(d / "ad") in str(exc), str(exc)
        after = _adapter(loaded.model)
        assert set(after) == set(before)
        for k in before:
            np.testing.assert_array_equal(after[k], before[k])
    else:
        # a change that leaves a usable adapter (e.g. float16 matrices, a finite scale): it
        # loaded whole and gives finite logits; then the good adapter goes back on
        assert np.isfinite(_logits(loaded.model)).all()
        on_worker(lambda: lora.load_adapter(loaded.model, good, loaded.config))


# -- memory ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("how", ["finished", "stopped"])
async def test_a_run_kept_after_close_holds_no_memory(qwen, how, kind):
    """A finished or stopped run kept its AdamW moments for as long as the caller held the
    run, also after the model was closed: a full run two float32 copies of every weight, a
    LoRA run (whose moments serve a save after a stop, until the close) those of its adapter."""
    import gc

    gc.collect()
    base = amlx.memory()["active"]
    model = await amlx.load(qwen)
    train = model.train if kind == "full" else model.train_lora
    run = train(DATA, iters=3 if how == "finished" else 50, batch_size=2, learning_rate=1e-3)
    async for ev in run:
        if how == "stopped" and ev.step == 2:
            await run.aclose()
    await model.engine.run(lambda: None)  # the stop's teardown, queued behind the step in flight
    await model.aclose()
    del model
    gc.collect()
    assert amlx.memory()["active"] <= base + 64  # (the run's 8-byte random key may stay)
    assert run.step >= 2


async def test_a_dropped_run_is_not_kept_alive_by_its_model(qwen):
    """The model calls back into a run at its close; the registration must not keep a run
    the caller dropped (and its moments) alive for the model's lifetime."""
    import gc
    import weakref

    async with await amlx.load(qwen) as model:
        run = model.train_lora(DATA, iters=2, batch_size=2, learning_rate=1e-3)
        async for _ in run:
            pass
        ref = weakref.ref(run)
        del run
        gc.collect()
        assert ref() is None


# -- batches and masks ----------------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen3", "gemma3_text"])
def lora_qwen(request, qwen, tmp_path_factory):
    """A loaded qwen (or Gemma 3, sliding-window layers of 8) with a LoRA adapter of nonzero B
    on attention and MLP layers."""
    path = qwen if request.param == "qwen3" else make_checkpoint(tmp_path_factory.mktemp("g3"), "gemma3_text")
    loaded = on_worker(lambda: load_model(path, progress=False))
    rng = np.random.default_rng(5)

    def go():
        lora.apply_lora(loaded.model, rank=4, targets=["q_proj", "v_proj", "down_proj"])
        for m in lora.lora_modules(loaded.model).values():
            m.lora_b = array((rng.standard_normal(m.lora_b.shape) * 0.2).astype(np.float32))

    on_worker(go)
    yield loaded
    on_worker(loaded.model.close)


_EXAMPLE = st.integers(2, 21).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 255), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda m: any(m[1:]))))


@settings(max_examples=25, deadline=None)
@given(examples=st.lists(_EXAMPLE, min_size=1, max_size=4), pad=st.sampled_from([0, 1, 255]),
       multiple=st.sampled_from([1, 8]))
def test_a_padded_batch_is_the_token_weighted_mean_of_its_examples(lora_qwen, examples, pad, multiple):
    """Loss and LoRA gradients of one padded batch equal those of its examples run alone,
    weighted by their learned tokens: padding and unlearned (prompt) tokens add nothing."""
    from amlx.train.data import Example, make_batch
    from amlx.train.grad import trainable_parameters, value_and_grad

    model = lora_qwen.model
    exs = [Example(list(t), list(m)) for t, m in examples]

    def run(batch):
        params = trainable_parameters(model)
        (loss, count), grads = value_and_grad(model)(params, array(batch.inputs), array(batch.targets),
                                                    array(batch.mask))
        return float(loss.item()), float(count.item()), {k: g.numpy() for k, g in grads.items()}

    loss, count, grads = on_worker(lambda: run(make_batch(exs, pad_id=pad, pad_multiple=multiple)))
    alone = [on_worker(lambda e=e: run(make_batch([e], pad_multiple=1))) for e in exs]
    counts = [c for _, c, _ in alone]
    assert count == sum(counts) == sum(e.trained for e in exs)
    assert loss == pytest.approx(sum(l * c for l, c, _ in alone) / count, rel=1e-5)
    wants = {k: sum(gi[k] * c for _, c, gi in alone) / count for k in grads}
    # (float32 noise scales with the largest gradient, up to some 1e-6 of it; a gradient that is
    # zero in exact arithmetic, q's where every key is the same token, comes out as that noise)
    floor = 1e-5 * max(np.abs(w).max() for w in wants.values())
    for k, g in grads.items():
        np.testing.assert_allclose(g, wants[k], rtol=1e-4, atol=floor, err_msg=k)


# -- training while serving -----------------------------------------------------------

LONG = list(range(3, 3 + 70))  # several KV blocks


async def test_training_between_requests_drops_the_prefix_cache(qwen, tmp_path):
    """A prompt cached under the weights before a training step (also one whose stream
    was still decoding while the steps ran) is not reused after them: its reply equals
    an uncached run of the trained adapter."""
    import asyncio

    async with await amlx.load(qwen) as model:
        first = await model.complete(LONG, max_tokens=2)
        again = await model.complete(LONG, max_tokens=2)
        assert again.usage.cached_tokens > 0 and again.token_ids == first.token_ids

        steps = 0
        no_eos = {t: -100.0 for t in model.tokenizer.eos_token_ids}

        async def slow_reader():
            seen = []  # the training steps done when each token came
            async for tok in model.generate(LONG + [9], max_tokens=40, logit_bias=no_eos):
                seen.append(steps)
                await asyncio.sleep(0.01)
            return seen

        reader = asyncio.create_task(slow_reader())
        async for ev in model.train_lora(DATA, iters=4, batch_size=2, learning_rate=3e-2,
                                         adapter_path=tmp_path / "ad"):
            steps += ev.kind == "step"
        seen = await reader
        assert len(seen) == 40
        after = [await model.complete(p, max_tokens=6, logprobs=True) for p in (LONG, LONG + [9])]
    async with await amlx.load(qwen, adapter=tmp_path / "ad", prefix_cache=False) as fresh:
        for p, got in zip((LONG, LONG + [9]), after):
            want = await fresh.complete(p, max_tokens=6, logprobs=True)
            assert got.usage.cached_tokens == 0 or got.token_ids == want.token_ids
            assert got.token_ids == want.token_ids
            np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-4, atol=1e-4)


# -- adapters in mlx-lm's and PEFT's on-disk layouts ------------------------------------

def _as_mlx_lm(src, dst, prefix=""):
    """The amlx adapter at src rewritten as mlx-lm writes adapters: lora_a (in, r), lora_b
    (r, out) under the model's own parameter names (`prefix` + ...), one `scale`."""
    from safetensors.numpy import load_file, save_file

    meta = json.loads((src / "adapter_config.json").read_text())
    scales = {m["scale"] for m in meta["modules"].values()}
    assert len(scales) == 1
    dst.mkdir()
    tensors = {prefix + k: np.ascontiguousarray(v.T) for k, v in load_file(str(src / "adapters.safetensors")).items()}
    save_file(tensors, str(dst / "adapters.safetensors"), metadata={"format": "mlx"})
    (dst / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": -1, "model": "m",
        "lora_parameters": {"rank": meta["rank"], "scale": scales.pop(), "dropout": 0.0}}))


def _as_peft(src, dst):
    """The amlx adapter at src rewritten as PEFT's save_pretrained writes it."""
    from safetensors.numpy import load_file, save_file

    meta = json.loads((src / "adapter_config.json").read_text())
    dst.mkdir()
    tensors = {}
    for k, v in load_file(str(src / "adapters.safetensors")).items():
        path, leaf = k.rsplit(".", 1)
        tensors[f"base_model.model.{path}.lora_{leaf[-1].upper()}.weight"] = v
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": meta["rank"], "lora_alpha": meta["alpha"], "lora_dropout": 0.0,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in meta["modules"]}), "bias": "none",
        "task_type": "CAUSAL_LM", "use_rslora": False, "fan_in_fan_out": False}))


async def test_a_trained_adapter_in_mlx_lm_and_peft_layouts_gives_the_trained_logits(qwen, tmp_path):
    async with await amlx.load(qwen) as model:
        [ev async for ev in model.train_lora(DATA, iters=5, batch_size=2, learning_rate=2e-2, rank=4, alpha=12,
                                             targets=["q_proj", "o_proj", "up_proj"], adapter_path=tmp_path / "ad")]
        want = _logits(model.engine.model)
        want_ids = (await model.complete(IDS, max_tokens=5)).token_ids
    _as_mlx_lm(tmp_path / "ad", tmp_path / "mlxlm")
    _as_peft(tmp_path / "ad", tmp_path / "peft")
    for d in ("ad", "mlxlm", "peft"):
        async with await amlx.load(qwen, adapter=tmp_path / d) as again:
            np.testing.assert_allclose(_logits(again.engine.model), want, rtol=1e-5, atol=1e-5, err_msg=d)
            assert (await again.complete(IDS, max_tokens=5)).token_ids == want_ids


async def test_an_mlx_lm_adapter_of_a_multimodal_gemma3_loads(tmp_path):
    """mlx-lm's gemma3 model holds the text model as `language_model`, so its adapters
    name layers language_model.model.layers.N...: the loader refused them as layers
    this model does not have."""
    path = make_checkpoint(tmp_path / "g3", "gemma3")
    want = _write_amlx_adapter(path, tmp_path / "ad", targets=("q_proj", "down_proj"), seed=6)
    _as_mlx_lm(tmp_path / "ad", tmp_path / "mlxlm", prefix="language_model.")
    async with await amlx.load(path, adapter=tmp_path / "mlxlm") as model:
        np.testing.assert_allclose(_logits(model.engine.model), want, rtol=1e-5, atol=1e-5)


async def test_resume_from_a_directory_without_an_adapter_is_an_error(qwen, tmp_path):
    """resume=True pointed at a directory holding no adapter (a mistyped path) trained a new
    adapter from scratch, silently, and wrote it there."""
    async with await amlx.load(qwen) as model:
        for d in (tmp_path / "missing", tmp_path):
            with pytest.raises(ValueError, match=r"resume=True: .* holds no adapters\.safetensors"):
                [ev async for ev in model.train_lora(DATA, iters=2, batch_size=1, adapter_path=d, resume=True)]
        assert not lora.lora_modules(model.engine.model)
        assert not (tmp_path / "adapters.safetensors").exists() and not (tmp_path / "missing").exists()


async def test_a_stopped_run_saved_and_resumed_matches_an_uninterrupted_run(qwen, tmp_path):
    opts = dict(batch_size=2, learning_rate=1e-2, seed=7, dropout=0.2, grad_clip=0.5, weight_decay=0.1,
                lr_schedule="cosine", warmup=2, min_lr=1e-3, save_every=100)
    full = await _train(qwen, tmp_path / "a", 6, **opts)
    async with await amlx.load(qwen) as model:
        run = model.train_lora(DATA, iters=6, adapter_path=tmp_path / "b", **opts)
        async for ev in run:
            if ev.kind == "step" and ev.step == 2:
                await run.aclose()
        assert run.step == 2
        assert await run.save() == tmp_path / "b" / "adapters.safetensors"
    resumed = await _train(qwen, tmp_path / "b", 6, resume=True, **opts)
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
async def test_full_training_under_requests_saves_the_weights_it_serves(tmp_path, arch):
    """Full fine-tuning with requests decoding between the steps (the decode step fuses
    q/k/v and gate/up into views of one array, which the steps then replace): the model
    serves what it trained, and the saved checkpoint holds it (amlx and transformers)."""
    import asyncio

    path = make_checkpoint(tmp_path / arch, arch)
    async with await amlx.load(path) as model:
        async def requests():
            for _ in range(6):
                await model.complete(IDS, max_tokens=3)
                await asyncio.sleep(0)

        async def train():
            return [ev async for ev in model.train(DATA, iters=5, batch_size=2, learning_rate=3e-3, save_every=2,
                                                   save_path=tmp_path / "out")]

        await asyncio.gather(requests(), train())
        want = _logits(model.engine.model)
        served = await model.complete(IDS, max_tokens=4, logprobs=True)
    async with await amlx.load(tmp_path / "out") as saved:
        np.testing.assert_array_equal(_logits(saved.engine.model), want)
        again = await saved.complete(IDS, max_tokens=4, logprobs=True)
    assert again.token_ids == served.token_ids
    np.testing.assert_allclose(again.logprobs, served.logprobs, rtol=1e-5, atol=1e-5)
    assert served.token_ids[0] == int(np.argmax(want[-1]))
    np.testing.assert_allclose(reference_logits(load_reference(tmp_path / "out"), IDS), want, rtol=1e-4, atol=1e-4)


async def test_a_start_that_selected_no_layer_leaves_no_config_behind(qwen, tmp_path):
    """A run whose layers selected nothing (refused) left its LoRA settings on the model,
    and the next run's adapter_config.json carried them (alpha, layers) instead of its own."""
    async with await amlx.load(qwen) as model:
        with pytest.raises(ValueError, match="nothing to train"):
            [ev async for ev in model.train_lora(DATA, iters=1, batch_size=1, num_layers=1, layers=[0], alpha=32)]
        [ev async for ev in model.train_lora(DATA, iters=1, batch_size=1, rank=4, alpha=8, adapter_path=tmp_path)]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (meta["rank"], meta["alpha"], meta["num_layers"], meta["layers"]) == (4, 8, None, None)
    assert {m["scale"] for m in meta["modules"].values()} == {2.0}


@pytest.mark.parametrize("case", ["other_rank", "fewer_layers", "bad_step", "no_second_moments"])
async def test_a_resume_with_a_mismatched_optimizer_state_is_refused_naming_it(qwen, tmp_path, case):
    """Moments of another rank failed inside the first step with MLX's broadcast error;
    moments of only some layers resumed silently (the others restarted under a late step's
    bias correction); a bad step or missing moments gave errors naming no file. The state is
    checked before the model's adapter is replaced."""
    import shutil

    from safetensors.numpy import load_file, save_file

    await _train(qwen, tmp_path / "r4", 2, batch_size=1, rank=4)
    await _train(qwen, tmp_path / "r2", 2, batch_size=1, rank=2)
    d = tmp_path / "resume"
    shutil.copytree(tmp_path / "r4", d)
    moments = load_file(str(d / "optimizer.safetensors"))
    if case == "other_rank":
        moments = load_file(str(tmp_path / "r2" / "optimizer.safetensors"))
    elif case == "fewer_layers":
        moments = {k: v for k, v in moments.items() if "layers.0." not in k}
    elif case == "no_second_moments":
        moments = {k: v for k, v in moments.items() if k.startswith("m.")}
    else:
        (d / "optimizer.json").write_text(json.dumps({"format": "amlx-adamw", "version": 1, "step": -3}))
    save_file(moments, str(d / "optimizer.safetensors"))
    # (as a state written before optimizer.json held digests, which would refuse these files first)
    meta = json.loads((d / "optimizer.json").read_text())
    (d / "optimizer.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                  if k not in ("weights_sha256", "paired_with")}))
    async with await amlx.load(qwen, adapter=tmp_path / "r2") as model:
        before = _adapter(model.engine.model)
        with pytest.raises(ValueError, match=rf"{d}: .*optimizer state") as info:
            [ev async for ev in model.train_lora(DATA, iters=4, batch_size=1, rank=4, adapter_path=d, resume=True)]
        assert "broadcast" not in str(info.value)
        after = _adapter(model.engine.model)  # the refused resume left the model's adapter alone
        assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)
        assert (await model.complete(IDS, max_tokens=2)).usage.completion_tokens == 2


@pytest.mark.parametrize("case", ["adapter_newer", "moments_newer"])
async def test_a_save_cut_short_is_not_resumed(qwen, tmp_path, case):
    """The adapter, optimizer.safetensors and optimizer.json are written one after another: a
    save cut short between them left a set that resumed silently (a later adapter with an
    earlier step and moments, or moments of another step under the JSON's). optimizer.json
    now records the digests of both files, and a resume refuses a set that does not match."""
    import shutil

    await _train(qwen, tmp_path / "early", 2, batch_size=1, rank=4)
    await _train(qwen, tmp_path / "late", 3, batch_size=1, rank=4)
    d = tmp_path / "resume"
    shutil.copytree(tmp_path / "early", d)
    name = "adapters.safetensors" if case == "adapter_newer" else "optimizer.safetensors"
    shutil.copy(tmp_path / "late" / name, d / name)
    want = "another adapters.safetensors" if case == "adapter_newer" else "not the moments optimizer.json"
    async with await amlx.load(qwen) as model:
        with pytest.raises(ValueError, match=rf"{d}.*{want}"):
            [ev async for ev in model.train_lora(DATA, iters=4, batch_size=1, rank=4, adapter_path=d, resume=True)]
        # the whole set of one save resumes
        shutil.copytree(tmp_path / "late", d, dirs_exist_ok=True)
        events = [ev async for ev in model.train_lora(DATA, iters=4, batch_size=1, rank=4, adapter_path=d,
                                                      resume=True)]
    assert events[-1].step == 4


# -- data files -----------------------------------------------------------------------

_GOOD = [json.dumps({"text": "one two"}), json.dumps({"prompt": "Q: x", "completion": " y"}),
         json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})]
_BLANK = ["", "   ", "\t", "\r"]
_BAD = {json.dumps({"text": "word " * 80}): "more than max_seq_len", '{"text": "open': "malformed JSON",
        json.dumps({"prompt": "only"}): "needs both keys", json.dumps([1, 2]): "unknown record shape",
        json.dumps({"text": ""}): "non-empty string", "\ufeff" + json.dumps({"text": "bom"}): ""}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.sampled_from(_GOOD), st.sampled_from(_BLANK), st.sampled_from(sorted(_BAD))),
                      max_size=8), crlf=st.booleans())
def test_data_files_name_the_first_bad_line(tmp_path_factory, lines, crlf):
    from amlx.tokenizer import Tokenizer
    from amlx.train.data import DataError, load_dataset

    try:
        from tests.helpers.tokenizers import write_tokenizer
    except ImportError:
        from helpers.tokenizers import write_tokenizer
    d = tmp_path_factory.mktemp("data")
    write_tokenizer(d, "bpe")
    tok = Tokenizer.from_dir(d)
    f = d / "train.jsonl"
    f.write_bytes(("\r\n" if crlf else "\n").join(lines).encode("utf-8"))

    def bad(i, line):  # a BOM is allowed on the first line only
        return _BAD.get(line) if not line.startswith("\ufeff") else (None if i == 0 else "malformed JSON")

    first_bad = next(((i, bad(i, line)) for i, line in enumerate(lines) if bad(i, line) is not None), None)
    if first_bad is None:
        if not any(line.strip() for line in lines):
            with pytest.raises(DataError, match=rf"{f}: no records"):
                load_dataset(f, tok, max_seq_len=64)
            return
        ds = load_dataset(f, tok, max_seq_len=64)
        assert [e.line for e in ds.examples] == [i + 1 for i, line in enumerate(lines) if line.strip()]
        return
    with pytest.raises(DataError) as info:
        load_dataset(f, tok, max_seq_len=64)
    assert str(info.value).startswith(f"{f}:{first_bad[0] + 1}: "), str(info.value)
    assert first_bad[1] in str(info.value)


async def test_a_full_checkpoint_trained_in_another_dtype_says_so_in_its_config(qwen, tmp_path):
    """Trained in bfloat16 from a float32 checkpoint, the saved config.json said
    "dtype": "float32" beside "torch_dtype": "bfloat16"; transformers 5 reads "dtype" and
    loaded the bfloat16 weights as float32."""
    from transformers import AutoConfig

    async with await amlx.load(qwen, dtype="bfloat16") as model:
        [ev async for ev in model.train(DATA, iters=1, batch_size=1, save_path=tmp_path / "out")]
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {raw.get(k) for k in ("dtype", "torch_dtype")} - {None} == {"bfloat16"}
    assert str(AutoConfig.from_pretrained(tmp_path / "out").dtype) == "torch.bfloat16"
    async with await amlx.load(tmp_path / "out") as again:
        assert again.info.dtype == "bfloat16"


async def test_resuming_another_adapter_on_a_serving_model_serves_exactly_that_adapter(qwen, tmp_path):
    """The served model's adapter (all attention projections, fused q/k/v gone) replaced by
    a resumed one on q_proj alone: the projections it does not adapt go back to plain layers
    (fused again by the decode step) and requests see exactly the resumed adapter."""
    await _train(qwen, tmp_path / "b", 2, batch_size=1, rank=2, targets=["q_proj"], learning_rate=5e-2)
    async with await amlx.load(qwen, adapter=tmp_path / "b") as ref:
        want = _logits(ref.engine.model)
        want_ids = (await ref.complete(IDS, max_tokens=6)).token_ids
    _write_amlx_adapter(qwen, tmp_path / "a", targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=8)
    async with await amlx.load(qwen, adapter=tmp_path / "a") as model:
        await model.complete(IDS, max_tokens=2)
        [ev async for ev in model.train_lora(DATA, iters=2, batch_size=1, adapter_path=tmp_path / "b", resume=True)]
        assert sorted(lora.lora_modules(model.engine.model)) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
        np.testing.assert_array_equal(_logits(model.engine.model), want)
        assert (await model.complete(IDS, max_tokens=6)).token_ids == want_ids


async def test_a_record_longer_than_the_models_context_names_the_context(qwen):
    """With the model loaded with a small max_context, a long record's error said "more than
    max_seq_len=16 (raise max_seq_len ...)" although max_seq_len was 2048."""
    from amlx.train.data import DataError

    async with await amlx.load(qwen, max_context=16) as model:
        with pytest.raises(DataError, match=r"record 1: .* more than the model's context of 16 tokens") as info:
            [ev async for ev in model.train_lora([{"text": "word " * 30}], iters=1, batch_size=1)]
        assert "raise max_seq_len" not in str(info.value)
        with pytest.raises(DataError, match=r"more than max_seq_len=8 \(raise max_seq_len"):
            [ev async for ev in model.train_lora([{"text": "word " * 30}], iters=1, batch_size=1, max_seq_len=8)]


@pytest.fixture(scope="module", params=["bpe", "spm"])
def chat_tok(request, tmp_path_factory):
    """The test tokenizers: "bpe" with a Qwen 3 chat template, "spm" with Gemma 3's."""
    from amlx.tokenizer import Tokenizer

    try:
        from tests.helpers.tokenizers import write_tokenizer
    except ImportError:
        from helpers.tokenizers import write_tokenizer
    d = tmp_path_factory.mktemp(request.param)
    write_tokenizer(d, request.param)
    return Tokenizer.from_dir(d)


def _learned_runs(tok, ex) -> list[str]:
    runs, cur = [], []
    for t, m in zip(ex.tokens, ex.mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


def test_a_turn_learns_its_end_marker_not_the_next_turns_start(chat_tok):
    """An assistant turn whose span already held its end-of-turn marker (and the newline
    after it) extended to the next special token too: the next turn's start marker
    (<|im_start|>) was learned after every assistant turn but the last."""
    from amlx.train.data import encode_record

    msgs = [{"role": "user", "content": "q one"}, {"role": "assistant", "content": "a one"},
            {"role": "user", "content": "q two"}, {"role": "assistant", "content": "a two"}]
    runs = _learned_runs(chat_tok, encode_record({"messages": msgs}, chat_tok))
    assert len(runs) == 2, runs
    for run, answer in zip(runs, ("a one", "a two")):
        assert run.lstrip().startswith(answer), runs
        assert "<|im_end|>" in run or "<end_of_turn>" in run, runs  # the turn's end is learned
        assert "<|im_start|>" not in run and "<start_of_turn>" not in run, runs


def test_an_earlier_turn_whose_reasoning_the_template_drops_is_learned_as_rendered(chat_tok):
    """Qwen 3's template drops the <think> block of assistant turns before the last user
    message; such a turn could not be located and the whole conversation was refused."""
    from amlx.train.data import encode_record

    msgs = [{"role": "user", "content": "q one"}, {"role": "assistant", "content": "<think>r one</think>a one"},
            {"role": "user", "content": "q two"}, {"role": "assistant", "content": "<think>r two</think>a two"}]
    ex = encode_record({"messages": msgs}, chat_tok)
    full = chat_tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert chat_tok.encode(full, add_special_tokens=False) == ex.tokens
    runs = _learned_runs(chat_tok, ex)
    assert len(runs) == 2 and "a one" in runs[0] and "a two" in runs[1], runs
    assert not any(q in run for run in runs for q in ("q one", "q two", "<|im_start|>", "<start_of_turn>")), runs


_WORDS = st.text("abxyz \n.", max_size=8)


@settings(max_examples=60, deadline=None)
@given(system=st.one_of(st.none(), _WORDS),
       turns=st.lists(st.tuples(_WORDS, _WORDS, st.sampled_from(["", "think", "reasoning_content", "tool"])),
                      min_size=1, max_size=3))
def test_each_assistant_turn_is_one_learned_run_ending_at_its_marker(chat_tok, system, turns):
    """"tool": the answer follows a tool call (an assistant turn of its own) and the tool's reply
    (Qwen's template only: Gemma 3's has no tool role)."""
    from amlx.train.data import encode_record

    tools = any(kind == "tool" for *_, kind in turns)
    assume(not tools or "<|im_end|>" in chat_tok.apply_chat_template([{"role": "user", "content": "x"}]))
    msgs = [] if system is None else [{"role": "system", "content": "S" + system}]
    expected = []  # what each learned run holds
    for user, answer, kind in turns:
        msgs.append({"role": "user", "content": "U" + user})
        reply = {"role": "assistant", "content": answer}
        if kind == "think":
            reply["content"] = f"<think>r{answer}</think>{answer}"
        elif kind == "reasoning_content":
            reply["reasoning_content"] = "r" + answer
        elif kind == "tool":
            msgs.append({"role": "assistant", "content": "",
                         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]})
            msgs.append({"role": "tool", "content": "T"})
            expected.append("<tool_call>")
        msgs.append(reply)
        expected.append(answer.strip())
    record = {"messages": msgs}
    if tools:
        record["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    ex = encode_record(record, chat_tok)
    assert chat_tok.encode(chat_tok.apply_chat_template(msgs, add_generation_prompt=False, tools=record.get("tools")),
                           add_special_tokens=False) == ex.tokens
    runs = _learned_runs(chat_tok, ex)
    assert len(runs) == len(expected), runs
    for run, want in zip(runs, expected):
        assert sum(run.count(m) for m in ("<|im_end|>", "<end_of_turn>")) == 1, runs
        assert want in run and not any(c in run for c in "UST"), runs
        assert "<|im_start|>" not in run and "<start_of_turn>" not in run, runs


@pytest.mark.parametrize("record", [{"text": "hello world"}, {"prompt": "Q:", "completion": " yes"}])
def test_an_eos_the_tokenizer_appends_is_learned(tmp_path, record):
    """A tokenizer.json whose post-processor appends the EOS (as transformers 4 writes it for
    Llama tokenizers with add_eos_token) gave that EOS the mask of a BOS: never learned, and
    no other was added, so the model never learned to stop."""
    from amlx.tokenizer import Tokenizer
    from amlx.train.data import encode_record

    try:
        from tests.helpers.tokenizers import write_tokenizer
    except ImportError:
        from helpers.tokenizers import write_tokenizer
    write_tokenizer(tmp_path, "spm")
    plain = Tokenizer.from_dir(tmp_path)
    bos, eos = (plain.id_to_token(i) for i in (plain.bos_token_id, plain.eos_token_id))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": eos, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {t: {"id": t, "ids": [plain.token_to_id(t)], "tokens": [t]} for t in (bos, eos)}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.from_dir(tmp_path)
    ex = encode_record(record, tok)
    assert ex.tokens[0] == tok.bos_token_id and not ex.mask[0]
    assert ex.tokens[-1] == tok.eos_token_id and ex.tokens.count(tok.eos_token_id) == 1
    assert ex.mask[-1] and ex.mask[-2]


# -- fusing -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,style,targets", [("gemma3", "old", ("q_proj", "down_proj")),
                                                ("qwen2", "new", ("q_proj", "v_proj", "lm_head"))])
def test_a_fused_checkpoint_equals_the_unfused_forward(tmp_path, arch, style, targets):
    """Multimodal Gemma 3 (text weights under language_model., vision tower carried) and
    Qwen 2 (biased q/v, an untied lm_head adapted): the fused checkpoint's logits, in amlx
    and in transformers, equal base + adapter."""
    path = make_checkpoint(tmp_path / arch, arch, config_style=style)
    want = _write_amlx_adapter(path, tmp_path / "ad", targets=targets, seed=9)
    fused = lora.fuse(path, tmp_path / "ad", tmp_path / "fused")
    loaded = on_worker(lambda: load_model(fused, progress=False))
    try:
        assert not on_worker(lambda: lora.lora_modules(loaded.model))
        np.testing.assert_allclose(_logits(loaded.model), want, rtol=1e-4, atol=1e-4)
    finally:
        on_worker(loaded.model.close)
    np.testing.assert_allclose(reference_logits(load_reference(fused), IDS), want, rtol=1e-4, atol=1e-4)


async def test_the_checkpoint_directory_itself_is_refused_as_adapter_path(tmp_path):
    """An adapter saved into the checkpoint directory put adapter_config.json beside
    config.json, and transformers then took the checkpoint for a PEFT adapter and refused to
    load it. A subdirectory is fine."""
    path = make_checkpoint(tmp_path / "ck", "qwen3")
    async with await amlx.load(path) as model:
        with pytest.raises(ValueError, match="is the checkpoint directory being trained"):
            model.train_lora(DATA, iters=1, batch_size=1, adapter_path=tmp_path / "ck" / ".." / "ck")
        [ev async for ev in model.train_lora(DATA, iters=1, batch_size=1, adapter_path=path / "adapters")]
    assert not (path / "adapter_config.json").exists()
    load_reference(path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(targets=st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj", "mlp.down_proj", "self_attn.q_proj"]),
                        min_size=1, max_size=4, unique=True),
       rank=st.integers(1, 8), alpha=st.floats(-64, 64, allow_nan=False).filter(lambda a: a != 0),
       rslora=st.booleans(), layers=st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=1, unique=True)),
       num_layers=st.one_of(st.none(), st.integers(1, 2)))
def test_any_adapter_saved_and_loaded_gives_its_logits(qwen, tmp_path_factory, targets, rank, alpha, rslora, layers,
                                                        num_layers):
    from amlx.train.grad import trainable_parameters

    chosen = set(range(2)) if layers is None else set(layers)
    if num_layers is not None:
        chosen &= set(range(2 - num_layers, 2))
    assume(chosen)  # (selecting no layer is refused: test_a_start_that_selected_no_layer_...)
    d = tmp_path_factory.mktemp("any")
    loaded = on_worker(lambda: load_model(qwen, progress=False))
    rng = np.random.default_rng(rank)

    def make():
        lora.apply_lora(loaded.model, rank=rank, alpha=alpha, targets=targets, layers=layers, num_layers=num_layers,
                        use_rslora=rslora)
        for m in lora.lora_modules(loaded.model).values():
            m.lora_b = array((rng.standard_normal(m.lora_b.shape) * 0.05).astype(np.float32))
        lora.save_adapter(loaded.model, d)
        return sorted(lora.lora_modules(loaded.model)), len(trainable_parameters(loaded.model))

    try:
        paths, n = on_worker(make)
        want = _logits(loaded.model)
    finally:
        on_worker(loaded.model.close)
    assert {int(p.split(".")[2]) for p in paths} == chosen and n == 2 * len(paths)
    again = on_worker(lambda: load_model(qwen, progress=False))
    try:
        on_worker(lambda: lora.load_adapter(again.model, d, again.config))
        assert sorted(on_worker(lambda: lora.lora_modules(again.model))) == paths
        np.testing.assert_array_equal(_logits(again.model), want)
    finally:
        on_worker(again.model.close)
    meta = json.loads((d / "adapter_config.json").read_text())
    scale = alpha / (rank ** 0.5 if rslora else rank)
    assert meta["rank"] == rank and meta["alpha"] == alpha and meta["use_rslora"] == rslora
    assert all(m["scale"] == pytest.approx(scale) for m in meta["modules"].values())


def test_an_answer_holding_a_special_token_still_learns_its_end_marker(chat_tok):
    """(the rule above must look at how the learned span ends, not at any special token in it)"""
    from amlx.train.data import encode_record

    special = "<|endoftext|>" if "<|im_end|>" in chat_tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=False) else "<mask>"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a {special} b"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "c"}]
    runs = _learned_runs(chat_tok, encode_record({"messages": msgs}, chat_tok))
    assert len(runs) == 2 and all(("<|im_end|>" in r) != ("<end_of_turn>" in r) for r in runs), runs


# -- the whole LoRA loop against PEFT + torch -------------------------------------------

async def test_three_lora_steps_match_peft_and_torch_adamw(qwen, tmp_path):
    """Three steps of train_lora (every record in each batch, so the order within it does not
    matter; cosine schedule with warm-up, clipping, weight decay) equal PEFT's LoRA under
    torch autograd, clip_grad_norm_ and AdamW started from the same A (B zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from amlx.train.data import load_dataset, make_batch
    from amlx.train.optim import warmup_cosine

    hp = dict(learning_rate=2e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, grad_clip=0.5)
    targets = ["q_proj", "v_proj", "down_proj"]
    async with await amlx.load(qwen) as model:
        batch = make_batch(load_dataset(DATA, model.tokenizer).examples)
        [ev async for ev in model.train_lora(DATA, iters=3, batch_size=3, rank=4, alpha=8, targets=targets, seed=5,
                                             lr_schedule="cosine", warmup=1, min_lr=1e-3, **hp)]
        got = _adapter(model.engine.model)
    # the adapter's start: apply_lora's A for this seed, B zero
    start = on_worker(lambda: load_model(qwen, progress=False))
    on_worker(lambda: lora.apply_lora(start.model, rank=4, alpha=8, targets=targets, seed=5))
    init = _adapter(start.model)
    on_worker(start.model.close)

    ref = get_peft_model(load_reference(qwen), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, value in init.items():
            path, leaf = name.rsplit(".", 1)
            params[f"base_model.model.{path}.lora_{leaf[-1].upper()}.default.weight"].copy_(torch.tensor(value))
    trained = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1.0, betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(hp["learning_rate"], 3, 1, 1e-3))
    inputs, targets_, mask = (torch.tensor(a) for a in (batch.inputs, batch.targets, batch.mask))
    for _ in range(3):
        logp = torch.log_softmax(ref(input_ids=inputs.long()).logits.float(), -1)
        tok = -logp.gather(-1, targets_.long()[..., None])[..., 0]
        loss = (tok * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, hp["grad_clip"])
        opt.step()
        sched.step()
    for name, value in got.items():
        path, leaf = name.rsplit(".", 1)
        want = params[f"base_model.model.{path}.lora_{leaf[-1].upper()}.default.weight"].detach().numpy()
        np.testing.assert_allclose(value, want, rtol=1e-3, atol=1e-5, err_msg=name)
        assert np.abs(value - init[name]).max() > 1e-4, name


async def test_a_qlora_run_resumed_matches_an_uninterrupted_one(qwen, tmp_path):
    q4 = amlx.convert(qwen, tmp_path / "q4", quantize=4, group_size=32, progress=False)
    opts = dict(batch_size=2, learning_rate=1e-2, seed=1, dropout=0.1, rank=4, targets=["q_proj", "down_proj"])
    full = await _train(q4, tmp_path / "a", 4, **opts)
    await _train(q4, tmp_path / "b", 2, **opts)
    resumed = await _train(q4, tmp_path / "b", 4, resume=True, **opts)
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], rtol=1e-5, atol=1e-7, err_msg=k)


async def test_a_saved_adapter_is_in_the_documented_amlx_format(qwen, tmp_path):
    """amlx/train/lora.py's docstring: float32 <path>.lora_a (rank, in) and <path>.lora_b
    (out, rank) under the text model's layer names, and adapter_config.json's keys."""
    from safetensors import safe_open

    async with await amlx.load(qwen) as model:
        [ev async for ev in model.train_lora(DATA, iters=1, batch_size=1, rank=3, alpha=6, use_rslora=True,
                                             targets=["k_proj", "mlp.up_proj"], num_layers=1,
                                             adapter_path=tmp_path)]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    layers = ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj"]
    assert {k: meta[k] for k in ("format", "version", "rank", "alpha", "dropout", "use_rslora", "targets",
                                 "num_layers", "layers")} == {
        "format": "amlx-lora", "version": 1, "rank": 3, "alpha": 6.0, "dropout": 0.0, "use_rslora": True,
        "targets": ["k_proj", "mlp.up_proj"], "num_layers": 1, "layers": None}
    assert meta["modules"] == {p: {"rank": 3, "scale": pytest.approx(6 / 3 ** 0.5)} for p in layers}
    assert meta["base_model"]["architecture"] == "qwen3"
    with safe_open(str(tmp_path / "adapters.safetensors"), "np") as f:
        shapes = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    out = {"k_proj": 32, "up_proj": 128}
    assert shapes == {**{f"{p}.lora_a": ("F32", (3, 64)) for p in layers},
                      **{f"{p}.lora_b": ("F32", (out[p.rsplit('.', 1)[1]], 3)) for p in layers}}
