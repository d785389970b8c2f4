/* quant.h -- block-quantized storage types and their inner loops (included by simd.h).
 *
 * Storage types (the `type` codes every kernel takes):
 *   FRT_T_F32, FRT_T_F16      one element per 4 or 2 bytes;
 *   FRT_T_Q8_0  block of 32 = float16 d, int8 q[32]              (34 bytes)  w = d * q
 *   FRT_T_Q4_0  block of 32 = float16 d, uint8 qs[16]            (18 bytes)  w = d * (q - 8)
 *   FRT_T_Q4_1  block of 32 = float16 d, float16 m, uint8 qs[16] (20 bytes)  w = d * q + m
 * byte for byte ggml's block_q8_0 / block_q4_0 / block_q4_1, so GGUF rows copy in unchanged.
 * In the 4-bit blocks element j < 16 is the low nibble of qs[j], element j + 16 its high nibble.
 * A row of k elements (k a multiple of 32) is k / 32 blocks back to back.
 *
 * Dot products against a float32 vector x use integer arithmetic: x is first quantized per
 * block of 32 (frt_quantize_x: d_x = amax / 127 (0 when amax < 1e-30), q_x = round-to-nearest-even(x / d_x), and
 * s_x = d_x * sum(q_x)), then per block
 *     q8_0:  d * d_x * sum(q * q_x)
 *     q4_0:  d * d_x * sum(q * q_x) - 8 * d * s_x
 *     q4_1:  d * d_x * sum(q * q_x) + m * s_x
 * which is exactly dequant(w) . dequant(quant(x)) up to float32 rounding (the NumPy twin's
 * definition). AVX2 does sum(q * q_x) with maddubs (u8 x s8 pair sums) + madd: ~2x fewer
 * instructions than converting the weights to float in registers (measured in
 * bench/bench_kernels.py). The FFN's down projection (out += h * down_i) has no second vector
 * to quantize, so it dequantizes in registers.
 *
 * Every path must agree: the scalar and AVX2 quantizers of x produce identical bytes
 * (tests compare both with the twin bit for bit); dequantization is bit-exact with
 * gguf.quants.dequantize (float32 multiply, then add, never fused).
 */
#ifndef FLASHRT_QUANT_H
#define FLASHRT_QUANT_H

#define FRT_T_F32 0
#define FRT_T_F16 1
#define FRT_T_Q8_0 2
#define FRT_T_Q4_0 3
#define FRT_T_Q4_1 4
#define FRT_N_TYPES 5
#define FRT_QK 32

static inline int frt_type_is_quant(int t) { return t >= FRT_T_Q8_0 && t < FRT_N_TYPES; }

/* Bytes per block of 32 elements (quantized types) or per element (float types). */
static inline int64_t frt_type_unit_bytes(int t) {
    switch (t) {
    case FRT_T_F32: return 4;
    case FRT_T_F16: return 2;
    case FRT_T_Q8_0: return 34;
    case FRT_T_Q4_0: return 18;
    case FRT_T_Q4_1: return 20;
    default: return 0;
    }
}

/* Bytes of a row of k elements (k % 32 == 0 for quantized types). */
static inline int64_t frt_row_bytes(int t, int64_t k) {
    return frt_type_is_quant(t) ? (k / FRT_QK) * frt_type_unit_bytes(t) : k * frt_type_unit_bytes(t);
}

static inline float frt_ld_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return frt_half_to_float(h);
}

/* Keep a float32 product rounded on its own (no fused multiply-add across this point). */
#if FRT_X86 && (defined(__GNUC__) || defined(__clang__))
#define FRT_NOFUSE(v) __asm__("" : "+x"(v))
#else
#define FRT_NOFUSE(v) do { volatile float frt_nf_ = (v); (v) = frt_nf_; } while (0)
#endif

/* ------------------------------------------------------------------ scalar path */

/* Round to nearest, ties to even, for |v| < 2^22 (adding 1.5 * 2^23 leaves no fraction bits).
   The add and subtract are separate float32 operations; GCC/clang do not reassociate them
   without -ffast-math. */
