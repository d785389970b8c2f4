/* simd.h -- the compute kernels' inner loops, in C.
 *
 * Two code paths per kernel:
 *   - AVX2 + FMA + F16C, compiled with a per-function target attribute (the build
 *     itself stays baseline x86-64, so the module imports on any CPU);
 *   - a portable scalar path (plain C; the compiler may auto-vectorize it for the baseline ISA).
 * `frt_init_path()` picks one at import time with __builtin_cpu_supports; the environment
 * variable FLASHRT_KERNELS=scalar forces the scalar path (tests run both).
 *
 * The inner loops work on one contiguous block of rows and are single-threaded; the
 * `*_par` kernels at the end split rows into shape-determined chunks run by the caller and a
 * small work-sharing pool (see the pool's comment for why it is not OpenMP).
 *
 * Storage types (FRT_T_*): float32, float16 (passed as `const uint16_t*` bit patterns), and
 * the block-quantized q8_0 / q4_0 / q4_1 of quant.h.
 */
#ifndef FLASHRT_SIMD_H
#define FLASHRT_SIMD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define FRT_X86 1
#include <immintrin.h>
#else
#define FRT_X86 0
#endif

#define FRT_PATH_SCALAR 0
#define FRT_PATH_AVX2 1

/* Activations: a kind and its parameter (FATReLU's threshold; 0 for the others). */
#define FRT_ACT_SILU 0
#define FRT_ACT_RELU 1
#define FRT_ACT_GELU 2       /* exact (erf) */
#define FRT_ACT_GELU_TANH 3  /* tanh approximation (gelu_pytorch_tanh) */
#define FRT_ACT_FATRELU 4    /* v > param ? v : 0 (ProSparse) */
#define FRT_ACT_DRELU 5      /* gated: relu(gate) * relu(up) (TurboSparse, Bamboo); one input: relu */

typedef struct { int kind; float param; } frt_act_t;

static int frt_path = FRT_PATH_SCALAR;

/* ------------------------------------------------------------------ CPU features */

static int frt_cpu_has(const char *feature) {
#if FRT_X86 && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2");
    if (strcmp(feature, "fma") == 0) return __builtin_cpu_supports("fma");
    if (strcmp(feature, "f16c") == 0) {
        /* __builtin_cpu_supports has no "f16c" on older compilers: ask CPUID leaf 1, ECX bit 29. */
        unsigned int a, b, c, d;
        __asm__ __volatile__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
        return (c >> 29) & 1u;
    }
    if (strcmp(feature, "avx512f") == 0) return __builtin_cpu_supports("avx512f");
#endif
    (void)feature;
    return 0;
}

static int frt_avx2_available(void) {
    return frt_cpu_has("avx2") && frt_cpu_has("fma") && frt_cpu_has("f16c");
}

/* Choose the path: "scalar" forces the fallback, anything else takes the best available.
   Returns the path chosen. */
static int frt_set_path(int want_avx2) {
    frt_path = (want_avx2 && frt_avx2_available()) ? FRT_PATH_AVX2 : FRT_PATH_SCALAR;
    return frt_path;
}

static int frt_init_path(void) {
    const char *env = getenv("FLASHRT_KERNELS");
    int want_avx2 = !(env != NULL && strcmp(env, "scalar") == 0);
    return frt_set_path(want_avx2);
}

/* ------------------------------------------------------------------ scalar helpers */

/* Exact binary16 -> binary32 (normals, subnormals, inf, NaN payloads kept). */
/* Prefetch [p, p + bytes) into the caches. One thread streaming many short rows from DRAM
   outruns the hardware prefetcher (3.1 GB/s measured on SmolLM2's FFN, bench/bench_kernels.py
   --cold); asking for the rows a few iterations ahead keeps the loads in flight. */
static int FRT_PF_AHEAD = 2;      /* loop iterations (4-row dot groups, or 2 gated neurons) ahead;
                                      kernels._set_prefetch(0) turns it off to measure */
static inline void frt_prefetch(const uint8_t *p, int64_t bytes) {
#if defined(__GNUC__)
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 0);
#else
    (void)p; (void)bytes;
#endif
}

static inline float frt_half_to_float(uint16_t h) {
    union { uint32_t u; float f; } o, magic;
    const uint32_t shifted_exp = 0x7c00u << 13;
    magic.u = 113u << 23;
    o.u = ((uint32_t)h & 0x7fffu) << 13;
    uint32_t exp = shifted_exp & o.u;
    o.u += (127u - 15u) << 23;
    if (exp == shifted_exp) {
        o.u += (128u - 16u) << 23;          /* inf / NaN */
    } else if (exp == 0) {
        o.u += 1u << 23;                    /* zero / subnormal: renormalise */
        o.f -= magic.f;
    }
    o.u |= ((uint32_t)h & 0x8000u) << 16;
    return o.f;
}

static inline float frt_act(float v, frt_act_t act) {
    switch (act.kind) {
    case FRT_ACT_RELU:
    case FRT_ACT_DRELU:     return v > 0.0f ? v : 0.0f;
    case FRT_ACT_FATRELU:   return v > act.param ? v : 0.0f;
    case FRT_ACT_GELU:      return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case FRT_ACT_GELU_TANH: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default:                return v / (1.0f + expf(-v));   /* silu; -v large => v/inf = -0 */
    }
}

/* A gated neuron's h from its gate and up dot products: act(gate) * up, or for dReLU
   relu(gate) * relu(up) (exactly 0 unless both are positive). */
static inline float frt_glu(float g, float u, frt_act_t act) {
    if (act.kind == FRT_ACT_DRELU) return (g > 0.0f && u > 0.0f) ? g * u : 0.0f;
    return frt_act(g, act) * u;
}

static void frt_act_inplace(float *a, int64_t n, frt_act_t act) {
    switch (act.kind) {
    case FRT_ACT_SILU:
        for (int64_t j = 0; j < n; j++) a[j] = a[j] / (1.0f + expf(-a[j]));
        break;
    case FRT_ACT_RELU:
    case FRT_ACT_DRELU:
        for (int64_t j = 0; j < n; j++) a[j] = a[j] > 0.0f ? a[j] : 0.0f;
        break;
    default:
        for (int64_t j = 0; j < n; j++) a[j] = frt_act(a[j], act);
    }
}

/* ------------------------------------------------------------------ scalar path */

