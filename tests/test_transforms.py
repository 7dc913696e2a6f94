"""Function transformations: gradients against finite differences and torch
autograd, vjp against torch, and compile against eager evaluation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amlx import _mlx as mx
from amlx._mlx import fast
from amlx._mlx import ops as O
from amlx._mlx import transforms as T

torch.set_grad_enabled(True)


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def f32(x) -> mx.Array:
    return mx.array(np.asarray(x, np.float32))


# -- value_and_grad against central finite differences ----------------------------

# (amlx function, the same in float64 numpy) of one array, returning a scalar.
SCALAR_FUNCTIONS = {
    "poly_tanh": (lambda x: (O.tanh(x) * x * x + 0.5 * x).sum(),
                  lambda x: np.sum(np.tanh(x) * x * x + 0.5 * x)),
    "logsumexp": (lambda x: O.logsumexp(x, -1).mean(),
                  lambda x: np.mean(np.log(np.sum(np.exp(x), -1)))),
    "softmax_entropy": (lambda x: -(O.softmax(x, -1) * O.log(O.softmax(x, -1))).sum(),
                        lambda x: -np.sum(_np_softmax(x) * np.log(_np_softmax(x)))),
    "matmul_sigmoid": (lambda x: O.sigmoid(x @ O.transpose(x)).sum(),
                       lambda x: np.sum(1 / (1 + np.exp(-(x @ x.T))))),
    "sqrt_exp_sin": (lambda x: (O.sqrt(O.exp(x) + 1.0) * O.sin(x)).max(-1).sum(),
                     lambda x: np.sum(np.max(np.sqrt(np.exp(x) + 1.0) * np.sin(x), -1))),
}


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def central_differences(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("name", list(SCALAR_FUNCTIONS))
def test_value_and_grad_matches_finite_differences(name):
    fn, ref = SCALAR_FUNCTIONS[name]
    x32 = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    x64 = x32.astype(np.float64)  # the very point MLX sees
    value, grad = T.value_and_grad(fn)(f32(x32))
    np.testing.assert_allclose(value.item(), ref(x64), rtol=1e-5, atol=1e-6)
    want = central_differences(ref, x64)
    assert rel_err(grad.numpy(), want) < 1e-4
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-3, atol=1e-4)


def test_grad_of_several_arguments_matches_finite_differences():
    rng = np.random.default_rng(2)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in [(4, 3), (3, 2), (2,)])

    def fn(a, b, c):
        return O.tanh(a @ b + c).sum() + (c * c).sum()

    def ref(a, b, c):
        return np.sum(np.tanh(a @ b + c)) + np.sum(c * c)

    ga, gb, gc = T.grad(fn, argnums=(0, 1, 2))(f32(a), f32(b), f32(c))
    a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c))
    assert rel_err(ga.numpy(), central_differences(lambda v: ref(v, b64, c64), a64)) < 1e-4
    assert rel_err(gb.numpy(), central_differences(lambda v: ref(a64, v, c64), b64)) < 1e-4
    assert rel_err(gc.numpy(), central_differences(lambda v: ref(a64, b64, v), c64)) < 1e-4


# -- a two-layer MLP with RMSNorm against torch autograd -----------------------------

B, D, H, C = 16, 24, 32, 10
EPS = 1e-5


def mlp_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((D, H)) / np.sqrt(D)).astype(np.float32),
        "b1": (rng.standard_normal(H) * 0.1).astype(np.float32),
        "norm": (1.0 + rng.standard_normal(H) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((H, C)) / np.sqrt(H)).astype(np.float32),
        "b2": (rng.standard_normal(C) * 0.1).astype(np.float32),
    }


def mlp_data(seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, D)).astype(np.float32), rng.integers(0, C, B).astype(np.int32)


def rms_norm_manual(h, w):
    return h * O.rsqrt(O.mean(h * h, -1, keepdims=True) + EPS) * w


def mlp_loss(params, x, labels, fused_norm=True):
    h = x @ params["w1"] + params["b1"]
    h = fast.rms_norm(h, params["norm"], EPS) if fused_norm else rms_norm_manual(h, params["norm"])
    h = h * O.sigmoid(h)  # SiLU
    logits = h @ params["w2"] + params["b2"]
    picked = O.take_along_axis(logits, O.expand_dims(labels, -1), -1)
    return (O.logsumexp(logits, -1, keepdims=True) - picked).mean()


def torch_mlp_grads(params: dict[str, np.ndarray], x, labels):
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x, dtype=torch.float64)
    h = xt @ p["w1"] + p["b1"]
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * p["norm"]
    h = torch.nn.functional.silu(h)
    logits = h @ p["w2"] + p["b2"]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels, dtype=torch.long))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in p.items()}


@pytest.mark.parametrize("fused_norm", [True, False], ids=["fast_rms_norm", "manual_rms_norm"])
def test_mlp_value_and_grad_matches_torch(fused_norm):
    params, (x, labels) = mlp_params(), mlp_data()
    want_loss, want = torch_mlp_grads(params, x, labels)
    vg = T.value_and_grad(lambda p, x, y: mlp_loss(p, x, y, fused_norm))
    loss, grads = vg({k: f32(v) for k, v in params.items()}, f32(x), mx.array(labels))
    assert isinstance(grads, dict) and set(grads) == set(params)
    np.testing.assert_allclose(loss.item(), want_loss, rtol=1e-5)
    for k in params:
        assert grads[k].shape == params[k].shape
        assert rel_err(grads[k].numpy(), want[k]) <= 1e-4, k


def test_mlp_grad_with_argnums_tuple():
    params, (x, labels) = mlp_params(3), mlp_data(4)
    _, want = torch_mlp_grads(params, x, labels)

    def loss(w1, rest, x, y):
        return mlp_loss({"w1": w1, **rest}, x, y)

    rest = {k: f32(v) for k, v in params.items() if k != "w1"}
    g_w1, g_rest = T.grad(loss, argnums=(0, 1))(f32(params["w1"]), rest, f32(x), mx.array(labels))
    assert rel_err(g_w1.numpy(), want["w1"]) <= 1e-4
    assert set(g_rest) == set(rest)
    for k, g in g_rest.items():
        assert rel_err(g.numpy(), want[k]) <= 1e-4, k
    # argnums picks arguments: the gradient of the input x, compared with torch.
    gx = T.grad(loss, argnums=2)(f32(params["w1"]), rest, f32(x), mx.array(labels))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}
    h = xt @ p["w1"] + p["b1"]
    h = torch.nn.functional.silu(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * p["norm"])
    torch.nn.functional.cross_entropy(h @ p["w2"] + p["b2"], torch.tensor(labels, dtype=torch.long)).backward()
    assert rel_err(gx.numpy(), xt.grad.numpy()) <= 1e-4


def test_value_and_grad_with_auxiliary_outputs():
    x = f32(np.linspace(-1, 1, 6))
    (loss, aux), g = T.value_and_grad(lambda x: ((x * x).sum(), {"double": x * 2.0}))(x)
    assert np.isclose(loss.item(), float(np.sum(np.linspace(-1, 1, 6) ** 2)))
    np.testing.assert_allclose(aux["double"].numpy(), np.linspace(-1, 1, 6) * 2, rtol=1e-6)
    np.testing.assert_allclose(g.numpy(), np.linspace(-1, 1, 6) * 2, rtol=1e-6)


def test_argnums_out_of_range():
    with pytest.raises(ValueError, match="argnums"):
        T.grad(lambda x: x.sum(), argnums=1)(f32([1.0]))


# -- vjp against torch -------------------------------------------------------------------

def test_vjp_matches_torch():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    cot1 = rng.standard_normal((4, 3)).astype(np.float32)
    cot2 = rng.standard_normal((4,)).astype(np.float32)

    def fn(a, w):
        y = O.softmax(a @ w, -1) * O.tanh(a @ w)
        return y, O.logsumexp(a, -1)

    outs, vjps = T.vjp(fn, [f32(a), f32(w)], [f32(cot1), f32(cot2)])

    at = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    z = at @ wt
    y1, y2 = torch.softmax(z, -1) * torch.tanh(z), torch.logsumexp(at, -1)
    ga, gw = torch.autograd.grad([y1, y2], [at, wt], [torch.tensor(cot1, dtype=torch.float64),
                                                    torch.tensor(cot2, dtype=torch.float64)])
    assert len(outs) == 2 and len(vjps) == 2
    assert rel_err(outs[0].numpy(), y1.detach().numpy()) < 1e-5
    assert rel_err(outs[1].numpy(), y2.detach().numpy()) < 1e-5
    assert rel_err(vjps[0].numpy(), ga.numpy()) <= 1e-4
    assert rel_err(vjps[1].numpy(), gw.numpy()) <= 1e-4


# -- compile against eager -----------------------------------------------------------

def test_compile_matches_eager():
    rng = np.random.default_rng(6)
    x, w = f32(rng.standard_normal((5, 8))), f32(rng.standard_normal((8, 8)))

    def fn(x, w):
        h = O.softmax(x @ w * 0.5, -1)
        return O.exp(h).sum(-1) + O.maximum(x, 0.0).mean(), h

    f = T.compile(fn)
    for _ in range(3):  # traced once, replayed
        got = f(x, w)
        want = fn(x, w)
        assert isinstance(got, tuple) and len(got) == 2
        for g, e in zip(got, want):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-6, atol=1e-6)
    f.close()


def test_compile_of_a_dict_pytree():
    params = {k: f32(v) for k, v in mlp_params(7).items()}
    x, labels = mlp_data(8)
    f = T.compile(mlp_loss)
    want = mlp_loss(params, f32(x), mx.array(labels)).item()
    assert np.isclose(f(params, f32(x), mx.array(labels)).item(), want, rtol=1e-6)

    def update(params, scale):
        return {k: v * scale for k, v in params.items()}, [params["b1"].sum()]

    g = T.compile(update)
    new, extra = g(params, f32(0.5))
    assert set(new) == set(params) and isinstance(extra, list)
    for k in params:
        np.testing.assert_allclose(new[k].numpy(), params[k].numpy() * 0.5, rtol=1e-6)
    np.testing.assert_allclose(extra[0].item(), params["b1"].sum().item(), rtol=1e-6)
    with pytest.raises(TypeError, match="same argument structure"):
        g({"w1": params["w1"]}, f32(0.5))
    f.close()
    g.close()


def test_compile_retraces_on_a_new_shape():
    traces = []

    def fn(x):
        traces.append(x.shape)
        return (x * x).sum(-1) + 1.0

    f = T.compile(fn)
    for shape in [(2, 3), (2, 3), (4, 5), (2, 3), (4, 5), (7,)]:
        x = f32(np.random.default_rng(len(traces)).standard_normal(shape))
        np.testing.assert_allclose(f(x).numpy(), fn(x).numpy(), rtol=1e-6)
    eager_calls = 6
    assert len(traces) - eager_calls == 3  # one trace per distinct shape
    # A new dtype retraces as well.
    f(mx.array(np.ones((2, 3), np.float16)))
    assert len(traces) - eager_calls == 4
    f.close()


def test_compiled_outputs_are_many_independent_arrays():
    """A compiled call hands its inputs and outputs to C in one call each way: 70 inputs and
    40 outputs all come back, at each traced shape, each its own array, alive after the
    others are closed."""
    f = T.compile(lambda *xs: [x * 2.0 for x in xs[:40]])
    for n in (3, 5, 3):
        xs = [f32(np.full((n,), i, np.float32)) for i in range(70)]
        out = f(*xs)
        assert len(out) == 40
        for a in out[:-1]:
            a.close()
        np.testing.assert_array_equal(out[-1].numpy(), np.full((n,), 78.0))
    f.close()


def test_compile_shapeless():
    traces = []

    def fn(x, y):
        traces.append(x.ndim)
        return O.exp(x) * y + O.sigmoid(y) - 0.25

    f = T.compile(fn, shapeless=True)
    rng = np.random.default_rng(9)
    shapes = [(3,), (17,), (1,), (4, 6), (9, 2), (2, 3, 5)]
    for shape in shapes:
        x, y = f32(rng.standard_normal(shape)), f32(rng.standard_normal(shape))
        got = f(x, y)
        assert got.shape == shape
        np.testing.assert_allclose(got.numpy(), fn(x, y).numpy(), rtol=1e-6, atol=1e-6)
    # MLX retraces a shapeless function only when the number of dimensions changes.
    assert len(traces) - len(shapes) == 3
    f.close()


def test_compiled_grad_equals_eager_grad():
    params = {k: f32(v) for k, v in mlp_params(10).items()}
    x, labels = mlp_data(11)
    x, labels = f32(x), mx.array(labels)
    eager = T.value_and_grad(mlp_loss)
    compiled = T.compile(T.value_and_grad(mlp_loss))
    want_loss, want = eager(params, x, labels)
    for _ in range(3):
        loss, grads = compiled(params, x, labels)
        np.testing.assert_allclose(loss.item(), want_loss.item(), rtol=1e-6)
        for k in params:
            np.testing.assert_allclose(grads[k].numpy(), want[k].numpy(), rtol=1e-5, atol=1e-7)
    # A training step (update included) compiled and replayed matches eager steps.
    def sgd_step(params, x, labels):
        loss, grads = T.value_and_grad(mlp_loss)(params, x, labels)
        return loss, {k: params[k] - 0.1 * grads[k] for k in params}

    step = T.compile(sgd_step)
    p_eager, p_comp = dict(params), dict(params)
    for _ in range(5):
        l_eager, p_eager = sgd_step(p_eager, x, labels)
        l_comp, p_comp = step(p_comp, x, labels)
        np.testing.assert_allclose(l_comp.item(), l_eager.item(), rtol=1e-5)
    assert l_comp.item() < want_loss.item()  # it trains
    for k in params:
        np.testing.assert_allclose(p_comp[k].numpy(), p_eager[k].numpy(), rtol=1e-5, atol=1e-6)
    compiled.close()
    step.close()


def test_closed_compiled_function_retraces_when_called_again():
    traces = []
    f = T.compile(lambda x: (traces.append(1), x + 1.0)[1])
    assert f(f32([1.0])).tolist() == [2.0]
    assert f(f32([2.0])).tolist() == [3.0]
    assert len(traces) == 1
    f.close()
    f.close()  # idempotent
    assert f(f32([3.0])).tolist() == [4.0]  # a fresh trace
    assert len(traces) == 2
    f.close()
