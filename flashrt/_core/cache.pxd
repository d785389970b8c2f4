from libc.stdint cimport int32_t, int64_t, uint8_t


cdef class NeuronCache:
    cdef readonly int64_t n_neurons
    cdef readonly int64_t capacity
    cdef readonly int64_t row_elems
    cdef readonly object dtype
    cdef public int64_t window
    cdef readonly int64_t n_used
    cdef readonly object rows          # (capacity, row_elems) float16|float32|uint8
    cdef readonly object slot_to_id    # (capacity,) int32
    cdef readonly object id_to_slot    # (n_neurons,) int32
    cdef readonly object last_used     # (capacity,) int64
    cdef char* p_rows
    cdef int64_t row_bytes
    cdef int32_t* p_slot_to_id
    cdef int32_t* p_id_to_slot
    cdef int64_t* p_last_used
    cdef object _sel_stamp             # (n_neurons,) int64 scratch: admit call that selected it
    cdef int64_t* p_sel_stamp
    cdef int64_t stamp
    cdef object _spec                  # (capacity,) uint8: guessed by prefetch, not selected since
    cdef uint8_t* p_spec
    cdef readonly int64_t n_ghost      # neurons displaced by the last prefetch
    cdef object _ghost_ids             # (capacity + 1,) int64
    cdef object _ghost_last            # (capacity + 1,) int64
    cdef object _ghost_of              # (n_neurons,) int32: 1 + index into _ghost_ids, 0
    cdef int64_t* p_ghost_ids
    cdef int64_t* p_ghost_last
    cdef int32_t* p_ghost_of
    cdef object _missing               # (capacity + 1,) int64 scratch
    cdef int64_t* p_missing
    cdef int64_t st_hits, st_misses, st_ev_window, st_ev_lru, st_dropped
    cdef int64_t st_prefetched, st_pf_hits, st_pf_wasted, st_restored, st_moved

    cdef void _free_slot(self, int64_t s) noexcept nogil
    cdef int64_t _expire(self, int64_t step) noexcept nogil
    cdef void _compact(self) noexcept nogil
    cdef object _ids(self, selected)


cdef class ExpertCache:
    cdef readonly int64_t n_ids
    cdef readonly int64_t capacity
    cdef readonly int64_t row_elems
    cdef readonly object dtype
    cdef readonly int64_t n_used
    cdef readonly object rows          # (capacity, row_elems)
    cdef readonly object slot_to_id    # (capacity,) int32, -1 = free
    cdef readonly object id_to_slot    # (n_ids,) int32
    cdef readonly object last_used     # (capacity,) int64
    cdef readonly object pinned        # (capacity,) uint8
    cdef object _spec                  # (capacity,) uint8: prefetched, not selected since
    cdef object _sel_stamp             # (n_ids,) int64 scratch
    cdef int32_t* p_slot_to_id
    cdef int32_t* p_id_to_slot
    cdef int64_t* p_last_used
    cdef uint8_t* p_pinned
    cdef uint8_t* p_spec
    cdef int64_t* p_sel_stamp
    cdef int64_t stamp
    cdef int64_t st_hits, st_misses, st_evictions, st_dropped, st_prefetched, st_pf_hits, st_pf_wasted

    cdef int64_t _evict_lru(self, int64_t need, int64_t stamp, bint protect_selected) noexcept nogil
    cdef void _place(self, int64_t* ids, int64_t n, int64_t step, int64_t* slots_out, bint spec) noexcept nogil
    cdef object _ids(self, selected)