#define FRT_DEFINE_SCALAR(SUF, WT, CONV)                                                   \
static void frt_gemv_##SUF##_scalar(const WT *W, const float *x, float *out,               \
                                    int64_t n, int64_t k) {                                \
    for (int64_t i = 0; i < n; i++) {                                                      \
        const WT *w = W + i * k;                                                           \
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                      \
        int64_t j = 0;                                                                     \
        for (; j + 4 <= k; j += 4) {                                                       \
            s0 += CONV(w[j]) * x[j];                                                       \
            s1 += CONV(w[j + 1]) * x[j + 1];                                               \
            s2 += CONV(w[j + 2]) * x[j + 2];                                               \
            s3 += CONV(w[j + 3]) * x[j + 3];                                               \
        }                                                                                  \
        for (; j < k; j++) s0 += CONV(w[j]) * x[j];                                        \
        out[i] = (s0 + s1) + (s2 + s3);                                                    \
    }                                                                                      \
}                                                                                          \
static float frt_dot_##SUF##_scalar(const WT *w, const float *x, int64_t k) {              \
    float s0 = 0.f, s1 = 0.f;                                                              \
    int64_t j = 0;                                                                         \
    for (; j + 2 <= k; j += 2) {                                                           \
        s0 += CONV(w[j]) * x[j];                                                           \
        s1 += CONV(w[j + 1]) * x[j + 1];                                                   \
    }                                                                                      \
    for (; j < k; j++) s0 += CONV(w[j]) * x[j];                                            \
    return s0 + s1;                                                                        \
}                                                                                          \
static void frt_axpy_##SUF##_scalar(float *acc, float h, const WT *w, int64_t d) {         \
    for (int64_t j = 0; j < d; j++) acc[j] += h * CONV(w[j]);                              \
}

#define FRT_CONV_F32(v) (v)
#define FRT_CONV_F16(v) frt_half_to_float(v)
FRT_DEFINE_SCALAR(f32, float, FRT_CONV_F32)
FRT_DEFINE_SCALAR(f16, uint16_t, FRT_CONV_F16)

static void frt_f16_to_f32_scalar(const uint16_t *src, float *out, int64_t n) {
    for (int64_t j = 0; j < n; j++) out[j] = frt_half_to_float(src[j]);
}

/* ------------------------------------------------------------------ AVX2 path */
#if FRT_X86

#define FRT_TARGET __attribute__((target("avx2,fma,f16c")))

/* 8 lanes of weights as float32 */
#define FRT_LD8_F32(p) _mm256_loadu_ps(p)
#define FRT_LD8_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define FRT_LD1_F32(v) (v)
#define FRT_LD1_F16(v) _cvtsh_ss(v)