static inline float frt_rint_small(float v) {
    volatile float big = 12582912.0f;
    float b = big;
    return (v + b) - b;
}

/* Blocks of x whose largest |x| is below this are taken as zero (1 / d would overflow). */
#define FRT_XQ_TINY 1e-30f

/* x (k,) -> q (k,) int8, d (k/32,), s (k/32,): per block d = amax / 127, q = rint(x * (1/d)),
   s = d * sum(q). k % 32 == 0. */
static void frt_quantize_x_scalar(const float *x, int64_t k, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < k / FRT_QK; b++) {
        const float *xb = x + b * FRT_QK;
        float amax = 0.0f;
        for (int j = 0; j < FRT_QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float db = amax >= FRT_XQ_TINY ? amax / 127.0f : 0.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < FRT_QK; j++) {
            int32_t v = (int32_t)frt_rint_small(xb[j] * id);
            q[b * FRT_QK + j] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = db * (float)sum;
    }
}

/* out4[r] = row_r . x for four rows (pointers may repeat), nb blocks each. */
static void frt_qdot4_q8_0_scalar(const uint8_t *const w[4], const int8_t *xq, const float *xd,
                                  const float *xs, int64_t nb, float *out4) {
    (void)xs;
    for (int r = 0; r < 4; r++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w[r] + b * 34;
            const int8_t *qw = (const int8_t *)(blk + 2), *qx = xq + b * FRT_QK;
            int32_t isum = 0;
            for (int j = 0; j < FRT_QK; j++) isum += (int32_t)qw[j] * (int32_t)qx[j];
            acc += (float)isum * (frt_ld_half(blk) * xd[b]);
        }
        out4[r] = acc;
    }
}

