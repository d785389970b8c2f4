"""The KV cache: preallocated keys and values for every layer, filled left to right.

One forward pass over T tokens writes each layer's new keys/values at positions
[length, length + T) with `append(layer, k, v)` (which returns views of everything
cached so far, the new tokens included) and then moves `length` on once with
`advance(T)`, after the last layer. Nothing is allocated after construction.
"""

import numpy as np

from flashrt.errors import GenerationError


class KVCache:
    def __init__(self, n_layers, max_seq, n_kv_heads, head_dim, dtype=np.float32):
        if min(n_layers, max_seq, n_kv_heads, head_dim) <= 0:
            raise ValueError(
                f"KVCache sizes must be positive, got n_layers={n_layers} max_seq={max_seq} "
                f"n_kv_heads={n_kv_heads} head_dim={head_dim}"
            )
        self.n_layers = n_layers
        self.max_seq = max_seq
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        shape = (n_layers, max_seq, n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=self.dtype)  # (n_layers, max_seq, n_kv_heads, head_dim)
        self.v = np.zeros(shape, dtype=self.dtype)  # (n_layers, max_seq, n_kv_heads, head_dim)
        self.length = 0  # positions filled (and seen by every layer)

    @staticmethod
    def bytes_needed(n_layers, max_seq, n_kv_heads, head_dim, dtype=np.float32):
        """What a cache of this size costs, for budget planning before allocating it."""
        return 2 * n_layers * max_seq * n_kv_heads * head_dim * np.dtype(dtype).itemsize

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    @property
    def remaining(self):
        return self.max_seq - self.length

    def check_room(self, n_tokens):
        """Raise GenerationError unless n_tokens more positions fit."""
        if self.length + n_tokens > self.max_seq:
            raise GenerationError(
                f"context full: {self.length} tokens cached + {n_tokens} new > max_seq "
                f"{self.max_seq}; use a shorter prompt/fewer new tokens or a larger context"
            )

    def append(self, layer, k, v):
        """Store k, v (T, n_kv_heads, head_dim) at [length, length+T) of `layer`.

        Returns views (length+T, n_kv_heads, head_dim) of the layer's keys and values.
        Does not move `length`: call `advance(T)` once all layers have appended.
        """
        T = k.shape[0]
        self.check_room(T)
        end = self.length + T
        self.k[layer, self.length:end] = k
        self.v[layer, self.length:end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, n_tokens):
        self.check_room(n_tokens)
        self.length += n_tokens

    def truncate(self, length):
        """Forget every position from `length` on (e.g. to re-run part of a prompt)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reset(self):
        self.length = 0

    def __repr__(self):
        return (
            f"KVCache(n_layers={self.n_layers}, max_seq={self.max_seq}, n_kv_heads={self.n_kv_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype.name}, length={self.length}, "
            f"{self.nbytes / 2**20:.1f} MiB)"
        )
