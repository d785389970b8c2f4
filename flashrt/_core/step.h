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

/* Heads [h0, h1) of one query over keys[first:S], values[first:S] (see frt_attend_one); p is
   scratch for the S - first scores. */
static void frt_attend_heads(const float *q, const float *K, const float *V, int64_t S,
                             int64_t first, int64_t n_heads, int64_t n_kv, int64_t hd, float scale,
                             float *out, float *p, int64_t h0, int64_t h1) {
    const int64_t group = n_heads / n_kv, n = S - first, stride = n_kv * hd;
    for (int64_t h = h0; h < h1; h++) {
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
}

typedef struct {
    const float *q, *K, *V; float *out;
    int64_t S, first, n_heads, n_kv, hd;
    float scale;
    _Atomic int failed;            /* a thread could not allocate its scores */
} frt_attend_job;

static void frt_attend_chunk(void *ctx, int64_t h) {
    frt_attend_job *j = (frt_attend_job *)ctx;
    float *p = (float *)frt_get_scratch((size_t)(j->S - j->first) * sizeof(float));
    if (p == NULL) { j->failed = 1; return; }
    frt_attend_heads(j->q, j->K, j->V, j->S, j->first, j->n_heads, j->n_kv, j->hd, j->scale, j->out,
                     p, h, h + 1);
}

/* Fewer scores than this per head stay on the caller (a pool round trip costs a few us). */
#define FRT_ATTEND_PAR_MIN 64

/* One query (its position is S - 1) over keys[first:S], values[first:S] (S, n_kv, hd):
   out (n_heads * hd) = softmax(q_h . k * scale) @ v per head; query head h reads kv head
   h / (n_heads / n_kv) (HF's repeat_kv). `first` > 0 is a sliding window's left edge.
   Heads are split across n_threads when each has FRT_ATTEND_PAR_MIN scores or more (the
   same arithmetic per head either way). Returns -1 when the scratch for the S scores cannot
   be allocated. */
static int frt_attend_one_par(const float *q, const float *K, const float *V, int64_t S,
                              int64_t first, int64_t n_heads, int64_t n_kv, int64_t hd, float scale,
                              float *out, int n_threads) {
    const int64_t n = S - first;
    if (n_threads > 1 && n_heads > 1 && n >= FRT_ATTEND_PAR_MIN) {
        frt_attend_job j = {q, K, V, out, S, first, n_heads, n_kv, hd, scale, 0};
        frt_parallel_for(frt_attend_chunk, &j, n_heads, n_threads);
        return j.failed ? -1 : 0;
    }
    float *p = (float *)frt_get_scratch((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (p == NULL) return -1;
    frt_attend_heads(q, K, V, S, first, n_heads, n_kv, hd, scale, out, p, 0, n_heads);
    return 0;
}

static int frt_attend_one(const float *q, const float *K, const float *V, int64_t S,
                          int64_t first, int64_t n_heads, int64_t n_kv, int64_t hd, float scale,
                          float *out) {
    return frt_attend_one_par(q, K, V, S, first, n_heads, n_kv, hd, scale, out, 1);
}

/* The attention half of one decode step of a llama-like layer, in one call (position pos,
   x the residual stream, everything float32 but the weights):
       x += add                         (add: the previous layer's FFN output, or NULL)
       xn = rms_norm(x, in_w)
       qkv = Wqkv @ xn (+ bqkv)         (q, k, v as row blocks of one matrix, base.fuse_rows)
       rope q (n_heads heads) and k (n_kv heads) at pos; K[pos], V[pos] = k, v
       att = attention of q over K[first..pos], V[first..pos]      (frt_attend_one)
       x += Wo @ att (+ bo);  xn = rms_norm(x, post_w)   (the FFN's input)
   The same float32 operations in the same order as llama.Model.attention and forward run
   them one NumPy/kernel call at a time, so the results are equal bit for bit; what goes is
   the ~12 Python-level calls per layer between them. K, V: the layer's (max_seq, n_kv, hd)
   cache. qkv ((n_heads + 2 n_kv) hd), att (n_heads hd), o (d): caller's scratch. Returns 0, or
   -1 when scratch memory could not be allocated. */
static int frt_attn_step(float *x, const float *add, const float *in_w, const float *post_w,
                         float eps, const void *Wqkv, int t_qkv, const float *bqkv,
                         const void *Wo, int t_o, const float *bo, int64_t d, int64_t n_heads,
                         int64_t n_kv, int64_t hd, const float *cos_row, const float *sin_row,
                         float *K, float *V, int64_t pos, int64_t first, float scale,
                         float *qkv, float *att, float *o, float *xn, int n_threads) {
    const int64_t nq = n_heads * hd, nk = n_kv * hd, n_qkv = nq + 2 * nk;
    if (add != NULL)
        for (int64_t j = 0; j < d; j++) x[j] += add[j];
    frt_rms_norm(x, in_w, eps, xn, 1, d);
    if (frt_gemv_par(Wqkv, t_qkv, xn, qkv, n_qkv, d, n_threads) != 0) return -1;
    if (bqkv != NULL)
        for (int64_t j = 0; j < n_qkv; j++) qkv[j] += bqkv[j];
    frt_rope(qkv, cos_row, sin_row, 1, n_heads, hd);
    frt_rope(qkv + nq, cos_row, sin_row, 1, n_kv, hd);
    memcpy(K + pos * nk, qkv + nq, (size_t)nk * sizeof(float));
    memcpy(V + pos * nk, qkv + nq + nk, (size_t)nk * sizeof(float));
    if (frt_attend_one_par(qkv, K, V, pos + 1, first, n_heads, n_kv, hd, scale, att,
                           frt_resolve_threads(n_threads)) != 0) return -1;
    if (frt_gemv_par(Wo, t_o, att, o, d, nq, n_threads) != 0) return -1;
    if (bo != NULL)
        for (int64_t j = 0; j < d; j++) o[j] += bo[j];
    for (int64_t j = 0; j < d; j++) x[j] += o[j];
    frt_rms_norm(x, post_w, eps, xn, 1, d);
    return 0;
}

#endif /* FLASHRT_STEP_H */