FRT_TARGET static inline float frt_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* [hsum(r0), hsum(r1), hsum(r2), hsum(r3)] */
FRT_TARGET static inline __m128 frt_hsum8x4(__m256 r0, __m256 r1, __m256 r2, __m256 r3) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(r0, r1), _mm256_hadd_ps(r2, r3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* gemv over n rows: 4 rows at a time, 2 accumulators per row (8 independent FMA chains),
   x re-used from L1 across the 4 rows. */
#define FRT_DEFINE_AVX2(SUF, WT, LD8, LD1)                                                  \
/* four dot products over the same x: out4[r] = w_r . x (2 accumulators per row: 8 FMA     */ \
/* chains; 4 concurrent weight streams; x re-used from L1)                                 */ \
FRT_TARGET static void frt_dot4_##SUF##_avx2(const WT *w0, const WT *w1, const WT *w2,      \
                                             const WT *w3, const float *x, int64_t k,       \
                                             float *out4) {                                 \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                             \
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;                                              \
    int64_t j = 0;                                                                          \
    for (; j + 16 <= k; j += 16) {                                                          \
        __m256 xa = _mm256_loadu_ps(x + j), xb = _mm256_loadu_ps(x + j + 8);                \
        a0 = _mm256_fmadd_ps(LD8(w0 + j), xa, a0);                                          \
        a1 = _mm256_fmadd_ps(LD8(w1 + j), xa, a1);                                          \
        a2 = _mm256_fmadd_ps(LD8(w2 + j), xa, a2);                                          \
        a3 = _mm256_fmadd_ps(LD8(w3 + j), xa, a3);                                          \
        b0 = _mm256_fmadd_ps(LD8(w0 + j + 8), xb, b0);                                      \
        b1 = _mm256_fmadd_ps(LD8(w1 + j + 8), xb, b1);                                      \
        b2 = _mm256_fmadd_ps(LD8(w2 + j + 8), xb, b2);                                      \
        b3 = _mm256_fmadd_ps(LD8(w3 + j + 8), xb, b3);                                      \
    }                                                                                       \
    if (j + 8 <= k) {                                                                       \
        __m256 xa = _mm256_loadu_ps(x + j);                                                 \
        a0 = _mm256_fmadd_ps(LD8(w0 + j), xa, a0);                                          \
        a1 = _mm256_fmadd_ps(LD8(w1 + j), xa, a1);                                          \
        a2 = _mm256_fmadd_ps(LD8(w2 + j), xa, a2);                                          \
        a3 = _mm256_fmadd_ps(LD8(w3 + j), xa, a3);                                          \
        j += 8;                                                                             \
    }                                                                                       \
    __m128 s = frt_hsum8x4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1),                    \
                           _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3));                   \
    if (j < k) {                                                                            \
        float t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;                                       \
        for (; j < k; j++) {                                                                \
            float xv = x[j];                                                                \
            t0 += LD1(w0[j]) * xv; t1 += LD1(w1[j]) * xv;                                   \
            t2 += LD1(w2[j]) * xv; t3 += LD1(w3[j]) * xv;                                   \
        }                                                                                   \
        s = _mm_add_ps(s, _mm_setr_ps(t0, t1, t2, t3));                                     \
    }                                                                                       \
    _mm_storeu_ps(out4, s);                                                                 \
}                                                                                           \
/* gemv over n rows: 4 rows at a time */                                                    \
FRT_TARGET static void frt_gemv_##SUF##_avx2(const WT *W, const float *x, float *out,       \
                                             int64_t n, int64_t k) {                        \
    int64_t i = 0;                                                                          \
    for (; i + 4 <= n; i += 4) {                                                            \
        const WT *w0 = W + i * k;                                                           \
        if (FRT_PF_AHEAD && i + (FRT_PF_AHEAD + 1) * 4 <= n)                                \
            frt_prefetch((const uint8_t *)(w0 + FRT_PF_AHEAD * 4 * k), 4 * k * sizeof(WT)); \
        frt_dot4_##SUF##_avx2(w0, w0 + k, w0 + 2 * k, w0 + 3 * k, x, k, out + i);           \
    }                                                                                       \
    for (; i < n; i++) {                                                                    \
        const WT *w = W + i * k;                                                            \
        __m256 a = _mm256_setzero_ps(), b = a, c = a, e = a;                                \
        int64_t j = 0;                                                                      \
        for (; j + 32 <= k; j += 32) {                                                      \
            a = _mm256_fmadd_ps(LD8(w + j), _mm256_loadu_ps(x + j), a);                     \
            b = _mm256_fmadd_ps(LD8(w + j + 8), _mm256_loadu_ps(x + j + 8), b);             \
            c = _mm256_fmadd_ps(LD8(w + j + 16), _mm256_loadu_ps(x + j + 16), c);           \
            e = _mm256_fmadd_ps(LD8(w + j + 24), _mm256_loadu_ps(x + j + 24), e);           \
        }                                                                                   \
        for (; j + 8 <= k; j += 8)                                                          \
            a = _mm256_fmadd_ps(LD8(w + j), _mm256_loadu_ps(x + j), a);                     \
        float t = frt_hsum8(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, e)));       \
        for (; j < k; j++) t += LD1(w[j]) * x[j];                                           \
        out[i] = t;                                                                         \
    }                                                                                       \
}                                                                                           \
/* two dot products over the same x in one pass: (p . x, q . x) */                          \
FRT_TARGET static void frt_dot2_##SUF##_avx2(const WT *p, const WT *q, const float *x,      \
                                             int64_t k, float *rp, float *rq) {             \
    __m256 pa = _mm256_setzero_ps(), pb = pa, qa = pa, qb = pa;                             \
    __m256 pc = pa, pd = pa, qc = pa, qd = pa;                                              \
    int64_t j = 0;                                                                          \
    for (; j + 32 <= k; j += 32) {   /* 8 independent FMA chains */                         \
        __m256 xa = _mm256_loadu_ps(x + j), xb = _mm256_loadu_ps(x + j + 8);                \
        __m256 xc = _mm256_loadu_ps(x + j + 16), xd = _mm256_loadu_ps(x + j + 24);          \
        pa = _mm256_fmadd_ps(LD8(p + j), xa, pa);                                           \
        qa = _mm256_fmadd_ps(LD8(q + j), xa, qa);                                           \
        pb = _mm256_fmadd_ps(LD8(p + j + 8), xb, pb);                                       \
        qb = _mm256_fmadd_ps(LD8(q + j + 8), xb, qb);                                       \
        pc = _mm256_fmadd_ps(LD8(p + j + 16), xc, pc);                                      \
        qc = _mm256_fmadd_ps(LD8(q + j + 16), xc, qc);                                      \
        pd = _mm256_fmadd_ps(LD8(p + j + 24), xd, pd);                                      \
        qd = _mm256_fmadd_ps(LD8(q + j + 24), xd, qd);                                      \
    }                                                                                       \
    pa = _mm256_add_ps(pa, pc); pb = _mm256_add_ps(pb, pd);                                 \
    qa = _mm256_add_ps(qa, qc); qb = _mm256_add_ps(qb, qd);                                 \
    for (; j + 16 <= k; j += 16) {                                                          \
        __m256 xa = _mm256_loadu_ps(x + j), xb = _mm256_loadu_ps(x + j + 8);                \
        pa = _mm256_fmadd_ps(LD8(p + j), xa, pa);                                           \
        qa = _mm256_fmadd_ps(LD8(q + j), xa, qa);                                           \
        pb = _mm256_fmadd_ps(LD8(p + j + 8), xb, pb);                                       \
        qb = _mm256_fmadd_ps(LD8(q + j + 8), xb, qb);                                       \
    }                                                                                       \
    if (j + 8 <= k) {                                                                       \
        __m256 xa = _mm256_loadu_ps(x + j);                                                 \
        pa = _mm256_fmadd_ps(LD8(p + j), xa, pa);                                           \
        qa = _mm256_fmadd_ps(LD8(q + j), xa, qa);                                           \
        j += 8;                                                                             \
    }                                                                                       \
    float sp = frt_hsum8(_mm256_add_ps(pa, pb)), sq = frt_hsum8(_mm256_add_ps(qa, qb));     \
    for (; j < k; j++) { sp += LD1(p[j]) * x[j]; sq += LD1(q[j]) * x[j]; }                  \
    *rp = sp; *rq = sq;                                                                     \
}                                                                                           \
FRT_TARGET static float frt_dot_##SUF##_avx2(const WT *p, const float *x, int64_t k) {      \
    __m256 a = _mm256_setzero_ps(), b = a, c = a, e = a;                                    \
    int64_t j = 0;                                                                          \
    for (; j + 32 <= k; j += 32) {                                                          \
        a = _mm256_fmadd_ps(LD8(p + j), _mm256_loadu_ps(x + j), a);                         \
        b = _mm256_fmadd_ps(LD8(p + j + 8), _mm256_loadu_ps(x + j + 8), b);                 \
        c = _mm256_fmadd_ps(LD8(p + j + 16), _mm256_loadu_ps(x + j + 16), c);               \
        e = _mm256_fmadd_ps(LD8(p + j + 24), _mm256_loadu_ps(x + j + 24), e);               \
    }                                                                                       \
    for (; j + 8 <= k; j += 8)                                                              \
        a = _mm256_fmadd_ps(LD8(p + j), _mm256_loadu_ps(x + j), a);                         \
    float t = frt_hsum8(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, e)));           \
    for (; j < k; j++) t += LD1(p[j]) * x[j];                                               \
    return t;                                                                               \
}                                                                                           \
/* acc += h0 * w0 + h1 * w1 (w1 may be NULL: one row) */                                    \
FRT_TARGET static void frt_axpy2_##SUF##_avx2(float *acc, float h0, const WT *w0,           \
                                              float h1, const WT *w1, int64_t d) {          \
    __m256 v0 = _mm256_set1_ps(h0);                                                         \
    int64_t j = 0;                                                                          \
    if (w1 != NULL) {                                                                       \
        __m256 v1 = _mm256_set1_ps(h1);                                                     \
        for (; j + 8 <= d; j += 8) {                                                        \
            __m256 a = _mm256_loadu_ps(acc + j);                                            \
            a = _mm256_fmadd_ps(LD8(w0 + j), v0, a);                                        \
            a = _mm256_fmadd_ps(LD8(w1 + j), v1, a);                                        \
            _mm256_storeu_ps(acc + j, a);                                                   \
        }                                                                                   \
        for (; j < d; j++) acc[j] += h0 * LD1(w0[j]) + h1 * LD1(w1[j]);                     \
    } else {                                                                                \
        for (; j + 8 <= d; j += 8)                                                          \
            _mm256_storeu_ps(acc + j,                                                       \
                             _mm256_fmadd_ps(LD8(w0 + j), v0, _mm256_loadu_ps(acc + j)));   \
        for (; j < d; j++) acc[j] += h0 * LD1(w0[j]);                                       \
    }                                                                                       \
}