#define FRT_DEFINE_Q4_SCALAR(SUF, BS, QOFF, HAS_MIN)                                          \
static void frt_qdot4_##SUF##_scalar(const uint8_t *const w[4], const int8_t *xq,           \
                                     const float *xd, const float *xs, int64_t nb,          \
                                     float *out4) {                                         \
    for (int r = 0; r < 4; r++) {                                                           \
        float acc = 0.0f, off = 0.0f;                                                       \
        for (int64_t b = 0; b < nb; b++) {                                                  \
            const uint8_t *blk = w[r] + b * (BS), *qs = blk + (QOFF);                        \
            const int8_t *qx = xq + b * FRT_QK;                                             \
            int32_t isum = 0;                                                               \
            for (int j = 0; j < 16; j++)                                                    \
                isum += (int32_t)(qs[j] & 15) * qx[j] + (int32_t)(qs[j] >> 4) * qx[j + 16];  \
            float db = frt_ld_half(blk);                                                    \
            float mb = HAS_MIN ? frt_ld_half(blk + 2) : -8.0f * db;                         \
            acc += (float)isum * (db * xd[b]);                                              \
            off += mb * xs[b];                                                              \
        }                                                                                   \
        out4[r] = acc + off;                                                                \
    }                                                                                       \
}                                                                                           \
/* acc (32 nb) += h0 * w0 + h1 * w1 (w1 may be NULL) */                                     \
static void frt_qaxpy2_##SUF##_scalar(float *acc, float h0, const uint8_t *w0, float h1,    \
                                      const uint8_t *w1, int64_t nb) {                      \
    for (int64_t b = 0; b < nb; b++) {                                                      \
        float *a = acc + b * FRT_QK;                                                        \
        for (int t = 0; t < 2; t++) {                                                       \
            const uint8_t *blk = t == 0 ? w0 + b * (BS) : (w1 ? w1 + b * (BS) : NULL);       \
            if (blk == NULL) break;                                                         \
            float h = t == 0 ? h0 : h1, db = frt_ld_half(blk);                              \
            float c = h * db, o = h * (HAS_MIN ? frt_ld_half(blk + 2) : -8.0f * db);        \
            const uint8_t *qs = blk + (QOFF);                                               \
            for (int j = 0; j < 16; j++) {                                                  \
                a[j] += c * (float)(qs[j] & 15) + o;                                        \
                a[j + 16] += c * (float)(qs[j] >> 4) + o;                                   \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
/* out (32 nb) = dequant(blocks), bit-exact with gguf.quants.dequantize */                 \
static void frt_dequant_##SUF##_scalar(const uint8_t *src, float *out, int64_t nb) {         \
    for (int64_t b = 0; b < nb; b++) {                                                      \
        const uint8_t *blk = src + b * (BS), *qs = blk + (QOFF);                             \
        float db = frt_ld_half(blk), *o = out + b * FRT_QK;                                  \
        if (HAS_MIN) {                                                                      \
            float mb = frt_ld_half(blk + 2);                                                \
            for (int j = 0; j < 16; j++) {                                                  \
                float lo = db * (float)(qs[j] & 15), hi = db * (float)(qs[j] >> 4);         \
                FRT_NOFUSE(lo); FRT_NOFUSE(hi);                                             \
                o[j] = lo + mb; o[j + 16] = hi + mb;                                        \
            }                                                                               \
        } else {                                                                            \
            for (int j = 0; j < 16; j++) {                                                  \
                o[j] = db * (float)((int)(qs[j] & 15) - 8);                                 \
                o[j + 16] = db * (float)((int)(qs[j] >> 4) - 8);                            \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
}

FRT_DEFINE_Q4_SCALAR(q4_0, 18, 2, 0)
FRT_DEFINE_Q4_SCALAR(q4_1, 20, 4, 1)

static void frt_qaxpy2_q8_0_scalar(float *acc, float h0, const uint8_t *w0, float h1,
                                   const uint8_t *w1, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        float *a = acc + b * FRT_QK;
        const int8_t *q0 = (const int8_t *)(w0 + b * 34 + 2);
        float c0 = h0 * frt_ld_half(w0 + b * 34);
        if (w1 != NULL) {
            const int8_t *q1 = (const int8_t *)(w1 + b * 34 + 2);
            float c1 = h1 * frt_ld_half(w1 + b * 34);
            for (int j = 0; j < FRT_QK; j++) a[j] += c0 * (float)q0[j] + c1 * (float)q1[j];
        } else {
            for (int j = 0; j < FRT_QK; j++) a[j] += c0 * (float)q0[j];
        }
    }
}

/* acc (32 nb) += sum_r h[r] * w[r] over four q8_0 columns (h[r] == 0 rows add exactly 0),
   in the order the AVX2 twin below adds them: per element ((acc + c0 q0) + c1 q1) + ... */
static void frt_qaxpy4_q8_0_scalar(float *acc, const float h[4], const uint8_t *const w[4],
                                   int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        float *a = acc + b * FRT_QK;
        for (int r = 0; r < 4; r++) {
            const int8_t *q = (const int8_t *)(w[r] + b * 34 + 2);
            float c = h[r] * frt_ld_half(w[r] + b * 34);
            for (int j = 0; j < FRT_QK; j++) a[j] += c * (float)q[j];
        }
    }
}

static void frt_dequant_q8_0_scalar(const uint8_t *src, float *out, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = src + b * 34;
        const int8_t *q = (const int8_t *)(blk + 2);
        float db = frt_ld_half(blk);
        for (int j = 0; j < FRT_QK; j++) out[b * FRT_QK + j] = (float)q[j] * db;
    }
}

/* ------------------------------------------------------------------ AVX2 path */
#if FRT_X86

FRT_TARGET static void frt_quantize_x_avx2(const float *x, int64_t k, int8_t *q, float *d,
                                           float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < k / FRT_QK; b++) {
        const float *xb = x + b * FRT_QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float db = amax >= FRT_XQ_TINY ? amax / 127.0f : 0.0f;
        float id = db != 0.0f ? 1.0f / db : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rnd));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * FRT_QK), _mm256_permutevar8x32_epi32(p, perm));
        d[b] = db;
        s[b] = db * (float)_mm_cvtsi128_si32(s4);
    }
}

