"""linear, DenseFFN and the thread policy against plain NumPy float64 formulas."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashrt.ffn.dense as ffn_dense
import flashrt.linear as linear_mod
from flashrt._core import kernels
from flashrt.ffn.dense import DenseFFN
from flashrt.linear import linear
from flashrt.threads import default_threads

RTOL = 1e-5
PATHS = ["scalar"] + (["avx2"] if kernels.cpu_features()["avx2_available"] else [])
HSET = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=PATHS)
def path(request):
    kernels.set_path(request.param)
    yield request.param
    kernels.set_path("auto")


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny conversion blocks, so small shapes cross several blocks with a ragged last one."""
    monkeypatch.setattr(linear_mod, "SCRATCH_ELEMS", 500)
    monkeypatch.setattr(linear_mod, "MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(ffn_dense, "SCRATCH_ELEMS", 700)
    monkeypatch.setattr(ffn_dense, "MIN_BLOCK_ROWS", 3)


def _close(got, want, scale, rtol=RTOL):
    err = np.abs(got.astype(np.float64) - want)
    bound = rtol * scale + 1e-30
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def _act64(v, act):
    if act == "relu":
        return np.maximum(v, 0.0)
    if act == "gelu":
        return 0.5 * v * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))
    return v / (1.0 + np.exp(-v))


# ------------------------------------------------------------------ linear

@HSET
@given(T=st.integers(1, 6), n_out=st.integers(1, 90), n_in=st.integers(1, 130),
       dtype=st.sampled_from([np.float16, np.float32]), with_bias=st.booleans(),
       n_threads=st.sampled_from([None, 1, 2]), seed=st.integers(0, 2**32 - 1))
def test_linear_matches_float64(path, small_blocks, T, n_out, n_in, dtype, with_bias, n_threads, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in)).astype(dtype)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    y = linear(W, x, b, n_threads=n_threads)
    assert y.shape == (T, n_out) and y.dtype == np.float32
    W64, x64 = W.astype(np.float64), x.astype(np.float64)
    want = x64 @ W64.T + (0 if b is None else b)
    _close(y, want, np.abs(x64) @ np.abs(W64).T + (0 if b is None else np.abs(b)))


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_linear_model_shapes(path, T, dtype):
    rng = np.random.default_rng(T)
    W = rng.standard_normal((1500, 576)).astype(dtype)       # several default-size blocks
    x = rng.standard_normal((T, 576)).astype(np.float32)
    out = np.empty((T, 1500), np.float32)
    y = linear(W, x, out=out)
    assert y is out or np.shares_memory(y, out)
    W64, x64 = W.astype(np.float64), x.astype(np.float64)
    _close(out, x64 @ W64.T, np.abs(x64) @ np.abs(W64).T)


def test_linear_1d_input_and_strided_x():
    W = np.arange(12, dtype=np.float16).reshape(3, 4)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(linear(W, x[1]), W.astype(np.float64) @ x[1])
    xs = np.arange(16, dtype=np.float32).reshape(2, 8)[:, ::2]          # non-contiguous
    np.testing.assert_array_equal(linear(W, xs), xs.astype(np.float64) @ W.astype(np.float64).T)


@pytest.mark.parametrize("W,x,bias,msg", [
    (np.zeros((3, 4), np.float64), np.zeros((1, 4), np.float32), None, "W must be"),
    (np.zeros((3, 8), np.float16)[:, ::2], np.zeros((1, 4), np.float32), None, "W must be"),
    (np.zeros((3, 4), np.float16), np.zeros((1, 4), np.float64), None, "x must be"),
    (np.zeros((3, 4), np.float16), np.zeros((1, 5), np.float32), None, "expects 4"),
    (np.zeros((3, 4), np.float16), np.zeros((1, 4), np.float32), np.zeros(4, np.float32), "bias"),
    (np.zeros((3, 4), np.float16), np.zeros((2, 4), np.float32), np.zeros(3, np.float64), "bias"),
])
def test_linear_bad_input(W, x, bias, msg):
    with pytest.raises(ValueError, match=msg):
        linear(W, x, bias)


# ------------------------------------------------------------------ DenseFFN

def _ffn64(B, x, gated, act, b_up, b_down):
    """Plain float64 FFN from the bundle layout: (T, d)."""
    d = x.shape[1]
    B = B.astype(np.float64)
    x = x.astype(np.float64)
    if gated:
        g, u = x @ B[:, :d].T, x @ B[:, d:2 * d].T
        h = _act64(g, act) * u
        h_scale = 1.13 * (np.abs(x) @ np.abs(B[:, :d]).T) * np.abs(u) \
            + np.abs(_act64(g, act)) * (np.abs(x) @ np.abs(B[:, d:2 * d]).T)
    else:
        u = x @ B[:, :d].T + (0 if b_up is None else b_up)
        h = _act64(u, act)
        h_scale = 1.13 * (np.abs(x) @ np.abs(B[:, :d]).T + (0 if b_up is None else np.abs(b_up)))
    down = B[:, -d:]
    y = h @ down + (0 if b_down is None else b_down)
    y_scale = (np.abs(h) + h_scale) @ np.abs(down) + (0 if b_down is None else np.abs(b_down))
    return y, y_scale, h, h_scale