FRT_DEFINE_AVX2(f32, float, FRT_LD8_F32, FRT_LD1_F32)
FRT_DEFINE_AVX2(f16, uint16_t, FRT_LD8_F16, FRT_LD1_F16)

FRT_TARGET static void frt_f16_to_f32_avx2(const uint16_t *src, float *out, int64_t n) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        __m256 a = FRT_LD8_F16(src + j), b = FRT_LD8_F16(src + j + 8);
        __m256 c = FRT_LD8_F16(src + j + 16), e = FRT_LD8_F16(src + j + 24);
        _mm256_storeu_ps(out + j, a);
        _mm256_storeu_ps(out + j + 8, b);
        _mm256_storeu_ps(out + j + 16, c);
        _mm256_storeu_ps(out + j + 24, e);
    }
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, FRT_LD8_F16(src + j));
    for (; j < n; j++) out[j] = _cvtsh_ss(src[j]);
}

#endif /* FRT_X86 */

#include "quant.h"          /* block-quantized types: q8_0, q4_0, q4_1 */

/* ------------------------------------------------------------------ dispatch */

/* out (n,) = W (n, k) @ x (k,) for one block of rows. */
static void frt_gemv_f32(const float *W, const float *x, float *out, int64_t n, int64_t k) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2) { frt_gemv_f32_avx2(W, x, out, n, k); return; }
#endif
    frt_gemv_f32_scalar(W, x, out, n, k);
}

static void frt_gemv_f16(const uint16_t *W, const float *x, float *out, int64_t n, int64_t k) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2) { frt_gemv_f16_avx2(W, x, out, n, k); return; }
#endif
    frt_gemv_f16_scalar(W, x, out, n, k);
}

static void frt_f16_to_f32(const uint16_t *src, float *out, int64_t n) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2) { frt_f16_to_f32_avx2(src, out, n); return; }
#endif
    frt_f16_to_f32_scalar(src, out, n);
}

/* The FFN over one block of n bundle rows (row i = [gate_i,] up_i, down_i, each d long).
     gated:     h_i = act(gate_i . x) * (up_i . x)      (dReLU: relu(gate_i . x) * relu(up_i . x))
     otherwise: h_i = act(up_i . x + up_bias[i])       (up_bias may be NULL)
   acc (d,) += sum_i h_i * down_i   (acc is NOT cleared here)
   h_out (n,) receives h when not NULL.  Rows with h_i == 0 skip the down pass. */
#define FRT_DEFINE_FFN(SUF, WT)                                                               \
static void frt_ffn_rows_##SUF##_scalar(const WT *rows, int64_t n, int64_t d, int gated,     \
                                        frt_act_t act, const float *x, const float *up_bias,  \
                                        float *h_out, float *acc) {                           \
    const int64_t n_parts = gated ? 3 : 2, row_elems = n_parts * d;                           \
    for (int64_t i = 0; i < n; i++) {                                                         \
        const WT *r = rows + i * row_elems;                                                   \
        float h;                                                                              \
        if (gated) {                                                                          \
            h = frt_glu(frt_dot_##SUF##_scalar(r, x, d), frt_dot_##SUF##_scalar(r + d, x, d), act); \
        } else {                                                                              \
            float u = frt_dot_##SUF##_scalar(r, x, d);                                        \
            if (up_bias != NULL) u += up_bias[i];                                             \
            h = frt_act(u, act);                                                              \
        }                                                                                     \
        if (h_out != NULL) h_out[i] = h;                                                      \
        if (h != 0.0f) frt_axpy_##SUF##_scalar(acc, h, r + (n_parts - 1) * d, d);             \
    }                                                                                         \
}                                                                                             \
FRT_AVX2_FFN(SUF, WT)                                                                         \
static void frt_ffn_rows_##SUF(const WT *rows, int64_t n, int64_t d, int gated, frt_act_t act,\
                               const float *x, const float *up_bias, float *h_out,            \
                               float *acc) {                                                  \
    FRT_AVX2_ONLY(if (frt_path == FRT_PATH_AVX2) {                                            \
        frt_ffn_rows_##SUF##_avx2(rows, n, d, gated, act, x, up_bias, h_out, acc); return; }) \
    frt_ffn_rows_##SUF##_scalar(rows, n, d, gated, act, x, up_bias, h_out, acc);              \
}

#if FRT_X86
#define FRT_AVX2_ONLY(stmt) stmt
/* AVX2: 4 dot products at a time (2 gated rows: gate, up, gate, up; or 4 up rows), then the
   down rows in pairs so acc is loaded/stored once per two rows; rows with h == 0 skip down. */
#define FRT_AVX2_FFN(SUF, WT)                                                                 \
FRT_TARGET static void frt_ffn_rows_##SUF##_avx2(const WT *rows, int64_t n, int64_t d,        \
                                                 int gated, frt_act_t act, const float *x,    \
                                                 const float *up_bias, float *h_out,          \
                                                 float *acc) {                                \
    const int64_t n_parts = gated ? 3 : 2, row_elems = n_parts * d;                           \
    const int64_t group = gated ? 2 : 4;                                                      \
    const WT *down_pend = NULL;                                                               \
    float h_pend = 0.f, d4[4], h[4];                                                          \
    for (int64_t i = 0; i < n; i += group) {                                                  \
        const WT *r = rows + i * row_elems;                                                   \
        int64_t m = n - i < group ? n - i : group;                                            \
        if (FRT_PF_AHEAD && i + (FRT_PF_AHEAD + 1) * group <= n)                              \
            frt_prefetch((const uint8_t *)(r + FRT_PF_AHEAD * group * row_elems),             \
                         group * row_elems * sizeof(WT));                                     \
        if (gated) {                                                                          \
            if (m == 2) {                                                                     \
                frt_dot4_##SUF##_avx2(r, r + d, r + row_elems, r + row_elems + d, x, d, d4);  \
            } else {                                                                          \
                frt_dot2_##SUF##_avx2(r, r + d, x, d, &d4[0], &d4[1]);                        \
            }                                                                                 \
            for (int64_t t = 0; t < m; t++) h[t] = frt_glu(d4[2 * t], d4[2 * t + 1], act);   \
        } else {                                                                              \
            if (m == 4) {                                                                     \
                frt_dot4_##SUF##_avx2(r, r + row_elems, r + 2 * row_elems, r + 3 * row_elems, \
                                      x, d, d4);                                              \
            } else {                                                                          \
                for (int64_t t = 0; t < m; t++)                                               \
                    d4[t] = frt_dot_##SUF##_avx2(r + t * row_elems, x, d);                    \
            }                                                                                 \
            for (int64_t t = 0; t < m; t++)                                                   \
                h[t] = frt_act(d4[t] + (up_bias != NULL ? up_bias[i + t] : 0.f), act);        \
        }                                                                                     \
        for (int64_t t = 0; t < m; t++) {                                                     \
            if (h_out != NULL) h_out[i + t] = h[t];                                           \
            if (h[t] == 0.0f) continue;                                                       \
            const WT *down = r + t * row_elems + (n_parts - 1) * d;                           \
            if (down_pend == NULL) { down_pend = down; h_pend = h[t]; continue; }             \
            frt_axpy2_##SUF##_avx2(acc, h_pend, down_pend, h[t], down, d);                    \
            down_pend = NULL;                                                                 \
        }                                                                                     \
    }                                                                                         \
    if (down_pend != NULL) frt_axpy2_##SUF##_avx2(acc, h_pend, down_pend, 0.f, NULL, d);      \
}
#else
#define FRT_AVX2_ONLY(stmt)
#define FRT_AVX2_FFN(SUF, WT)
#endif