FRT_TARGET static inline float frt_ld_half_avx2(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 32 int8 pairs -> 8 int32 lane sums of q * x (q signed: sign trick so maddubs sees |q|). */
FRT_TARGET static inline __m256i frt_dot_i8_32(__m256i q, __m256i x) {
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* 16 bytes of nibbles -> 32 uint8 in element order (low nibbles, then high nibbles). */
FRT_TARGET static inline __m256i frt_unpack_q4(const uint8_t *qs) {
    __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* The float16 at byte offset o of four rows, as float32 x4 (one conversion for all four). */
FRT_TARGET static inline __m128 frt_ld_half4(const uint8_t *w0, const uint8_t *w1,
                                             const uint8_t *w2, const uint8_t *w3, int64_t o) {
    uint16_t h0, h1, h2, h3;
    memcpy(&h0, w0 + o, 2); memcpy(&h1, w1 + o, 2); memcpy(&h2, w2 + o, 2); memcpy(&h3, w3 + o, 2);
    return _mm_cvtph_ps(_mm_setr_epi16((short)h0, (short)h1, (short)h2, (short)h3, 0, 0, 0, 0));
}

/* Lane r of a 4-float vector broadcast to 8 lanes. */
#define FRT_BCAST(V4, R) _mm256_permutevar8x32_ps(_mm256_castps128_ps256(V4), _mm256_set1_epi32(R))

FRT_TARGET static void frt_qdot4_q8_0_avx2(const uint8_t *const w[4], const int8_t *xq,
                                           const float *xd, const float *xs, int64_t nb,
                                           float *out4) {
    (void)xs;
    const uint8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = 0; b < nb; b++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * FRT_QK));
        const int64_t o = b * 34;
        __m128 sc = _mm_mul_ps(frt_ld_half4(w0, w1, w2, w3, o), _mm_set1_ps(xd[b]));
#define FRT_Q8_ROW(W, A, R)                                                                   \
        A = _mm256_fmadd_ps(                                                                  \
            _mm256_cvtepi32_ps(frt_dot_i8_32(_mm256_loadu_si256((const __m256i *)(W + o + 2)), xv)), \
            FRT_BCAST(sc, R), A);
        FRT_Q8_ROW(w0, a0, 0) FRT_Q8_ROW(w1, a1, 1) FRT_Q8_ROW(w2, a2, 2) FRT_Q8_ROW(w3, a3, 3)
#undef FRT_Q8_ROW
    }
    _mm_storeu_ps(out4, frt_hsum8x4(a0, a1, a2, a3));
}

FRT_TARGET static void frt_qaxpy2_q8_0_avx2(float *acc, float h0, const uint8_t *w0, float h1,
                                            const uint8_t *w1, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        float *a = acc + b * FRT_QK;
        const uint8_t *q0 = w0 + b * 34 + 2;
        __m256 c0 = _mm256_set1_ps(h0 * frt_ld_half_avx2(w0 + b * 34));
        if (w1 != NULL) {
            const uint8_t *q1 = w1 + b * 34 + 2;
            __m256 c1 = _mm256_set1_ps(h1 * frt_ld_half_avx2(w1 + b * 34));
            for (int g = 0; g < 4; g++) {
                __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q0 + 8 * g))));
                __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q1 + 8 * g))));
                __m256 v = _mm256_fmadd_ps(f0, c0, _mm256_loadu_ps(a + 8 * g));
                _mm256_storeu_ps(a + 8 * g, _mm256_fmadd_ps(f1, c1, v));
            }
        } else {
            for (int g = 0; g < 4; g++) {
                __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q0 + 8 * g))));
                _mm256_storeu_ps(a + 8 * g, _mm256_fmadd_ps(f0, c0, _mm256_loadu_ps(a + 8 * g)));
            }
        }
    }
}

/* acc (32 nb) += sum_r h[r] * w[r] over four q8_0 columns: acc is loaded and stored once
   per four columns (axpy2 does it per two). */
