"""The fused decode-step kernels (flashrt/_core/step.h: rms_norm, rope_, attend_one) against
the NumPy definitions in flashrt/models/base.py and a float64 computation, on both code
paths, and the dispatch in base.py (which path each shape takes)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashrt._core import kernels
from flashrt.models import base

from kernel_paths import path, threaded  # noqa: F401  (fixtures)

HSET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _rms_norm64(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _attention64(q, keys, values, scale, first):
    """One query (n_heads, hd) over keys/values[first:] (S, n_kv, hd), float64."""
    H, hd = q.shape
    group = H // keys.shape[1]
    out = np.empty((H, hd))
    for h in range(H):
        k = keys[first:, h // group].astype(np.float64)
        v = values[first:, h // group].astype(np.float64)
        s = k @ q[h].astype(np.float64) * scale
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v
    return out.reshape(-1)


@HSET
@given(T=st.integers(1, 5), d=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       log_scale=st.floats(-8, 8), eps=st.sampled_from([1e-5, 1e-6, 1e-2]))
def test_rms_norm_matches_float64(path, T, d, seed, log_scale, eps):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((T, d)) * 2.0 ** log_scale).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    got = kernels.rms_norm(x, w, eps, np.empty_like(x))
    want = _rms_norm64(x, w, eps)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(got, base.rms_norm_numpy(x, w, eps), rtol=5e-6, atol=1e-30)


def test_rms_norm_in_place_and_zero_rows(path):
    x = np.zeros((2, 8), np.float32)
    x[1] = 3.0
    w = np.full(8, 2.0, np.float32)
    got = kernels.rms_norm(x, w, 1e-5, x)          # out aliases x
    assert got is x
    np.testing.assert_array_equal(x[0], 0.0)
    np.testing.assert_allclose(x[1], 2.0 * 3.0 / np.sqrt(9.0 + 1e-5), rtol=1e-6)


@HSET
@given(T=st.integers(1, 4), H=st.integers(1, 9), half=st.integers(1, 40), start=st.integers(0, 300),
       seed=st.integers(0, 2**32 - 1))
def test_rope_equals_numpy_bit_for_bit(path, T, H, half, start, seed):
    rng = np.random.default_rng(seed)
    rope = base.Rope(2 * half, 10000.0, n_positions=8)
    x = rng.standard_normal((T, H, 2 * half)).astype(np.float32)
    want = x.copy()
    rope.apply_(x, start)                            # grows the tables, then the kernel
    rope.apply_numpy_(want, start)
    np.testing.assert_array_equal(x, want)


@HSET
@given(S=st.integers(1, 70), n_kv=st.integers(1, 3), group=st.integers(1, 4), hd=st.integers(1, 40),
       window=st.one_of(st.none(), st.integers(1, 80)), seed=st.integers(0, 2**32 - 1),
       log_scale=st.floats(-3, 3))
def test_attend_one_matches_float64_and_numpy(path, S, n_kv, group, hd, window, seed, log_scale):
    rng = np.random.default_rng(seed)
    H = n_kv * group
    q = (rng.standard_normal((1, H, hd)) * 2.0 ** log_scale).astype(np.float32)
    keys = rng.standard_normal((S, n_kv, hd)).astype(np.float32)
    values = rng.standard_normal((S, n_kv, hd)).astype(np.float32)
    scale = hd ** -0.5
    first = S - window if window is not None and S > window else 0
    got = base.attention(q, keys, values, S - 1, scale, window)            # the kernel
    np.testing.assert_allclose(got[0], _attention64(q[0], keys, values, scale, first), rtol=1e-4, atol=1e-5)
    want = base.attention_numpy(q, keys, values, S - 1, scale, window)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attend_one_long_context_softmax_is_stable(path):
    # Scores far apart (|q.k| ~ 1e3): the max-shift keeps exp finite; the peak key wins.
    S, hd = 2000, 64
    keys = np.zeros((S, 1, hd), np.float32)
    keys[1234, 0, 0] = 50.0
    values = np.arange(S, dtype=np.float32)[:, None, None] * np.ones((1, 1, hd), np.float32)
    q = np.zeros((1, hd), np.float32)
    q[0, 0] = 50.0
    out = kernels.attend_one(q, keys, values, 1.0, 0, np.empty(hd, np.float32))
    np.testing.assert_allclose(out, 1234.0, rtol=1e-6)


def test_dispatch_takes_numpy_for_what_the_kernels_do_not_cover():
    rng = np.random.default_rng(5)
    # float16 caches and T > 1 go through NumPy (and agree with the float32 kernel).
    q = rng.standard_normal((1, 4, 8)).astype(np.float32)
    keys = rng.standard_normal((6, 2, 8)).astype(np.float32)
    values = rng.standard_normal((6, 2, 8)).astype(np.float32)
    k16, v16 = keys.astype(np.float16), values.astype(np.float16)
    got16 = base.attention(q, k16, v16, 5, 0.3)
    want = base.attention(q, k16.astype(np.float32), v16.astype(np.float32), 5, 0.3)
    np.testing.assert_allclose(got16, want, rtol=1e-5, atol=1e-6)
    # a non-contiguous x still norms (NumPy path) to the same values
    x = rng.standard_normal((3, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    np.testing.assert_allclose(base.rms_norm(x[:, ::2], w[::2], 1e-5),
                               base.rms_norm(np.ascontiguousarray(x[:, ::2]), np.ascontiguousarray(w[::2]), 1e-5),
                               rtol=5e-6)


@pytest.mark.parametrize("call", [
    lambda: kernels.rms_norm(np.zeros((2, 4), np.float64), np.zeros(4, np.float32), 1e-5, np.zeros((2, 4), np.float32)),
    lambda: kernels.rms_norm(np.zeros((2, 4), np.float32), np.zeros(5, np.float32), 1e-5, np.zeros((2, 4), np.float32)),
    lambda: kernels.rope_(np.zeros((1, 2, 5), np.float32), np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)),
    lambda: kernels.rope_(np.zeros((2, 2, 4), np.float32), np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)),
    lambda: kernels.attend_one(np.zeros((3, 4), np.float32), np.zeros((5, 2, 4), np.float32),
                               np.zeros((5, 2, 4), np.float32), 1.0, 0, np.zeros(12, np.float32)),
    lambda: kernels.attend_one(np.zeros((2, 4), np.float32), np.zeros((5, 2, 4), np.float32),
                               np.zeros((5, 2, 4), np.float32), 1.0, 5, np.zeros(8, np.float32)),
])
def test_bad_arguments_name_the_problem(call):
    with pytest.raises(ValueError, match=r"rms_norm|rope_|attend_one"):
        call()


def test_the_numpy_twins_agree_with_the_kernels(path):
    from flashrt._core import _reference_kernels as ref
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 50)).astype(np.float32)
    w = rng.standard_normal(50).astype(np.float32)
    np.testing.assert_allclose(ref.rms_norm(x, w, 1e-6, np.empty_like(x)),
                               kernels.rms_norm(x, w, 1e-6, np.empty_like(x)), rtol=2e-6)
    q = rng.standard_normal((2, 6, 16)).astype(np.float32)
    cos = rng.standard_normal((2, 8)).astype(np.float32)
    sin = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(ref.rope_(q.copy(), cos, sin), kernels.rope_(q.copy(), cos, sin))
    keys = rng.standard_normal((30, 2, 16)).astype(np.float32)
    values = rng.standard_normal((30, 2, 16)).astype(np.float32)
    np.testing.assert_allclose(ref.attend_one(q[0], keys, values, 0.25, 7, np.empty(96, np.float32)),
                               kernels.attend_one(q[0], keys, values, 0.25, 7, np.empty(96, np.float32)),
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- attn_step

def _step_case(rng, storage, n_heads, n_kv, hd, d, S, pos, biases):
    """Weights (as the kernels take them), norms, rotary rows and a filled cache for attn_step."""
    from flashrt.quant import QMatrix

    n_qkv = (n_heads + 2 * n_kv) * hd

    def mat(n, k):
        W = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        if storage in ("q8_0", "q4_0", "q4_1"):
            return QMatrix.from_float(W, storage).data, storage
        return W.astype(storage), None

    case = dict(
        in_w=rng.uniform(0.5, 1.5, d).astype(np.float32), post_w=rng.uniform(0.5, 1.5, d).astype(np.float32),
        Wqkv=mat(n_qkv, d), Wo=mat(d, n_heads * hd),
        bqkv=rng.standard_normal(n_qkv).astype(np.float32) if biases else None,
        bo=rng.standard_normal(d).astype(np.float32) if biases else None,
        cos=rng.uniform(-1, 1, hd // 2).astype(np.float32), sin=rng.uniform(-1, 1, hd // 2).astype(np.float32),
        K=rng.standard_normal((S, n_kv, hd)).astype(np.float32), V=rng.standard_normal((S, n_kv, hd)).astype(np.float32),
        x=rng.standard_normal(d).astype(np.float32) * 3, add=rng.standard_normal(d).astype(np.float32))
    return case


def _run_step(k, c, n_heads, pos, first, scale, with_add):
    """attn_step of module k (kernels or the twin) on copies of case c: (x, xn, K, V)."""
    x, K, V = c["x"].copy(), c["K"].copy(), c["V"].copy()
    n_qkv = c["Wqkv"][0].shape[0]
    xn = np.full(x.shape, np.nan, np.float32)
    k.attn_step(x, c["add"] if with_add else None, c["in_w"], c["post_w"], 1e-5, *c["Wqkv"], c["bqkv"], *c["Wo"],
                c["bo"], n_heads, c["cos"], c["sin"], K, V, pos, first, scale, np.empty(n_qkv, np.float32),
                np.empty(n_heads * K.shape[2], np.float32), np.empty(x.shape[0], np.float32), xn, 2)
    return x, xn, K, V


def _unfused_step(c, n_heads, pos, first, scale, with_add):
    """The same step as the separate kernel calls and NumPy adds llama.Model ran before attn_step."""
    from flashrt.linear import linear
    from flashrt.quant import QMatrix

    def W(m):
        data, qtype = m
        return QMatrix(data, qtype) if qtype else data

    x, K, V = c["x"].copy()[None], c["K"].copy(), c["V"].copy()
    n_kv, hd = K.shape[1:]
    nq, nk = n_heads * hd, n_kv * hd
    if with_add:
        x += c["add"]
    qkv = linear(W(c["Wqkv"]), base.rms_norm(x, c["in_w"], 1e-5), c["bqkv"], n_threads=2)[0]
    q, k, v = qkv[:nq].reshape(1, n_heads, hd), qkv[nq:nq + nk].reshape(1, n_kv, hd), qkv[nq + nk:].reshape(1, n_kv, hd)
    kernels.rope_(q, c["cos"][None], c["sin"][None])
    kernels.rope_(k, c["cos"][None], c["sin"][None])
    K[pos], V[pos] = k[0], v[0]
    att = kernels.attend_one(q[0], K[:pos + 1], V[:pos + 1], scale, first, np.empty(nq, np.float32))
    x += linear(W(c["Wo"]), att[None], c["bo"], n_threads=2)
    return x[0], base.rms_norm(x, c["post_w"], 1e-5)[0], K, V


@pytest.mark.parametrize("storage", ["float32", "float16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("n_heads, n_kv, hd, d, pos, first, biases, with_add", [
    (3, 1, 32, 64, 0, 0, False, False),     # the first position; one kv head
    (4, 2, 16, 96, 6, 0, True, True),       # biases, GQA
    (2, 2, 48, 32, 9, 4, False, True),      # a sliding window's left edge
    (6, 2, 16, 64, 90, 3, True, True),      # >= 64 scores per head: heads split across threads
])
def test_attn_step_is_the_separate_calls_bit_for_bit(path, threaded, storage, n_heads, n_kv, hd, d, pos, first,
                                                     biases, with_add):
    """The fused decode step equals the separate rms_norm / gemv / rope_ / attend_one / NumPy adds
    bit for bit (x, the FFN's input xn and the cache row it writes), for every storage type;
    rows of the cache other than pos are untouched; and it agrees with the NumPy twin."""
    from flashrt._core import _reference_kernels as ref

    rng = np.random.default_rng(n_heads * 100 + d + pos)
    S = max(12, pos + 3)
    c = _step_case(rng, storage, n_heads, n_kv, hd, d, S, pos, biases)
    scale = hd ** -0.5
    got = _run_step(kernels, c, n_heads, pos, first, scale, with_add)
    want = _unfused_step(c, n_heads, pos, first, scale, with_add)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    others = np.arange(S) != pos
    np.testing.assert_array_equal(got[2][others], c["K"][others])
    np.testing.assert_array_equal(got[3][others], c["V"][others])
    twin = _run_step(ref, c, n_heads, pos, first, scale, with_add)
    for g, w in zip(got, twin):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


def test_attn_step_bad_arguments_name_the_problem():
    rng = np.random.default_rng(3)
    c = _step_case(rng, "float32", 2, 1, 16, 32, 8, 3, False)
    good = dict(x=c["x"], add=None, in_w=c["in_w"], post_w=c["post_w"], eps=1e-5, Wqkv=c["Wqkv"][0], qkv_qtype=None,
                bqkv=None, Wo=c["Wo"][0], o_qtype=None, bo=None, n_heads=2, cos_row=c["cos"], sin_row=c["sin"],
                K=c["K"], V=c["V"], pos=3, first=0, scale=0.25, qkv=np.empty(64, np.float32),
                att=np.empty(32, np.float32), o=np.empty(32, np.float32), xn=np.empty(32, np.float32))
    kernels.attn_step(**good)
    for change, match in [(dict(pos=8), "max_seq"), (dict(first=4), "first"), (dict(first=-1), "first"),
                          (dict(add=np.zeros(31, np.float32)), "add"), (dict(Wqkv=c["Wqkv"][0][:-1]), "Wqkv"),
                          (dict(Wqkv=c["Wqkv"][0].astype(np.uint8)), "qtype"), (dict(xn=np.empty(32)), "xn"),
                          (dict(V=c["V"][:4]), "K and V"), (dict(bo=np.zeros(33, np.float32)), "bo")]:
        with pytest.raises(ValueError, match=match):
            kernels.attn_step(**{**good, **change})