FRT_DEFINE_FFN(f32, float)
FRT_DEFINE_FFN(f16, uint16_t)

/* ================================================================== work-sharing pool
 *
 * Why not OpenMP: an OpenMP parallel region ends in a barrier every thread must reach. On a
 * shared 2-core machine a worker that is not scheduled stalls the caller for a whole time slice
 * (measured: 576x576 gemv, median 8 us but mean 1.3-12 ms under load). Here the CALLER never
 * waits for a worker that has not started: work is cut into chunks claimed from one atomic
 * counter; the caller claims chunks too, and at the end waits only for chunks already claimed.
 * A late worker finds nothing left and goes back to sleep; a busy pool (another Python thread
 * inside a kernel) makes the caller run alone. Workers spin FLASHRT_SPIN_US (default 50) after
 * a job, then sleep on a condition variable.
 *
 * Chunk boundaries depend only on the problem shape, never on the thread count, and the FFN
 * reduces its per-chunk partial sums in chunk order: results are bit-identical for any
 * n_threads.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#define FRT_MAX_WORKERS 63

typedef void (*frt_chunk_fn)(void *ctx, int64_t chunk);

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_workers;                 /* started (guarded by mu) */
    int n_sleeping;                /* in cond_wait (guarded by mu) */
    _Atomic uint32_t gen;          /* job generation; written under mu */
    frt_chunk_fn fn;               /* the job of generation gen (guarded by mu) */
    void *ctx;
    int64_t n_chunks;
    int max_helpers;
    _Atomic uint64_t claim;        /* (gen << 32) | next chunk to claim */
    _Atomic int64_t done;          /* chunks finished in this generation */
    _Atomic int helpers_joined;
    atomic_flag busy;              /* held by the one caller using the pool */
    long spin_ns;
    int atfork_set;
} frt_pool_t;

static frt_pool_t frt_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0,
                              NULL, NULL, 0, 0, 0, 0, 0, ATOMIC_FLAG_INIT, -1, 0};

static inline void frt_cpu_relax(void) {
#if FRT_X86
    _mm_pause();
#endif
}

static inline int64_t frt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run chunks of generation g until none are left (or the job moved on). */
static void frt_run_chunks(uint32_t g, frt_chunk_fn fn, void *ctx, int64_t n_chunks) {
    for (;;) {
        uint64_t w = atomic_load_explicit(&frt_pool.claim, memory_order_acquire);
        for (;;) {
            if ((uint32_t)(w >> 32) != g || (int64_t)(w & 0xffffffffu) >= n_chunks) return;
            if (atomic_compare_exchange_weak_explicit(&frt_pool.claim, &w, w + 1,
                                                      memory_order_acq_rel, memory_order_acquire))
                break;
        }
        fn(ctx, (int64_t)(w & 0xffffffffu));
        atomic_fetch_add_explicit(&frt_pool.done, 1, memory_order_release);
    }
}

static void *frt_worker_main(void *arg) {
    uint32_t seen = (uint32_t)(uintptr_t)arg;
    for (;;) {
        if (atomic_load_explicit(&frt_pool.gen, memory_order_acquire) == seen) {
            int64_t t_end = frt_now_ns() + frt_pool.spin_ns;
            int spins = 0;
            while (atomic_load_explicit(&frt_pool.gen, memory_order_acquire) == seen) {
                frt_cpu_relax();
                if (++spins % 64 == 0 && frt_now_ns() > t_end) break;
            }
        }
        pthread_mutex_lock(&frt_pool.mu);
        if (atomic_load_explicit(&frt_pool.gen, memory_order_relaxed) == seen) {
            frt_pool.n_sleeping++;
            while (atomic_load_explicit(&frt_pool.gen, memory_order_relaxed) == seen)
                pthread_cond_wait(&frt_pool.cv, &frt_pool.mu);
            frt_pool.n_sleeping--;
        }
        uint32_t g = atomic_load_explicit(&frt_pool.gen, memory_order_relaxed);
        frt_chunk_fn fn = frt_pool.fn;
        void *ctx = frt_pool.ctx;
        int64_t n_chunks = frt_pool.n_chunks;
        int max_helpers = frt_pool.max_helpers;
        pthread_mutex_unlock(&frt_pool.mu);
        seen = g;
        if (atomic_fetch_add_explicit(&frt_pool.helpers_joined, 1, memory_order_relaxed) < max_helpers)
            frt_run_chunks(g, fn, ctx, n_chunks);
    }
    return NULL;
}