FRT_TARGET static void frt_qaxpy4_q8_0_avx2(float *acc, const float h[4], const uint8_t *const w[4],
                                            int64_t nb) {
    const uint8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    const __m128 h4 = _mm_loadu_ps(h);
    for (int64_t b = 0; b < nb; b++) {
        float *a = acc + b * FRT_QK;
        const int64_t o = b * 34;
        __m128 c4 = _mm_mul_ps(h4, frt_ld_half4(w0, w1, w2, w3, o));
        __m256 c0 = FRT_BCAST(c4, 0), c1 = FRT_BCAST(c4, 1), c2 = FRT_BCAST(c4, 2), c3 = FRT_BCAST(c4, 3);
        for (int g = 0; g < 4; g++) {
#define FRT_Q8_F(W) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(W + o + 2 + 8 * g))))
            __m256 v = _mm256_fmadd_ps(FRT_Q8_F(w0), c0, _mm256_loadu_ps(a + 8 * g));
            v = _mm256_fmadd_ps(FRT_Q8_F(w1), c1, v);
            v = _mm256_fmadd_ps(FRT_Q8_F(w2), c2, v);
            _mm256_storeu_ps(a + 8 * g, _mm256_fmadd_ps(FRT_Q8_F(w3), c3, v));
#undef FRT_Q8_F
        }
    }
}

FRT_TARGET static void frt_dequant_q8_0_avx2(const uint8_t *src, float *out, int64_t nb) {
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = src + b * 34 + 2;
        __m256 db = _mm256_set1_ps(frt_ld_half_avx2(src + b * 34));
        for (int g = 0; g < 4; g++) {
            __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * g))));
            _mm256_storeu_ps(out + b * FRT_QK + 8 * g, _mm256_mul_ps(f, db));
        }
    }
}

/* The 4 groups of 8 elements of a 4-bit block as int32 (0..15): e0 = 0..7, e1 = 8..15,
   e2 = 16..23, e3 = 24..31. */
#define FRT_Q4_GROUPS(QS, E0, E1, E2, E3)                                                     \
    __m256i E0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(QS)));                \
    __m256i E1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((QS) + 8)));          \
    __m256i E2 = _mm256_srli_epi32(E0, 4), E3 = _mm256_srli_epi32(E1, 4);                     \
    E0 = _mm256_and_si256(E0, m15); E1 = _mm256_and_si256(E1, m15);

