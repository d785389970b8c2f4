"""The block-quantized kernels (q8_0, q4_0, q4_1) against their NumPy twins and gguf, on both
code paths: dequantization bit for bit with gguf.quants.dequantize, the activation quantizer
byte for byte with the twin, GEMV and the bundled FFN within float32 rounding of the twin's
float64 dequant(W) @ dequant(quant(x))."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQ
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashrt._core import _reference_kernels as ref
from flashrt._core import kernels

from kernel_paths import fatrelu_threshold, path, threaded  # noqa: F401  (fixtures)

RTOL = 1e-5      # relative to the magnitude sum |w_j xq_j| of each dot product
QTYPES = ["q8_0", "q4_0", "q4_1"]
GGUF_TYPE = {"q8_0": GQ.Q8_0, "q4_0": GQ.Q4_0, "q4_1": GQ.Q4_1}
HSET = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _quant(values, qtype):
    """float32 (n, k) -> uint8 (n, row_bytes) blocks, quantized by gguf (ggml's reference)."""
    values = np.ascontiguousarray(values, np.float32)
    if values.size == 0:
        return np.zeros((values.shape[0], kernels.row_bytes(qtype, values.shape[1])), np.uint8)
    return gguf_quantize(values, GGUF_TYPE[qtype])


def _rand_blocks(rng, n, k, qtype, scale=1.0):
    return _quant(rng.standard_normal((n, k)) * scale, qtype)


def _close(got, want, scale, rtol=RTOL):
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = rtol * scale + 1e-30
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def _xq64(x):
    q, d, _ = ref.quantize_activation(x)
    return (q.reshape(-1, 32).astype(np.float64) * d[:, None]).reshape(-1)


# ------------------------------------------------------------------ layout and dequantization

def test_row_bytes_match_gguf_blocks():
    for qtype in QTYPES:
        assert _quant(np.zeros((3, 96)), qtype).shape == (3, kernels.row_bytes(qtype, 96))
        assert kernels.row_bytes(qtype, 96) == ref.row_bytes(qtype, 96)
        assert kernels.BLOCK_BYTES[qtype] == ref.BLOCK_BYTES[qtype]
    assert kernels.row_bytes("float16", 7) == 14
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.row_bytes("q8_0", 33)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_bit_exact_with_gguf(path, threaded, qtype):
    rng = np.random.default_rng(5)
    vals = rng.standard_normal((13, 320)) * np.exp(rng.uniform(-12, 6, (13, 1)))
    vals[0] = 0.0                                          # all-zero blocks: d = 0
    vals[1, :32] = 65000.0                                 # near float16 max
    blocks = _quant(vals, qtype)
    raw = rng.integers(0, 256, blocks.shape, dtype=np.uint8)   # arbitrary bytes too
    raw.reshape(-1, kernels.BLOCK_BYTES[qtype])[:, 1] &= 0x3b  # finite float16 scales (|d| < 1)
    if qtype == "q4_1":
        raw.reshape(-1, 20)[:, 3] &= 0x3b
    for src in (blocks, raw):
        want = gguf_dequantize(src, GGUF_TYPE[qtype]).astype(np.float32)
        got = np.full(want.shape, np.nan, np.float32)
        assert kernels.to_f32(src, got, qtype, 2) is got
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(ref.dequantize(src, qtype).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", QTYPES)
def test_to_f32_of_a_single_row_and_empty(path, qtype):
    rng = np.random.default_rng(6)
    blocks = _rand_blocks(rng, 4, 64, qtype)
    out = np.empty(64, np.float32)
    kernels.to_f32(blocks[2], out, qtype)
    np.testing.assert_array_equal(out, ref.dequantize(blocks, qtype)[2])
    kernels.to_f32(np.zeros(0, np.uint8), np.zeros(0, np.float32), qtype)


def test_to_f32_float_types_equal_astype(path):
    rng = np.random.default_rng(7)
    for dt in (np.float16, np.float32):
        src = rng.standard_normal((5, 37)).astype(dt)
        out = np.empty((5, 37), np.float32)
        kernels.to_f32(src, out)
        np.testing.assert_array_equal(out, src.astype(np.float32))


# ------------------------------------------------------------------ activation quantizer

@HSET
@given(nb=st.integers(0, 12), seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-30, 30))
def test_quantize_activation_bytes_equal_twin(path, nb, seed, log_scale):
    x = (np.random.default_rng(seed).standard_normal(32 * nb) * np.exp(log_scale)).astype(np.float32)
    for got, want in zip(kernels.quantize_activation(x), ref.quantize_activation(x)):
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_quantize_activation_edge_cases(path):
    x = np.zeros(4 * 32, np.float32)
    x[32:64] = np.arange(-16, 16) + 0.5                    # ties after scaling: amax 16 -> id 127/16
    x[64] = 127.0
    x[65:96] = np.arange(31) - 15.5                        # id = 1: exact .5 ties -> even
    x[96:128] = 1e-40                                      # subnormals
    q, d, s = kernels.quantize_activation(x)
    rq, rd, rs = ref.quantize_activation(x)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(d.view(np.uint32), rd.view(np.uint32))
    np.testing.assert_array_equal(s.view(np.uint32), rs.view(np.uint32))
    assert d[0] == 0 and not q[:32].any()
    assert q[64] == 127 and np.abs(q).max() <= 127
    np.testing.assert_array_equal(q[65:96], np.rint(x[65:96]))     # half to even
    np.testing.assert_allclose(s, d * q.reshape(4, 32).sum(1, dtype=np.int64), rtol=1e-7)


# ------------------------------------------------------------------ gemv

def _check_gemv(n, k, qtype, n_threads, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    W = _rand_blocks(rng, n, k, qtype, scale)
    x = (rng.standard_normal(k) * scale).astype(np.float32)
    out = np.full(n, np.nan, np.float32)
    assert kernels.gemv(W, x, out, n_threads, qtype) is out
    want = ref.gemv(W, x, np.empty(n, np.float32), qtype=qtype)
    _close(out, want, np.abs(ref.dequantize(W, qtype).astype(np.float64)) @ np.abs(_xq64(x)))


@HSET
@given(n=st.integers(0, 40), nb=st.integers(0, 9), qtype=st.sampled_from(QTYPES),
       n_threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_gemv_matches_twin(path, threaded, n, nb, qtype, n_threads, seed):
    _check_gemv(n, 32 * nb, qtype, n_threads, seed)


@pytest.mark.parametrize("n,k", [(576, 576), (192, 576), (1023, 96), (5, 1728), (3, 32)])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_gemv_model_shapes(path, n, k, qtype, n_threads):
    _check_gemv(n, k, qtype, n_threads, seed=n * 7 + k, scale=0.05)


def test_gemv_quantized_is_close_to_float(path):
    # The quantized product is the float product of what the blocks hold, up to the int8
    # rounding of x (about 0.5/127 of each block's largest |x|).
    rng = np.random.default_rng(8)
    W = rng.standard_normal((64, 256)).astype(np.float32)
    x = rng.standard_normal(256).astype(np.float32)
    for qtype in QTYPES:
        B = _quant(W, qtype)
        got = kernels.gemv(B, x, np.empty(64, np.float32), 1, qtype)
        want = ref.dequantize(B, qtype).astype(np.float64) @ x
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


# ------------------------------------------------------------------ ffn_rows

def _check_ffn(n, d, qtype, gated, act, with_bias, n_threads, seed):
    rng = np.random.default_rng(seed)
    n_parts = 3 if gated else 2
    rows = _quant((rng.standard_normal((n * n_parts, d)) * 0.3), qtype).reshape(
        n, n_parts * kernels.row_bytes(qtype, d))
    x = rng.standard_normal(d).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    out = np.full(d, np.nan, np.float32)
    h = np.full(n, np.nan, np.float32)
    R = ref.dequantize(rows.reshape(n, n_parts, kernels.row_bytes(qtype, d)), qtype).reshape(n, n_parts * d).astype(np.float64)
    x64 = _xq64(x)
    dot_abs = lambda A: np.abs(A) @ np.abs(x64)  # noqa: E731
    p = 0.0
    if act == "fatrelu":
        p = fatrelu_threshold(R[:, :d] @ x64 + (0 if bias is None else bias), dot_abs(R[:, :d]) + 1.0)
    assert kernels.ffn_rows(rows, x, out, gated, act, bias, h, n_threads, qtype, act_param=p) is out
    want_h = np.empty(n, np.float32)
    want = ref.ffn_rows(rows, x, np.empty(d, np.float32), gated, act, bias, want_h, qtype=qtype, act_param=p)

    if gated:
        u = R[:, d:2 * d] @ x64
        h_scale = 1.13 * dot_abs(R[:, :d]) * np.abs(u) \
            + np.abs(ref.activation(R[:, :d] @ x64, act, p)) * dot_abs(R[:, d:2 * d])
    else:
        h_scale = 1.13 * (dot_abs(R[:, :d]) + (0 if bias is None else np.abs(bias)))
    _close(h, want_h, h_scale)
    _close(out, want, (np.abs(want_h.astype(np.float64)) + h_scale) @ np.abs(R[:, (n_parts - 1) * d:]))


KINDS = [(True, "silu", False), (True, "gelu", False), (False, "relu", True),
         (False, "relu", False), (False, "gelu", True), (True, "relu", False), (True, "gelu_tanh", False),
         (True, "fatrelu", False), (True, "drelu", False), (False, "fatrelu", True)]


@HSET
@given(n=st.integers(0, 30), nb=st.integers(1, 5), qtype=st.sampled_from(QTYPES),
       kind=st.sampled_from(KINDS), n_threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_ffn_rows_matches_twin(path, threaded, n, nb, qtype, kind, n_threads, seed):
    gated, act, with_bias = kind
    _check_ffn(n, 32 * nb, qtype, gated, act, with_bias, n_threads, seed)


@pytest.mark.parametrize("n,d,gated,act,with_bias", [
    (1536, 576, True, "silu", False),        # SmolLM2-135M
    (777, 224, True, "silu", False),
    (2049, 96, False, "relu", True),         # OPT-like, odd row count
])
@pytest.mark.parametrize("qtype", QTYPES)
def test_ffn_rows_model_shapes(path, n, d, gated, act, with_bias, qtype):
    _check_ffn(n, d, qtype, gated, act, with_bias, 2, seed=n + d)


@pytest.mark.parametrize("qtype,down_qtype", [("q4_1", "q8_0"), ("q4_0", "q8_0"), ("q8_0", "q4_1")])
@pytest.mark.parametrize("gated,act,n", [(True, "silu", 301), (False, "relu", 77)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_ffn_rows_with_another_down_type(path, threaded, qtype, down_qtype, gated, act, n, n_threads):
    # A bundle whose down column is stored in another type (GGUF import keeps 4-bit gate/up
    # blocks and re-blocks the down projection as q8_0).
    rng = np.random.default_rng(n)
    d, n_parts = 96, 3 if gated else 2
    gu = _quant(rng.standard_normal((n * (n_parts - 1), d)) * 0.3, qtype).reshape(n, -1)
    down = _quant(rng.standard_normal((n, d)) * 0.3, down_qtype)
    rows = np.ascontiguousarray(np.concatenate([gu, down], axis=1))
    x = rng.standard_normal(d).astype(np.float32)
    bias = None if gated else rng.standard_normal(n).astype(np.float32)
    h, want_h = np.empty(n, np.float32), np.empty(n, np.float32)
    got = kernels.ffn_rows(rows, x, np.empty(d, np.float32), gated, act, bias, h, n_threads,
                           qtype, down_qtype)
    want = ref.ffn_rows(rows, x, np.empty(d, np.float32), gated, act, bias, want_h, qtype=qtype,
                        down_qtype=down_qtype)
    D = ref.dequantize(down, down_qtype).astype(np.float64)
    G = ref.dequantize(gu.reshape(n, n_parts - 1, -1), qtype).reshape(n, -1).astype(np.float64)
    h_scale = 1.13 * (np.abs(G) @ np.abs(np.tile(_xq64(x), n_parts - 1))) * (1 + np.abs(want_h))
    _close(h, want_h, h_scale)
    _close(got, want, (np.abs(want_h.astype(np.float64)) + h_scale) @ np.abs(D))
    with pytest.raises(ValueError, match="bytes per row"):
        kernels.ffn_rows(rows, x, np.empty(d, np.float32), gated, act, bias, None, 1, qtype)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_results_do_not_depend_on_thread_count(path, qtype):
    rng = np.random.default_rng(11)
    d = 192
    rows = _quant(rng.standard_normal((3 * 3001, d)) * 0.2, qtype).reshape(3001, -1)
    W = _rand_blocks(rng, 2001, d, qtype)
    x = rng.standard_normal(d).astype(np.float32)
    got_f, got_g = [], []
    for n_threads in (1, 2, 3, 0):
        got_f.append(kernels.ffn_rows(rows, x, np.empty(d, np.float32), True, "silu",
                                      n_threads=n_threads, qtype=qtype))
        got_g.append(kernels.gemv(W, x, np.empty(2001, np.float32), n_threads, qtype))
    for f, g in zip(got_f[1:], got_g[1:]):
        np.testing.assert_array_equal(f, got_f[0])
        np.testing.assert_array_equal(g, got_g[0])


@pytest.mark.parametrize("qtype", QTYPES + [None])
def test_prefetch_changes_no_result(path, qtype):
    # The software prefetch is a hint ahead of the loops: on or off, every result is the same
    # bit for bit, also for row counts around the prefetch distance (where it stops early).
    rng = np.random.default_rng(12)
    d = 96
    old = kernels._set_prefetch(0)
    try:
        for n in (1, 3, 4, 7, 9, 12, 13, 40, 301):
            R = rng.standard_normal((3 * n, d)).astype(np.float32) * 0.2
            rows = (R.astype(np.float16) if qtype is None else _quant(R, qtype)).reshape(n, -1)
            W = rows.reshape(3 * n, -1)
            x = rng.standard_normal(d).astype(np.float32)
            got = []
            for ahead in (0, 1, old, 8):
                kernels._set_prefetch(ahead)
                got.append((kernels.ffn_rows(rows, x, np.empty(d, np.float32), True, "silu", qtype=qtype),
                            kernels.gemv(W, x, np.empty(3 * n, np.float32), 1, qtype)))
            for f, g in got[1:]:
                np.testing.assert_array_equal(f, got[0][0])
                np.testing.assert_array_equal(g, got[0][1])
    finally:
        kernels._set_prefetch(old)


def test_relu_skips_dead_neurons_exactly(path):
    # A dead neuron's down blocks are never read: an inf scale there changes nothing.
    up = np.full((2, 32), 1.0, np.float32)
    up[0] = -1.0                                            # up . x = -32 -> relu 0
    down = np.full((2, 32), 0.5, np.float32)
    rows = np.concatenate([_quant(up, "q8_0"), _quant(down, "q8_0")], axis=1)
    rows[0, 34:36] = np.array([np.inf], np.float16).view(np.uint8)
    out = np.empty(32, np.float32)
    h = np.empty(2, np.float32)
    kernels.ffn_rows(rows, np.ones(32, np.float32), out, False, "relu", h_out=h, qtype="q8_0")
    assert h[0] == 0.0
    np.testing.assert_allclose(h[1], 32.0, rtol=1e-3)
    np.testing.assert_allclose(out, 0.5 * h[1], rtol=1e-3)      # finite: row 0's down unread


# ------------------------------------------------------------------ bad input

Q8 = np.zeros((4, 68), np.uint8)        # 4 rows of 64 q8_0 weights
X64 = np.zeros(64, np.float32)


@pytest.mark.parametrize("impl", [kernels, ref], ids=["kernels", "twin"])
@pytest.mark.parametrize("W,x,qtype,msg", [
    (Q8, X64, None, "qtype"),
    (Q8, X64, "q5_k", "unknown qtype"),
    (Q8.view(np.int8), X64, "q8_0", "uint8"),
    (Q8, np.zeros(48, np.float32), "q8_0", "multiple of 32"),
    (Q8, np.zeros(96, np.float32), "q8_0", "bytes per row"),
    (np.zeros((4, 64), np.float16), X64, "q8_0", "uint8"),
    (Q8[:, ::2], np.zeros(32, np.float32), "q8_0", "non-contiguous"),
])
def test_gemv_quantized_bad_input(impl, W, x, qtype, msg):
    with pytest.raises(ValueError) as e:
        impl.gemv(W, x, np.zeros(4, np.float32), qtype=qtype)
    if impl is kernels:
        assert msg in str(e.value)


def test_ffn_rows_quantized_bad_input():
    rows = np.zeros((4, 3 * 68), np.uint8)
    with pytest.raises(ValueError, match="bytes per row"):
        kernels.ffn_rows(rows, np.zeros(64, np.float32), np.zeros(64, np.float32), False, "relu",
                         qtype="q8_0")
    with pytest.raises(ValueError, match="qtype"):
        kernels.ffn_rows(rows, X64, np.zeros(64, np.float32), True, "silu")
    with pytest.raises(ValueError, match="whole number"):
        kernels.to_f32(np.zeros(35, np.uint8), np.zeros(32, np.float32), "q8_0")
    with pytest.raises(ValueError, match="elements"):
        kernels.to_f32(np.zeros(34, np.uint8), np.zeros(33, np.float32), "q8_0")