static void frt_pool_atfork_child(void) {
    /* The child has no workers: start afresh (the caller then runs jobs alone until it
       starts new workers). */
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    frt_pool.mu = mu;
    frt_pool.cv = cv;
    frt_pool.n_workers = 0;
    frt_pool.n_sleeping = 0;
    atomic_flag_clear(&frt_pool.busy);
}

/* Start workers up to n (called with mu held). */
static void frt_pool_grow(int n) {
    if (n > FRT_MAX_WORKERS) n = FRT_MAX_WORKERS;
    if (!frt_pool.atfork_set) {
        pthread_atfork(NULL, NULL, frt_pool_atfork_child);
        frt_pool.atfork_set = 1;
    }
    if (frt_pool.spin_ns < 0) {
        const char *env = getenv("FLASHRT_SPIN_US");
        long us = env ? atol(env) : 50;
        frt_pool.spin_ns = (us < 0 ? 0 : us) * 1000;
    }
    while (frt_pool.n_workers < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        uint32_t g = atomic_load_explicit(&frt_pool.gen, memory_order_relaxed);
        int rc = pthread_create(&th, &attr, frt_worker_main, (void *)(uintptr_t)g);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;          /* run with the workers we have */
        frt_pool.n_workers++;
    }
}

/* Run fn(ctx, c) for every c in [0, n_chunks), on the caller and up to n_threads - 1 workers. */
static void frt_parallel_for(frt_chunk_fn fn, void *ctx, int64_t n_chunks, int n_threads) {
    if (n_chunks <= 0) return;
    if (n_threads <= 1 || n_chunks == 1 || n_chunks > 0xffffffffLL ||
        atomic_flag_test_and_set_explicit(&frt_pool.busy, memory_order_acquire)) {
        for (int64_t c = 0; c < n_chunks; c++) fn(ctx, c);
        return;
    }
    int helpers = n_threads - 1;
    if (helpers > n_chunks - 1) helpers = (int)(n_chunks - 1);
    pthread_mutex_lock(&frt_pool.mu);
    if (frt_pool.n_workers < helpers) frt_pool_grow(helpers);
    frt_pool.fn = fn;
    frt_pool.ctx = ctx;
    frt_pool.n_chunks = n_chunks;
    frt_pool.max_helpers = helpers;
    atomic_store_explicit(&frt_pool.done, 0, memory_order_relaxed);
    atomic_store_explicit(&frt_pool.helpers_joined, 0, memory_order_relaxed);
    uint32_t g = atomic_load_explicit(&frt_pool.gen, memory_order_relaxed) + 1;
    atomic_store_explicit(&frt_pool.claim, (uint64_t)g << 32, memory_order_relaxed);
    atomic_store_explicit(&frt_pool.gen, g, memory_order_release);
    if (frt_pool.n_sleeping > 0) pthread_cond_broadcast(&frt_pool.cv);
    pthread_mutex_unlock(&frt_pool.mu);

    frt_run_chunks(g, fn, ctx, n_chunks);
    /* Only chunks another thread already claimed remain: wait for them. */
    int spins = 0;
    while (atomic_load_explicit(&frt_pool.done, memory_order_acquire) < n_chunks) {
        frt_cpu_relax();
        if (++spins > 4096) sched_yield();
    }
    atomic_flag_clear_explicit(&frt_pool.busy, memory_order_release);
}

/* CPUs this process may run on (the affinity mask), else the online CPUs. */
static int frt_default_threads(void) {
#if defined(__linux__) && defined(CPU_COUNT)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
#ifdef _SC_NPROCESSORS_ONLN
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
#else
    return 1;
#endif
}

static inline int frt_resolve_threads(int n_threads) {
    return n_threads > 0 ? n_threads : frt_default_threads();
}

/* ================================================================== parallel kernels */

/* Minimum elements per chunk (tests shrink them to split tiny problems). */
#define FRT_GEMV_MAX_CHUNKS 64
#define FRT_FFN_MAX_CHUNKS 16
static int64_t FRT_GEMV_CHUNK_ELEMS = 32 * 1024;
static int64_t FRT_FFN_CHUNK_ELEMS = 128 * 1024;
static int64_t FRT_CONV_CHUNK_ELEMS = 64 * 1024;

/* elems <= 0 restores the defaults; returns the previous gemv chunk size. */
static int64_t frt_set_chunk_elems(int64_t elems) {
    int64_t old = FRT_GEMV_CHUNK_ELEMS;
    FRT_GEMV_CHUNK_ELEMS = elems > 0 ? elems : 32 * 1024;
    FRT_FFN_CHUNK_ELEMS = elems > 0 ? elems : 128 * 1024;
    FRT_CONV_CHUNK_ELEMS = elems > 0 ? elems : 64 * 1024;
    return old;
}

/* Per-thread scratch (kept between calls): the quantized x of a quantized kernel, then the
   FFN's per-chunk partial sums. Returns NULL if it could not be allocated. */
static __thread void *frt_scratch = NULL;
static __thread size_t frt_scratch_bytes = 0;

static void *frt_get_scratch(size_t bytes) {
    if (frt_scratch_bytes < bytes) {
        free(frt_scratch);
        frt_scratch = malloc(bytes);
        frt_scratch_bytes = frt_scratch ? bytes : 0;
    }
    return frt_scratch;
}

/* x quantized per block of 32 for the integer dot products (see quant.h). */
typedef struct { const int8_t *q; const float *d, *s; } frt_xq_t;

/* Bytes of scratch the quantized copy of x (k,) takes: q, then (64-aligned) d and s. */
static size_t frt_xq_bytes(int64_t k) {
    return ((((size_t)k + 63) & ~(size_t)63) + 2 * sizeof(float) * (size_t)(k / FRT_QK) + 63)
           & ~(size_t)63;
}