#define FRT_DEFINE_Q4_AVX2(SUF, BS, QOFF, HAS_MIN)                                            \
FRT_TARGET static void frt_qdot4_##SUF##_avx2(const uint8_t *const w[4], const int8_t *xq,   \
                                              const float *xd, const float *xs, int64_t nb,  \
                                              float *out4) {                                 \
    const uint8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];                            \
    const __m256i ones = _mm256_set1_epi16(1);                                               \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                              \
    __m128 off = _mm_setzero_ps();                                                           \
    for (int64_t b = 0; b < nb; b++) {                                                       \
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * FRT_QK));                 \
        const int64_t o = b * (BS);                                                          \
        __m128 d4 = frt_ld_half4(w0, w1, w2, w3, o);                                         \
        __m128 m4 = HAS_MIN ? frt_ld_half4(w0, w1, w2, w3, o + 2)                            \
                            : _mm_mul_ps(_mm_set1_ps(-8.0f), d4);                            \
        off = _mm_fmadd_ps(m4, _mm_set1_ps(xs[b]), off);                                     \
        __m128 sc = _mm_mul_ps(d4, _mm_set1_ps(xd[b]));                                      \
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(                           \
                 _mm256_maddubs_epi16(frt_unpack_q4(w0 + o + (QOFF)), xv), ones)),           \
             FRT_BCAST(sc, 0), a0);                                                          \
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(                           \
                 _mm256_maddubs_epi16(frt_unpack_q4(w1 + o + (QOFF)), xv), ones)),           \
             FRT_BCAST(sc, 1), a1);                                                          \
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(                           \
                 _mm256_maddubs_epi16(frt_unpack_q4(w2 + o + (QOFF)), xv), ones)),           \
             FRT_BCAST(sc, 2), a2);                                                          \
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(                           \
                 _mm256_maddubs_epi16(frt_unpack_q4(w3 + o + (QOFF)), xv), ones)),           \
             FRT_BCAST(sc, 3), a3);                                                          \
    }                                                                                        \
    _mm_storeu_ps(out4, _mm_add_ps(frt_hsum8x4(a0, a1, a2, a3), off));                       \
}                                                                                            \
FRT_TARGET static void frt_qaxpy2_##SUF##_avx2(float *acc, float h0, const uint8_t *w0,      \
                                               float h1, const uint8_t *w1, int64_t nb) {    \
    const __m256i m15 = _mm256_set1_epi32(15);                                               \
    for (int64_t b = 0; b < nb; b++) {                                                       \
        float *a = acc + b * FRT_QK;                                                         \
        const uint8_t *b0 = w0 + b * (BS);                                                   \
        float db0 = frt_ld_half_avx2(b0);                                                    \
        __m256 c0 = _mm256_set1_ps(h0 * db0);                                                \
        float o = h0 * (HAS_MIN ? frt_ld_half_avx2(b0 + 2) : -8.0f * db0);                   \
        FRT_Q4_GROUPS(b0 + (QOFF), e0, e1, e2, e3)                                           \
        if (w1 != NULL) {                                                                    \
            const uint8_t *b1 = w1 + b * (BS);                                               \
            float db1 = frt_ld_half_avx2(b1);                                                \
            __m256 c1 = _mm256_set1_ps(h1 * db1);                                            \
            o += h1 * (HAS_MIN ? frt_ld_half_avx2(b1 + 2) : -8.0f * db1);                    \
            __m256 vo = _mm256_set1_ps(o);                                                   \
            FRT_Q4_GROUPS(b1 + (QOFF), f0, f1, f2, f3)                                       \
            _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_cvtepi32_ps(f0), c1, _mm256_fmadd_ps( \
                _mm256_cvtepi32_ps(e0), c0, _mm256_add_ps(_mm256_loadu_ps(a), vo))));        \
            _mm256_storeu_ps(a + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(f1), c1, _mm256_fmadd_ps( \
                _mm256_cvtepi32_ps(e1), c0, _mm256_add_ps(_mm256_loadu_ps(a + 8), vo))));    \
            _mm256_storeu_ps(a + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(f2), c1, _mm256_fmadd_ps( \
                _mm256_cvtepi32_ps(e2), c0, _mm256_add_ps(_mm256_loadu_ps(a + 16), vo))));   \
            _mm256_storeu_ps(a + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(f3), c1, _mm256_fmadd_ps( \
                _mm256_cvtepi32_ps(e3), c0, _mm256_add_ps(_mm256_loadu_ps(a + 24), vo))));   \
        } else {                                                                             \
            __m256 vo = _mm256_set1_ps(o);                                                   \
            _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_cvtepi32_ps(e0), c0,                  \
                                                _mm256_add_ps(_mm256_loadu_ps(a), vo)));     \
            _mm256_storeu_ps(a + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(e1), c0,              \
                                                    _mm256_add_ps(_mm256_loadu_ps(a + 8), vo))); \
            _mm256_storeu_ps(a + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(e2), c0,             \
                                                     _mm256_add_ps(_mm256_loadu_ps(a + 16), vo))); \
            _mm256_storeu_ps(a + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(e3), c0,             \
                                                     _mm256_add_ps(_mm256_loadu_ps(a + 24), vo))); \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
FRT_TARGET static void frt_dequant_##SUF##_avx2(const uint8_t *src, float *out, int64_t nb) { \
    const __m256i m15 = _mm256_set1_epi32(15);                                               \
    for (int64_t b = 0; b < nb; b++) {                                                       \
        const uint8_t *blk = src + b * (BS);                                                 \
        float *o = out + b * FRT_QK;                                                         \
        __m256 db = _mm256_set1_ps(frt_ld_half_avx2(blk));                                   \
        FRT_Q4_GROUPS(blk + (QOFF), e0, e1, e2, e3)                                          \
        __m256i e[4] = {e0, e1, e2, e3};                                                     \
        if (HAS_MIN) {                                                                       \
            __m256 mb = _mm256_set1_ps(frt_ld_half_avx2(blk + 2));                           \
            for (int g = 0; g < 4; g++) {                                                    \
                __m256 p = _mm256_mul_ps(db, _mm256_cvtepi32_ps(e[g]));                      \
                FRT_NOFUSE(p);                                                               \
                _mm256_storeu_ps(o + 8 * g, _mm256_add_ps(p, mb));                           \
            }                                                                                \
        } else {                                                                             \
            const __m256i eight = _mm256_set1_epi32(8);                                      \
            for (int g = 0; g < 4; g++)                                                      \
                _mm256_storeu_ps(o + 8 * g, _mm256_mul_ps(db, _mm256_cvtepi32_ps(            \
                                                              _mm256_sub_epi32(e[g], eight)))); \
        }                                                                                    \
    }                                                                                        \
}

