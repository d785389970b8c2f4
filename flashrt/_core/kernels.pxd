# Pointer kernels of kernels.pyx, for other _core modules to cimport.
# All are GIL-free; each splits its rows into shape-determined chunks run by the caller and up
# to n_threads - 1 pool workers (n_threads <= 0: every CPU in the affinity mask).
# float16 data is passed as its uint16 bit patterns; quantized data as its bytes.
# `type` is a storage code (kernels.STORAGE_CODES: float32 0, float16 1, q8_0 2, q4_0 3, q4_1 4);
# quantized types need k (or d) a multiple of 32.
from libc.stdint cimport int64_t, uint16_t

cdef extern from "simd.h" nogil:
    ctypedef struct frt_act_t:  # an activation: its kind (kernels.ACT_CODES) and parameter
        int kind
        float param

# out (n,) = W (n, k) @ x (k,). Returns 0, or -1 when scratch memory could not be allocated.
cdef int gemv_ptr(const void* W, int type, const float* x, float* out,
                  int64_t n, int64_t k, int n_threads) noexcept nogil
cdef void gemv_f32_ptr(const float* W, const float* x, float* out,
                       int64_t n, int64_t k, int n_threads) noexcept nogil
cdef void gemv_f16_ptr(const uint16_t* W, const float* x, float* out,
                       int64_t n, int64_t k, int n_threads) noexcept nogil

# out (d,) = sum_i h_i * down_i over n bundle rows (n, n_parts parts of d weights; the down part
# stored as type_down, == type for float types); h_out (n,) or NULL; up_bias (n,) or NULL.
# Returns 0, or -1 when scratch memory could not be allocated.
cdef int ffn_rows_ptr(const void* rows, int type, int type_down, int64_t n, int64_t d, int gated,
                      frt_act_t act, const float* x, const float* up_bias, float* h_out, float* out,
                      int n_threads) noexcept nogil
cdef int ffn_rows_f32_ptr(const float* rows, int64_t n, int64_t d, int gated, frt_act_t act,
                          const float* x, const float* up_bias, float* h_out, float* out,
                          int n_threads) noexcept nogil
cdef int ffn_rows_f16_ptr(const uint16_t* rows, int64_t n, int64_t d, int gated, frt_act_t act,
                          const float* x, const float* up_bias, float* h_out, float* out,
                          int n_threads) noexcept nogil

# out (n,) = float32(the n elements stored in src as `type`)
cdef void to_f32_ptr(const void* src, int type, float* out, int64_t n, int n_threads) noexcept nogil
cdef void f16_to_f32_ptr(const uint16_t* src, float* out, int64_t n, int n_threads) noexcept nogil