/* Quantize x (k,) into scratch (frt_xq_bytes(k) bytes at its start). */
static frt_xq_t frt_xq_fill(void *scratch, const float *x, int64_t k) {
    frt_xq_t q;
    int8_t *qq = (int8_t *)scratch;
    float *d = (float *)(qq + ((k + 63) & ~(int64_t)63)), *s = d + k / FRT_QK;
    frt_quantize_x(x, k, qq, d, s);
    q.q = qq; q.d = d; q.s = s;
    return q;
}

typedef struct {
    const void *W; const float *x; float *out;
    frt_xq_t xq;
    int64_t n, k, rows_per_chunk;
    int type;
} frt_gemv_job;

/* out[r0:r1] = W[r0:r1] @ x, one thread. */
static void frt_gemv_rows(const frt_gemv_job *j, int64_t r0, int64_t r1) {
    const int64_t k = j->k;
    switch (j->type) {
    case FRT_T_F32: frt_gemv_f32((const float *)j->W + r0 * k, j->x, j->out + r0, r1 - r0, k); break;
    case FRT_T_F16: frt_gemv_f16((const uint16_t *)j->W + r0 * k, j->x, j->out + r0, r1 - r0, k); break;
    default:
        frt_gemv_q(j->type, (const uint8_t *)j->W + r0 * frt_row_bytes(j->type, k), j->xq.q,
                   j->xq.d, j->xq.s, j->out + r0, r1 - r0, k / FRT_QK);
    }
}

static void frt_gemv_chunk(void *p, int64_t c) {
    const frt_gemv_job *j = (const frt_gemv_job *)p;
    int64_t r0 = c * j->rows_per_chunk, r1 = r0 + j->rows_per_chunk;
    if (r1 > j->n) r1 = j->n;
    if (r1 > r0) frt_gemv_rows(j, r0, r1);
}

/* out (n,) = W (n, k) @ x for W of storage type `type` (k % 32 == 0 for quantized types),
   rows split into chunks of whole 4-row groups. Returns 0, or -1 if scratch memory could not
   be allocated. */
static int frt_gemv_par(const void *W, int type, const float *x, float *out,
                        int64_t n, int64_t k, int n_threads) {
    frt_gemv_job j = {W, x, out, {NULL, NULL, NULL}, n, k, n, type};
    if (frt_type_is_quant(type)) {
        void *scratch = frt_get_scratch(frt_xq_bytes(k));
        if (scratch == NULL) return -1;
        j.xq = frt_xq_fill(scratch, x, k);
    }
    int64_t work = n * k, n_chunks = work / FRT_GEMV_CHUNK_ELEMS;
    if (n_chunks > FRT_GEMV_MAX_CHUNKS) n_chunks = FRT_GEMV_MAX_CHUNKS;
    if (n_chunks > (n + 3) / 4) n_chunks = (n + 3) / 4;
    n_threads = frt_resolve_threads(n_threads);
    if (n_chunks <= 1 || n_threads <= 1) {
        frt_gemv_rows(&j, 0, n);
        return 0;
    }
    j.rows_per_chunk = ((n + n_chunks - 1) / n_chunks + 3) & ~(int64_t)3;
    frt_parallel_for(frt_gemv_chunk, &j, (n + j.rows_per_chunk - 1) / j.rows_per_chunk, n_threads);
    return 0;
}

typedef struct {
    const void *rows; const float *x; const float *up_bias; float *h_out; float *acc;
    frt_xq_t xq;
    int64_t n, d, rows_per_chunk;
    int gated;
    frt_act_t act;
    int type, type_down;
    int64_t c0;                    /* chunk index offset (chunks run after a wait) */
} frt_ffn_job;

/* acc += the FFN over rows [r0, r1), one thread. */
static void frt_ffn_block(const frt_ffn_job *j, int64_t r0, int64_t r1, float *acc) {
    const int64_t rb = (j->gated ? 2 : 1) * frt_row_bytes(j->type, j->d) + frt_row_bytes(j->type_down, j->d);
    const float *b = j->up_bias ? j->up_bias + r0 : NULL;
    float *h = j->h_out ? j->h_out + r0 : NULL;
    const void *rows = (const uint8_t *)j->rows + r0 * rb;
    switch (j->type) {
    case FRT_T_F32:
        frt_ffn_rows_f32((const float *)rows, r1 - r0, j->d, j->gated, j->act, j->x, b, h, acc);
        break;
    case FRT_T_F16:
        frt_ffn_rows_f16((const uint16_t *)rows, r1 - r0, j->d, j->gated, j->act, j->x, b, h, acc);
        break;
    default:
        frt_ffn_rows_q(j->type, j->type_down, (const uint8_t *)rows, r1 - r0, j->d / FRT_QK, j->gated, j->act,
                       j->xq.q, j->xq.d, j->xq.s, b, h, acc);
    }
}

static void frt_ffn_chunk(void *p, int64_t c) {
    const frt_ffn_job *j = (const frt_ffn_job *)p;
    c += j->c0;
    int64_t r0 = c * j->rows_per_chunk, r1 = r0 + j->rows_per_chunk;
    if (r1 > j->n) r1 = j->n;
    float *acc = j->acc + c * j->d;
    memset(acc, 0, (size_t)j->d * sizeof(float));
    if (r1 > r0) frt_ffn_block(j, r0, r1, acc);
}

/* How frt_ffn_rows_par splits n rows of dim d: the chunk count (1: no split) and the rows per
   chunk. The split depends on the shape only, so results do not depend on n_threads. */
static void frt_ffn_split(int64_t n, int64_t d, int gated, int64_t *n_chunks_out, int64_t *rpc_out) {
    int64_t row_elems = (gated ? 3 : 2) * d;
    int64_t n_chunks = n * row_elems / FRT_FFN_CHUNK_ELEMS;
    if (n_chunks > FRT_FFN_MAX_CHUNKS) n_chunks = FRT_FFN_MAX_CHUNKS;
    if (n_chunks > n) n_chunks = n;
    int64_t rows_per_chunk = n_chunks > 1 ? (n + n_chunks - 1) / n_chunks : n;
    if (n_chunks > 1) n_chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
    if (n_chunks < 1) n_chunks = 1;
    *n_chunks_out = n_chunks;
    *rpc_out = rows_per_chunk;
}

/* Rows frt_ffn_rows_wait computes before it waits, when rows [0, n_ready) are ready: the
   chunks that lie wholly inside them (0 when the rows are not split). */