FRT_DEFINE_Q4_AVX2(q4_0, 18, 2, 0)
FRT_DEFINE_Q4_AVX2(q4_1, 20, 4, 1)

#endif /* FRT_X86 */

/* ------------------------------------------------------------------ dispatch by type and path */

static void frt_quantize_x(const float *x, int64_t k, int8_t *q, float *d, float *s) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2) { frt_quantize_x_avx2(x, k, q, d, s); return; }
#endif
    frt_quantize_x_scalar(x, k, q, d, s);
}

typedef void (*frt_qdot4_fn)(const uint8_t *const w[4], const int8_t *, const float *,
                             const float *, int64_t, float *);
typedef void (*frt_qaxpy2_fn)(float *, float, const uint8_t *, float, const uint8_t *, int64_t);
typedef void (*frt_dequant_fn)(const uint8_t *, float *, int64_t);

static frt_qdot4_fn frt_qdot4_for(int t) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2)
        return t == FRT_T_Q8_0 ? frt_qdot4_q8_0_avx2 : t == FRT_T_Q4_0 ? frt_qdot4_q4_0_avx2
                                                                      : frt_qdot4_q4_1_avx2;
#endif
    return t == FRT_T_Q8_0 ? frt_qdot4_q8_0_scalar : t == FRT_T_Q4_0 ? frt_qdot4_q4_0_scalar
                                                                    : frt_qdot4_q4_1_scalar;
}

static frt_qaxpy2_fn frt_qaxpy2_for(int t) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2)
        return t == FRT_T_Q8_0 ? frt_qaxpy2_q8_0_avx2 : t == FRT_T_Q4_0 ? frt_qaxpy2_q4_0_avx2
                                                                        : frt_qaxpy2_q4_1_avx2;
#endif
    return t == FRT_T_Q8_0 ? frt_qaxpy2_q8_0_scalar : t == FRT_T_Q4_0 ? frt_qaxpy2_q4_0_scalar
                                                                      : frt_qaxpy2_q4_1_scalar;
}

typedef void (*frt_qaxpy4_q8_0_fn)(float *, const float *, const uint8_t *const *, int64_t);

static frt_qaxpy4_q8_0_fn frt_qaxpy4_q8_0_for(void) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2) return frt_qaxpy4_q8_0_avx2;
#endif
    return frt_qaxpy4_q8_0_scalar;
}

static frt_dequant_fn frt_dequant_for(int t) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2)
        return t == FRT_T_Q8_0 ? frt_dequant_q8_0_avx2 : t == FRT_T_Q4_0 ? frt_dequant_q4_0_avx2
                                                                         : frt_dequant_q4_1_avx2;
#endif
    return t == FRT_T_Q8_0 ? frt_dequant_q8_0_scalar : t == FRT_T_Q4_0 ? frt_dequant_q4_0_scalar
                                                                       : frt_dequant_q4_1_scalar;
}

/* out (n,) = W (n rows of nb blocks) . x for quantized W, x already quantized (xq, xd, xs). */
static void frt_gemv_q(int t, const uint8_t *W, const int8_t *xq, const float *xd,
                       const float *xs, float *out, int64_t n, int64_t nb) {
    const int64_t rb = nb * frt_type_unit_bytes(t);
    frt_qdot4_fn dot4 = frt_qdot4_for(t);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        if (FRT_PF_AHEAD && i + (FRT_PF_AHEAD + 1) * 4 <= n) frt_prefetch(W + (i + FRT_PF_AHEAD * 4) * rb, 4 * rb);
        const uint8_t *w[4] = {W + i * rb, W + (i + 1) * rb, W + (i + 2) * rb, W + (i + 3) * rb};
        dot4(w, xq, xd, xs, nb, out + i);
    }
    if (i < n) {                    /* 1-3 rows left: repeat the last one */
        float o4[4];
        const uint8_t *w[4];
        for (int r = 0; r < 4; r++) w[r] = W + (i + r < n ? i + r : n - 1) * rb;
        dot4(w, xq, xd, xs, nb, o4);
        for (int r = 0; i + r < n; r++) out[i + r] = o4[r];
    }
}

