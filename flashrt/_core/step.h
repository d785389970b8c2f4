/* The small operations of one decode step, fused: an RMS norm, rotary embeddings in place,
 * and attention of one query over the KV cache. Each is a few microseconds of arithmetic that
 * NumPy spreads over 5-15 calls of ~2-5 us each; across SmolLM2's 30 layers that per-call cost
 * was a quarter of a token (bench/bench_dense.py). The NumPy functions in models/base.py stay
 * the definition and the general path (prefill, float16 KV caches); these run decode.
 *
 * Included by kernels.pyx after simd.h (same code path switch, same scratch).
 */
#ifndef FLASHRT_STEP_H
#define FLASHRT_STEP_H

#include "simd.h"

/* out (T, d) = x * w / sqrt(mean(x^2) + eps) per row (the mean in double, as HF does in
   float32 up to rounding). out may alias x. */
static void frt_rms_norm(const float *x, const float *w, float eps, float *out, int64_t T,
                         int64_t d) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * d;
        float *o = out + t * d;
        double ss = 0.0;
        for (int64_t j = 0; j < d; j++) ss += (double)xr[j] * xr[j];
        const float r = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
        for (int64_t j = 0; j < d; j++) o[j] = (xr[j] * r) * w[j];
    }
}

/* x (T, H, hd) rotated in place, HF's rotate_half pairing (i with i + hd/2); cos, sin
   (T, hd/2) are the tables' rows for the T positions. The same float32 operations as
   Rope.apply_, so the results are equal bit for bit. */
static void frt_rope(float *x, const float *cos_t, const float *sin_t, int64_t T, int64_t H,
                     int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < H; h++) {
            float *a = x + (t * H + h) * hd, *b = a + half;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = a[i], x2 = b[i];
                float p = x1 * c[i], q = x2 * s[i];
                a[i] = p - q;
                p = x2 * c[i]; q = x1 * s[i];
                b[i] = p + q;
            }
        }
    }
}

static inline float frt_dot_f32(const float *a, const float *b, int64_t n) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2) return frt_dot_f32_avx2(a, b, n);
#endif
    return frt_dot_f32_scalar(a, b, n);
}

static inline void frt_axpy_f32(float *acc, float h, const float *w, int64_t n) {
#if FRT_X86
    if (frt_path == FRT_PATH_AVX2) { frt_axpy2_f32_avx2(acc, h, w, 0.f, NULL, n); return; }
#endif
    frt_axpy_f32_scalar(acc, h, w, n);
}

/* One query (its position is S - 1) over keys[first:S], values[first:S] (S, n_kv, hd):
   out (n_heads * hd) = softmax(q_h . k * scale) @ v per head; query head h reads kv head
   h / (n_heads / n_kv) (HF's repeat_kv). `first` > 0 is a sliding window's left edge.
   Returns -1 when the scratch for the S scores cannot be allocated. */
static int frt_attend_one(const float *q, const float *K, const float *V, int64_t S,
                          int64_t first, int64_t n_heads, int64_t n_kv, int64_t hd, float scale,
                          float *out) {
    const int64_t group = n_heads / n_kv, n = S - first, stride = n_kv * hd;
    float *p = (float *)frt_get_scratch((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (p == NULL) return -1;
    for (int64_t h = 0; h < n_heads; h++) {
        const int64_t g = h / group;
        const float *qh = q + h * hd, *Kg = K + first * stride + g * hd, *Vg = V + first * stride + g * hd;
        float *o = out + h * hd;
        float m = -INFINITY;
        for (int64_t s = 0; s < n; s++) {
            p[s] = frt_dot_f32(Kg + s * stride, qh, hd) * scale;
            if (p[s] > m) m = p[s];
        }
        float sum = 0.f;
        for (int64_t s = 0; s < n; s++) { p[s] = expf(p[s] - m); sum += p[s]; }
        const float inv = 1.0f / sum;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int64_t s = 0; s < n; s++) frt_axpy_f32(o, p[s] * inv, Vg + s * stride, hd);
    }
    return 0;
}

#endif /* FLASHRT_STEP_H */