static int64_t frt_ffn_ready_rows(int64_t n, int64_t d, int gated, int64_t n_ready) {
    int64_t n_chunks, rpc;
    if (n_ready >= n) return n;
    frt_ffn_split(n, d, gated, &n_chunks, &rpc);
    if (n_chunks <= 1 || n_ready <= 0) return 0;
    return n_ready / rpc * rpc;
}

/* out (d,) = sum_i h_i down_i over n bundle rows of storage type `type` (d % 32 == 0 for
   quantized types) whose down parts are `type_down` (== type for float types; any quantized
   type for quantized ones). Rows [n_ready, n) may still be arriving: the chunks wholly inside
   [0, n_ready) run first, then wait(wait_ctx) blocks until the rest has landed, then the other
   chunks run; the partial sums add up in the same fixed order, so the result is bit for bit
   the one without a wait (wait NULL: every row is ready). Returns 0, or -1 if scratch memory
   could not be allocated (then wait has been called, too). */
static int frt_ffn_rows_wait(const void *rows, int type, int type_down, int64_t n, int64_t d,
                             int gated, frt_act_t act,
                             const float *x, const float *up_bias, float *h_out, float *out,
                             int n_threads, int64_t n_ready, void (*wait)(void *), void *wait_ctx) {
    int64_t n_chunks, rows_per_chunk;
    frt_ffn_split(n, d, gated, &n_chunks, &rows_per_chunk);
    frt_ffn_job j = {rows, x, up_bias, h_out, NULL, {NULL, NULL, NULL}, n, d, n, gated, act, type,
                     type_down, 0};
    size_t xq_bytes = frt_type_is_quant(type) ? frt_xq_bytes(d) : 0;
    size_t acc_bytes = n_chunks > 1 ? (size_t)(n_chunks * d) * sizeof(float) : 0;
    void *scratch = frt_get_scratch(xq_bytes + acc_bytes + 64);
    if (scratch == NULL) {
        if (wait) wait(wait_ctx);
        return -1;
    }
    if (xq_bytes) j.xq = frt_xq_fill(scratch, x, d);
    memset(out, 0, (size_t)d * sizeof(float));
    if (n_chunks <= 1) {
        if (wait) wait(wait_ctx);
        frt_ffn_block(&j, 0, n, out);
        return 0;
    }
    j.rows_per_chunk = rows_per_chunk;
    j.acc = (float *)((uint8_t *)scratch + xq_bytes);
    int64_t k = n_chunks;
    if (wait) k = n_ready >= n ? n_chunks : (n_ready > 0 ? n_ready / rows_per_chunk : 0);
    n_threads = frt_resolve_threads(n_threads);
    frt_parallel_for(frt_ffn_chunk, &j, k, n_threads);
    if (wait) wait(wait_ctx);
    if (k < n_chunks) {
        j.c0 = k;
        frt_parallel_for(frt_ffn_chunk, &j, n_chunks - k, n_threads);
    }
    for (int64_t c = 0; c < n_chunks; c++) {          /* fixed order: deterministic */
        const float *a = j.acc + c * d;
        for (int64_t i = 0; i < d; i++) out[i] += a[i];
    }
    return 0;
}

static int frt_ffn_rows_par(const void *rows, int type, int type_down, int64_t n, int64_t d,
                            int gated, frt_act_t act,
                            const float *x, const float *up_bias, float *h_out, float *out,
                            int n_threads) {
    return frt_ffn_rows_wait(rows, type, type_down, n, d, gated, act, x, up_bias, h_out, out,
                             n_threads, n, NULL, NULL);
}

typedef struct { const void *src; float *out; int64_t n; frt_act_t act; int type; } frt_conv_job;

/* Elements per conversion chunk: a whole number of blocks. */
static inline int64_t frt_conv_per_chunk(void) {
    return FRT_CONV_CHUNK_ELEMS < FRT_QK ? FRT_QK : FRT_CONV_CHUNK_ELEMS / FRT_QK * FRT_QK;
}

static void frt_conv_chunk(void *p, int64_t c) {
    const frt_conv_job *j = (const frt_conv_job *)p;
    int64_t per = frt_conv_per_chunk(), r0 = c * per, r1 = r0 + per;
    if (r1 > j->n) r1 = j->n;
    if (r1 <= r0) return;
    switch (j->type) {
    case FRT_T_F32: memcpy(j->out + r0, (const float *)j->src + r0, (size_t)(r1 - r0) * sizeof(float)); break;
    case FRT_T_F16: frt_f16_to_f32((const uint16_t *)j->src + r0, j->out + r0, r1 - r0); break;
    default:
        frt_dequant_for(j->type)((const uint8_t *)j->src + r0 / FRT_QK * frt_type_unit_bytes(j->type),
                                 j->out + r0, (r1 - r0) / FRT_QK);
    }
}

/* out (n,) float32 = the n elements stored in src with storage type `type` (n % 32 == 0 for
   quantized types; quantized results bit-exact with gguf.quants.dequantize). */
static void frt_to_f32_par(const void *src, int type, float *out, int64_t n, int n_threads) {
    frt_conv_job j = {src, out, n, {0, 0.0f}, type};
    int64_t per = frt_conv_per_chunk();
    frt_parallel_for(frt_conv_chunk, &j, (n + per - 1) / per, frt_resolve_threads(n_threads));
}

static void frt_f16_to_f32_par(const uint16_t *src, float *out, int64_t n, int n_threads) {
    frt_to_f32_par(src, FRT_T_F16, out, n, n_threads);
}

static void frt_act_chunk(void *p, int64_t c) {
    const frt_conv_job *j = (const frt_conv_job *)p;
    int64_t per = FRT_CONV_CHUNK_ELEMS / 8 > 0 ? FRT_CONV_CHUNK_ELEMS / 8 : 1;
    int64_t r0 = c * per, r1 = r0 + per;
    if (r1 > j->n) r1 = j->n;
    if (r1 > r0) frt_act_inplace(j->out + r0, r1 - r0, j->act);
}

static void frt_act_inplace_par(float *a, int64_t n, frt_act_t act, int n_threads) {
    frt_conv_job j = {NULL, a, n, act, 0};
    int64_t per = FRT_CONV_CHUNK_ELEMS / 8 > 0 ? FRT_CONV_CHUNK_ELEMS / 8 : 1;
    frt_parallel_for(frt_act_chunk, &j, (n + per - 1) / per, frt_resolve_threads(n_threads));
}

#endif /* FLASHRT_SIMD_H */