/* The FFN over n quantized bundle rows (row = [gate,] up as type t, then down as type td, each
   nb blocks): acc (32 nb) += sum_i h_i down_i; see frt_ffn_rows_f16 for h. Rows with h == 0
   skip down. (td may differ from t: a 4-bit bundle with a q8_0 down column.) */
static void frt_ffn_rows_q(int t, int td, const uint8_t *rows, int64_t n, int64_t nb, int gated,
                           frt_act_t act, const int8_t *xq, const float *xd, const float *xs,
                           const float *up_bias, float *h_out, float *acc) {
    const int64_t n_parts = gated ? 3 : 2, pb = nb * frt_type_unit_bytes(t);
    const int64_t rb = (n_parts - 1) * pb + nb * frt_type_unit_bytes(td);
    const int64_t group = gated ? 2 : 4;
    frt_qdot4_fn dot4 = frt_qdot4_for(t);
    frt_qaxpy2_fn axpy2 = frt_qaxpy2_for(td);
    /* q8_0 down columns go in fours (frt_qaxpy4_q8_0), the 4-bit ones in pairs */
    const int n_batch = td == FRT_T_Q8_0 ? 4 : 2;
    frt_qaxpy4_q8_0_fn axpy4 = frt_qaxpy4_q8_0_for();
    const uint8_t *down_pend[4] = {NULL, NULL, NULL, NULL};
    float h_pend[4] = {0.f, 0.f, 0.f, 0.f}, d4[4], h[4];
    int n_pend = 0;
    for (int64_t i = 0; i < n; i += group) {
        const uint8_t *r = rows + i * rb;
        int64_t m = n - i < group ? n - i : group;
        if (FRT_PF_AHEAD && i + (FRT_PF_AHEAD + 1) * group <= n) frt_prefetch(r + FRT_PF_AHEAD * group * rb, group * rb);
        const uint8_t *w[4];
        if (gated) {
            const uint8_t *r1 = m == 2 ? r + rb : r;
            w[0] = r; w[1] = r + pb; w[2] = r1; w[3] = r1 + pb;
            dot4(w, xq, xd, xs, nb, d4);
            for (int64_t u = 0; u < m; u++) h[u] = frt_glu(d4[2 * u], d4[2 * u + 1], act);
        } else {
            for (int u = 0; u < 4; u++) w[u] = r + (u < m ? u : m - 1) * rb;
            dot4(w, xq, xd, xs, nb, d4);
            for (int64_t u = 0; u < m; u++)
                h[u] = frt_act(d4[u] + (up_bias != NULL ? up_bias[i + u] : 0.f), act);
        }
        for (int64_t u = 0; u < m; u++) {
            if (h_out != NULL) h_out[i + u] = h[u];
            if (h[u] == 0.0f) continue;
            down_pend[n_pend] = r + u * rb + (n_parts - 1) * pb;
            h_pend[n_pend++] = h[u];
            if (n_pend < n_batch) continue;
            if (n_batch == 4) axpy4(acc, h_pend, down_pend, nb);
            else axpy2(acc, h_pend[0], down_pend[0], h_pend[1], down_pend[1], nb);
            n_pend = 0;
        }
    }
    if (n_pend > 0 && n_batch == 4) {           /* the last 1-3: zero weights add exactly 0 */
        for (int u = n_pend; u < 4; u++) { down_pend[u] = down_pend[0]; h_pend[u] = 0.f; }
        axpy4(acc, h_pend, down_pend, nb);
    } else if (n_pend > 0) {
        axpy2(acc, h_pend[0], down_pend[0], 0.f, NULL, nb);
    }
}

#endif /* FLASHRT_QUANT_H */