KINDS = [(True, "silu", False), (False, "relu", True), (False, "gelu", True), (False, "relu", False)]


@HSET
@given(T=st.integers(1, 5), n=st.integers(1, 40), d=st.integers(1, 40),
       dtype=st.sampled_from([np.float16, np.float32]), kind=st.sampled_from(KINDS),
       seed=st.integers(0, 2**32 - 1))
def test_dense_ffn_matches_float64(path, small_blocks, T, n, d, dtype, kind, seed):
    gated, act, with_bias = kind
    rng = np.random.default_rng(seed)
    n_parts = 3 if gated else 2
    layers = [(rng.standard_normal((n, n_parts * d)) * 0.4).astype(dtype) for _ in range(2)]
    b_up = [rng.standard_normal(n).astype(np.float32) for _ in layers] if with_bias else None
    b_down = [rng.standard_normal(d).astype(np.float32) for _ in layers] if with_bias else None
    ffn = DenseFFN(layers, gated, act, b_up, b_down, n_threads=2)
    x = rng.standard_normal((T, d)).astype(np.float32)
    for layer in range(2):
        h = np.empty((T, n), np.float32)
        y = ffn(layer, x, h_out=h)
        assert y.shape == (T, d) and y.dtype == np.float32
        want, scale, want_h, h_scale = _ffn64(layers[layer], x, gated, act,
                                              None if b_up is None else b_up[layer],
                                              None if b_down is None else b_down[layer])
        _close(h, want_h, h_scale)
        _close(y, want, scale)


@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("parts,act", [(("gate", "up", "down"), "silu"), (("up", "down"), "relu")])
def test_dense_ffn_model_shapes(path, T, dtype, parts, act):
    rng = np.random.default_rng(T)
    n, d = 1536, 96
    B = (rng.standard_normal((n, len(parts) * d)) * 0.2).astype(dtype)
    gated = parts[0] == "gate"
    b_up = [rng.standard_normal(n).astype(np.float32)] if not gated else None
    b_down = [rng.standard_normal(d).astype(np.float32)] if not gated else None
    ffn = DenseFFN([B], parts, act, b_up, b_down)
    x = rng.standard_normal((T, d)).astype(np.float32)
    want, scale, _, _ = _ffn64(B, x, gated, act, None if gated else b_up[0],
                               None if gated else b_down[0])
    _close(ffn(0, x), want, scale)


def test_dense_ffn_t1_equals_row_of_t_many():
    # Decode (fused kernel) and prefill (BLAS blocks) agree on the same token.
    rng = np.random.default_rng(5)
    B = (rng.standard_normal((300, 3 * 64)) * 0.2).astype(np.float16)
    ffn = DenseFFN([B], True, "silu")
    x = rng.standard_normal((4, 64)).astype(np.float32)
    many = ffn(0, x)
    for t in range(4):
        np.testing.assert_allclose(ffn(0, x[t:t + 1])[0], many[t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(bundles=[]), "empty"),
    (dict(bundles=[np.zeros((4, 12), np.float64)]), "float16 or"),
    (dict(bundles=[np.zeros((4, 10), np.float16)]), "multiple"),
    (dict(bundles=[np.zeros((4, 12), np.float16), np.zeros((4, 15), np.float16)]), "same dim"),
    (dict(act="tanh"), "act must be"),
    (dict(gated=("w1", "w2")), "parts must be"),
    (dict(up_bias=[np.zeros(4, np.float32)]), "non-gated"),
    (dict(down_bias=[np.zeros(5, np.float32)]), "down_bias"),
    (dict(down_bias=[None, None]), "2 entries"),
])
def test_dense_ffn_bad_construction(kwargs, msg):
    args = dict(bundles=[np.zeros((4, 12), np.float16)], gated=True, act="silu")
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        DenseFFN(**args)


def test_dense_ffn_bad_call():
    ffn = DenseFFN([np.zeros((4, 12), np.float16)], True, "silu")
    with pytest.raises(ValueError, match="out of range"):
        ffn(1, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="x must be"):
        ffn(0, np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="x must be"):
        ffn(0, np.zeros((1, 4), np.float64))


# ------------------------------------------------------------------ thread policy

def test_default_threads_policy(monkeypatch):
    import os
    cap = min(os.cpu_count(), len(os.sched_getaffinity(0)))
    monkeypatch.delenv("FLASHRT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == cap
    monkeypatch.setenv("OMP_NUM_THREADS", "1,4")
    assert default_threads() == 1
    monkeypatch.setenv("FLASHRT_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert default_threads() == 1                       # FLASHRT_THREADS wins
    monkeypatch.setenv("FLASHRT_THREADS", "100000")
    assert default_threads() == cap                     # capped at the CPUs we have
    for bad in ("zero", "0", "-2"):
        monkeypatch.setenv("FLASHRT_THREADS", bad)
        with pytest.raises(ValueError, match="FLASHRT_THREADS"):
            default_threads()
