"""The compiled kernels against their NumPy twins (float64), on both code paths."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashrt._core import _reference_kernels as ref
from flashrt._core import kernels

from kernel_paths import fatrelu_threshold, path, threaded  # noqa: F401  (fixtures)

RTOL = 1e-5      # relative to the magnitude sum |w_j x_j| of each dot product

HSET = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _close(got, want, scale, rtol=RTOL):
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = rtol * scale + 1e-30
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


# ------------------------------------------------------------------ gemv

def _check_gemv(n, k, dtype, n_threads, seed):
    rng = np.random.default_rng(seed)
    W = _rand(rng, (n, k), dtype)
    x = _rand(rng, k, np.float32)
    out = np.full(n, np.nan, np.float32)
    assert kernels.gemv(W, x, out, n_threads) is out
    want = ref.gemv(W, x, np.empty(n, np.float32))
    scale = np.abs(W.astype(np.float64)) @ np.abs(x.astype(np.float64))
    _close(out, want, scale)


@HSET
@given(n=st.integers(0, 70), k=st.integers(0, 300), dtype=st.sampled_from([np.float16, np.float32]),
       n_threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_gemv_matches_twin(path, threaded, n, k, dtype, n_threads, seed):
    _check_gemv(n, k, dtype, n_threads, seed)


@pytest.mark.parametrize("n,k", [(576, 576), (192, 576), (1023, 577), (4099, 61), (5, 1729)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_threads", [0, 1, 2])
def test_gemv_model_shapes(path, n, k, dtype, n_threads):
    _check_gemv(n, k, dtype, n_threads, seed=n * 7 + k)


def test_gemv_exact_small_integers(path):
    # Small integers are exact in float16 and float32: the result must be exact too.
    rng = np.random.default_rng(1)
    W = rng.integers(-8, 9, size=(37, 45)).astype(np.float16)
    x = rng.integers(-8, 9, size=45).astype(np.float32)
    out = np.empty(37, np.float32)
    kernels.gemv(W, x, out)
    np.testing.assert_array_equal(out, W.astype(np.int64) @ x.astype(np.int64))


def test_gemv_accepts_readonly_inputs(path):
    W = np.ones((9, 17), np.float16)
    x = np.ones(17, np.float32)
    W.flags.writeable = False
    x.flags.writeable = False
    out = np.empty(9, np.float32)
    kernels.gemv(W, x, out)
    np.testing.assert_array_equal(out, 17.0)


# ------------------------------------------------------------------ ffn_rows

def _dot_abs(A, x):
    return np.abs(A) @ np.abs(x)


def _check_ffn(n, d, dtype, gated, act, with_bias, n_threads, seed):
    rng = np.random.default_rng(seed)
    n_parts = 3 if gated else 2
    rows = _rand(rng, (n, n_parts * d), dtype, scale=0.3)
    x = _rand(rng, d, np.float32)
    bias = _rand(rng, n, np.float32) if with_bias else None
    out = np.full(d, np.nan, np.float32)
    h = np.full(n, np.nan, np.float32)
    p = 0.0
    if act == "fatrelu":
        R0, x0 = rows.astype(np.float64), x.astype(np.float64)
        pre = R0[:, :d] @ x0 + (0 if bias is None else bias)
        p = fatrelu_threshold(pre, _dot_abs(R0[:, :d], x0) + 1.0)
    assert kernels.ffn_rows(rows, x, out, gated, act, bias, h, n_threads, act_param=p) is out
    want_h = np.empty(n, np.float32)
    want = ref.ffn_rows(rows, x, np.empty(d, np.float32), gated, act, bias, want_h, act_param=p)

    # Error scale of h: |act'| <= 1.13 times the error of its argument, plus the up error.
    R = rows.astype(np.float64)
    x64 = x.astype(np.float64)
    if gated:
        g = R[:, :d] @ x64
        u = R[:, d:2 * d] @ x64
        h_scale = 1.13 * _dot_abs(R[:, :d], x64) * np.abs(u) \
            + np.abs(ref.activation(g, act, p)) * _dot_abs(R[:, d:2 * d], x64)
    else:
        h_scale = 1.13 * (_dot_abs(R[:, :d], x64) + (0 if bias is None else np.abs(bias)))
    _close(h, want_h, h_scale)
    down = np.abs(R[:, (n_parts - 1) * d:])
    _close(out, want, (np.abs(want_h.astype(np.float64)) + h_scale) @ down)


@HSET
@given(n=st.integers(0, 60), d=st.integers(1, 150), dtype=st.sampled_from([np.float16, np.float32]),
       kind=st.sampled_from([(True, "silu", False), (True, "gelu", False), (False, "relu", True),
                             (False, "relu", False), (False, "gelu", True), (False, "silu", True),
                             (True, "relu", False), (True, "gelu_tanh", False), (True, "fatrelu", False),
                             (True, "drelu", False), (False, "gelu_tanh", True), (False, "fatrelu", True)]),
       n_threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_ffn_rows_matches_twin(path, threaded, n, d, dtype, kind, n_threads, seed):
    gated, act, with_bias = kind
    _check_ffn(n, d, dtype, gated, act, with_bias, n_threads, seed)


@pytest.mark.parametrize("n,d,gated,act,with_bias", [
    (1536, 576, True, "silu", False),        # SmolLM2-135M
    (777, 203, True, "silu", False),
    (2049, 96, False, "relu", True),         # OPT-like, odd row count
    (301, 257, False, "gelu", True),
    (1024, 256, True, "drelu", False),       # dReLU (TurboSparse), FATReLU (ProSparse), GeGLU
    (515, 96, True, "fatrelu", False),
    (300, 128, True, "gelu_tanh", False),
])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_ffn_rows_model_shapes(path, n, d, gated, act, with_bias, dtype, n_threads):
    _check_ffn(n, d, dtype, gated, act, with_bias, n_threads, seed=n + d)


def test_ffn_rows_act_codes_equal_names(path):
    rng = np.random.default_rng(3)
    rows = _rand(rng, (20, 3 * 24), np.float16)
    x = _rand(rng, 24, np.float32)
    a, b = np.empty(24, np.float32), np.empty(24, np.float32)
    for code, name in [(0, "silu"), (1, "relu"), (2, "gelu"), (3, "gelu_tanh"), (4, "fatrelu"), (5, "drelu")]:
        kernels.ffn_rows(rows, x, a, True, code, act_param=0.1)
        kernels.ffn_rows(rows, x, b, True, name, act_param=0.1)
        np.testing.assert_array_equal(a, b)
        assert kernels.ACT_CODES[name] == ref.ACT_CODES[name] == code


@pytest.mark.parametrize("act", ["relu", "fatrelu", "drelu"])
def test_ffn_rows_relu_gated_neurons_are_exactly_zero(path, act):
    """A gated neuron the ReLU-type activation cuts has h exactly 0 (and its down column, even
    inf, is never read): relu/fatrelu when gate.x <= threshold, drelu also when up.x <= 0."""
    d = 8
    rows = np.zeros((4, 3 * d), np.float32)
    rows[:, :d] = np.array([-1.0, 0.05, 1.0, 1.0])[:, None]   # gate.x = -8, 0.4, 8, 8
    rows[:, d:2 * d] = np.array([1.0, 1.0, 1.0, -1.0])[:, None]  # up.x = 8, 8, 8, -8
    rows[:, 2 * d:] = 1.0
    rows[0, 2 * d:] = np.inf
    x = np.ones(d, np.float32)
    h = np.empty(4, np.float32)
    out = np.empty(d, np.float32)
    kernels.ffn_rows(rows, x, out, True, act, None, h, act_param=0.5)
    want = {"relu": [0, 0.4 * 8, 64, -64], "fatrelu": [0, 0, 64, -64], "drelu": [0, 0.4 * 8, 64, 0]}[act]
    np.testing.assert_allclose(h, want, rtol=1e-6)
    assert h[0] == 0.0 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np.full(d, sum(want)), rtol=1e-6)


def test_ffn_rows_relu_skips_dead_neurons_exactly(path):
    # Dead neurons contribute nothing, even when their down column holds inf.
    rows = np.zeros((2, 2 * 8), np.float32)
    rows[0, :8] = -1.0           # up . x = -8 -> relu 0
    rows[0, 8:] = np.inf
    rows[1, :8] = 0.5            # up . x = 4
    rows[1, 8:] = 2.0
    x = np.ones(8, np.float32)
    out = np.empty(8, np.float32)
    h = np.empty(2, np.float32)
    kernels.ffn_rows(rows, x, out, False, "relu", h_out=h)
    np.testing.assert_array_equal(h, [0.0, 4.0])
    np.testing.assert_array_equal(out, 8.0)


def test_ffn_rows_empty(path):
    out = np.full(5, np.nan, np.float32)
    kernels.ffn_rows(np.zeros((0, 15), np.float16), np.ones(5, np.float32), out, True, 0,
                     h_out=np.zeros(0, np.float32))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "relu")])
def test_results_do_not_depend_on_thread_count(path, gated, act):
    # Chunking depends only on the shape and partial sums are reduced in chunk order.
    rng = np.random.default_rng(11)
    d = 200
    rows = _rand(rng, (3001, (3 if gated else 2) * d), np.float16, scale=0.2)
    x = _rand(rng, d, np.float32)
    got = []
    for n_threads in (1, 2, 3, 0):
        out = np.empty(d, np.float32)
        kernels.ffn_rows(rows, x, out, gated, act, n_threads=n_threads)
        got.append(out)
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])


def test_concurrent_callers_get_correct_results(path):
    # Python threads calling kernels at once (GIL released): one uses the pool, the others
    # run alone; all must be right.
    import threading
    rng = np.random.default_rng(12)
    W = _rand(rng, (4000, 300), np.float16)
    rows = _rand(rng, (2000, 3 * 100), np.float16, scale=0.2)
    xs = [_rand(rng, 300, np.float32) for _ in range(4)]
    xf = [_rand(rng, 100, np.float32) for _ in range(4)]
    want_g = [ref.gemv(W, x, np.empty(4000, np.float32)) for x in xs]
    want_f = [ref.ffn_rows(rows, x, np.empty(100, np.float32), True, 0) for x in xf]
    errors = []

    def work(t):
        try:
            for _ in range(30):
                out = kernels.gemv(W, xs[t], np.empty(4000, np.float32), 2)
                np.testing.assert_allclose(out, want_g[t], rtol=1e-4, atol=1e-4)
                out = kernels.ffn_rows(rows, xf[t], np.empty(100, np.float32), True, 0, n_threads=2)
                np.testing.assert_allclose(out, want_f[t], rtol=1e-4, atol=1e-4)
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


# ------------------------------------------------------------------ f16_to_f32, activation

def test_f16_to_f32_every_bit_pattern(path):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    src = bits.view(np.float16)
    out = np.empty(src.size, np.float32)
    kernels.f16_to_f32(src, out)
    want = src.astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))


@HSET
@given(n=st.integers(0, 5000), n_threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_f16_to_f32_any_length(path, threaded, n, n_threads, seed):
    src = np.random.default_rng(seed).standard_normal(n).astype(np.float16)
    out = np.empty(n, np.float32)
    kernels.f16_to_f32(src, out, n_threads)
    np.testing.assert_array_equal(out, ref.f16_to_f32(src, np.empty(n, np.float32)))


def test_f16_to_f32_shapes_may_differ():
    src = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    out = np.empty((6, 4), np.float32)
    kernels.f16_to_f32(src, out)
    np.testing.assert_array_equal(out.ravel(), np.arange(24))


@pytest.mark.parametrize("act", ["silu", "relu", "gelu", "gelu_tanh", "fatrelu", "drelu"])
def test_activation_inplace(threaded, act):
    a = np.linspace(-30, 30, 2001, dtype=np.float32).reshape(3, 667)
    want = ref.activation(a, act, 0.7)
    kernels.activation_inplace(a, act, 2, act_param=0.7)
    np.testing.assert_allclose(a, want, rtol=2e-6, atol=1e-7)


def test_activation_definitions():
    """The twin's activations are the published formulas (HF's ACT2FN; FATReLU: vLLM's
    F.threshold(x, t, 0); dReLU gated: relu on gate and up)."""
    v = np.array([-3.0, -0.5, 0.0, 0.1, 0.5, 0.70001, 3.0])
    np.testing.assert_allclose(ref.activation(v, "gelu_tanh"),
                               0.5 * v * (1 + np.tanh(0.7978845608028654 * (v + 0.044715 * v ** 3))), rtol=1e-12)
    np.testing.assert_array_equal(ref.activation(v, "fatrelu", 0.5), [0, 0, 0, 0, 0, 0.70001, 3.0])
    np.testing.assert_array_equal(ref.activation(v, "relu"), [0, 0, 0, 0.1, 0.5, 0.70001, 3.0])
    np.testing.assert_array_equal(ref.glu(v, -v, "drelu"), np.zeros_like(v))
    np.testing.assert_allclose(ref.glu(v, np.ones_like(v), "drelu"), np.maximum(v, 0))


# ------------------------------------------------------------------ bad input

F16W = np.zeros((4, 8), np.float16)
X8 = np.zeros(8, np.float32)
OUT4 = np.zeros(4, np.float32)
READONLY = np.zeros(4, np.float32)
READONLY.flags.writeable = False

BAD_GEMV = [
    (np.zeros((4, 8), np.float64), X8, OUT4, "W must be"),
    (np.zeros((4, 8), np.int16), X8, OUT4, "W must be"),
    (np.zeros((4, 16), np.float16)[:, ::2], X8, OUT4, "non-contiguous"),
    (np.zeros((4, 8, 1), np.float16), X8, OUT4, "2-D"),
    ([[0.0] * 8] * 4, X8, OUT4, "list"),
    (F16W, np.zeros(8, np.float64), OUT4, "x must be"),
    (F16W, np.zeros(9, np.float32), OUT4, "x has length 9"),
    (F16W, X8, np.zeros(5, np.float32), "out has length 5"),
    (F16W, X8, np.zeros(4, np.float16), "out must be"),
    (F16W, X8, READONLY, "writeable"),
]


@pytest.mark.parametrize("impl", [kernels, ref], ids=["kernels", "twin"])
@pytest.mark.parametrize("W,x,out,msg", BAD_GEMV)
def test_gemv_bad_input(impl, W, x, out, msg):
    with pytest.raises(ValueError) as e:
        impl.gemv(W, x, out)
    if impl is kernels:
        assert msg in str(e.value)


ROWS = np.zeros((4, 3 * 8), np.float16)
OUT8 = np.zeros(8, np.float32)
BAD_FFN = [
    (dict(rows=np.zeros((4, 2 * 8), np.float16)), "needs n_parts * d"),
    (dict(rows=ROWS.astype(np.float64)), "rows must be"),
    (dict(rows=np.zeros((4, 48), np.float16)[:, ::2]), "non-contiguous"),
    (dict(x=np.zeros(8, np.float16)), "x must be"),
    (dict(out=np.zeros(7, np.float32)), "out has length 7"),
    (dict(act=6), "act must be"),
    (dict(act="fatrelu", act_param=float("nan")), "act_param must be"),
    (dict(act="tanh"), "unknown activation"),
    (dict(up_bias=np.zeros(4, np.float32)), "only supported for non-gated"),
    (dict(gated=False, rows=np.zeros((4, 16), np.float16), up_bias=np.zeros(3, np.float32)),
     "up_bias has length 3"),
    (dict(h_out=np.zeros(5, np.float32)), "h_out has length 5"),
    (dict(h_out=np.zeros(4, np.float64)), "h_out must be"),
]


@pytest.mark.parametrize("impl", [kernels, ref], ids=["kernels", "twin"])
@pytest.mark.parametrize("kw,msg", BAD_FFN)
def test_ffn_rows_bad_input(impl, kw, msg):
    args = dict(rows=ROWS, x=X8, out=OUT8, gated=True, act="silu", up_bias=None, h_out=None)
    args.update(kw)
    with pytest.raises(ValueError) as e:
        impl.ffn_rows(**args)
    if impl is kernels:
        assert msg in str(e.value)


@pytest.mark.parametrize("impl", [kernels, ref], ids=["kernels", "twin"])
@pytest.mark.parametrize("src,out", [
    (np.zeros(8, np.float32), np.zeros(8, np.float32)),
    (np.zeros(8, np.float16), np.zeros(9, np.float32)),
    (np.zeros(16, np.float16)[::2], np.zeros(8, np.float32)),
    (np.zeros(8, np.float16), np.zeros(8, np.float64)),
])
def test_f16_to_f32_bad_input(impl, src, out):
    with pytest.raises(ValueError):
        impl.f16_to_f32(src, out)


# ------------------------------------------------------------------ path selection

def test_cpu_features_reports_path():
    f = kernels.cpu_features()
    assert f["path"] in ("avx2", "scalar")
    assert f["avx2_available"] == (f["avx2"] and f["fma"] and f["f16c"])
    if os.environ.get("FLASHRT_KERNELS") != "scalar":
        assert f["path"] == ("avx2" if f["avx2_available"] else "scalar")
    with pytest.raises(ValueError):
        kernels.set_path("sse9")


@pytest.mark.parametrize("env,want", [("scalar", "scalar"), ("", None)])
def test_env_var_forces_scalar(env, want):
    code = "from flashrt._core import kernels; print(kernels.cpu_features()['path'])"
    environ = dict(os.environ, FLASHRT_KERNELS=env)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environ["PYTHONPATH"] = root + os.pathsep + environ.get("PYTHONPATH", "")
    got = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, check=True).stdout.strip()
    if want is None:
        want = "avx2" if kernels.cpu_features()["avx2_available"] else "scalar"
    assert got == want
