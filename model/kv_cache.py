"""The key/value cache of autoregressive decoding: preallocated per stack, written in place one step at a time.

A stack of N layers keeps keys and values for M slots, ``(N, B, M, G, K)``; a call with L new tokens writes
them at slots ``index .. index + L - 1`` with dynamic_update_slice (in place inside a jitted loop) and
attends over all M slots, masked by ``valid``. Rows share one write index, so a batch of prompts is
left-padded: padding slots stay invalid and positions are counted over real tokens only, as
transformers' generate does. An encoder-decoder also keeps its cross-attention keys/values, ``(N, B, S,
G, K)``, computed once from the encoder output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: Array  # (N, B, M, G, K) self-attention keys of every layer
    v: Array
    valid_BM: Array  # bool: slot holds a real (unpadded) token
    positions_BM: Array  # int32 position of the token in each slot (rotary, ALiBi, learned)
    index: Array  # int32 scalar: the slot the next token goes to
    cross_k: Array | None = None  # (N, B, S, G, K) cross-attention keys (encoder-decoders)
    cross_v: Array | None = None

    @classmethod
    def create(
        cls, *, layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype, source_len: int = 0
    ) -> KVCache:
        def zeros(shape):
            return jnp.zeros(shape, dtype)

        cross = (zeros((layers, batch, source_len, kv_heads, head_dim)),) * 2 if source_len else (None, None)
        return cls(
            k=zeros((layers, batch, slots, kv_heads, head_dim)),
            v=zeros((layers, batch, slots, kv_heads, head_dim)),
            valid_BM=jnp.zeros((batch, slots), bool),
            positions_BM=jnp.zeros((batch, slots), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            cross_k=cross[0],
            cross_v=cross[1],
        )

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def append(self, valid_BL: Array, positions_BL: Array | None = None) -> KVCache:
        """Mark the slots of L new tokens (valid where ``valid_BL``); keys/values are written per layer.
        Default positions continue the count of real tokens (HF: cumsum(attention_mask) - 1)."""
        valid_BL = valid_BL.astype(bool)
        if positions_BL is None:
            seen_B = jnp.sum(self.valid_BM, axis=1, dtype=jnp.int32)
            positions_BL = jnp.maximum(seen_B[:, None] + jnp.cumsum(valid_BL, axis=1, dtype=jnp.int32) - 1, 0)
        at = (0, self.index)
        return dataclasses.replace(
            self,
            valid_BM=jax.lax.dynamic_update_slice(self.valid_BM, valid_BL, at),
            positions_BM=jax.lax.dynamic_update_slice(self.positions_BM, positions_BL.astype(jnp.int32), at),
        )

    def new_positions(self, L: int) -> Array:
        """Positions of the L tokens just appended (B, L)."""
        return jax.lax.dynamic_slice_in_dim(self.positions_BM, self.index, L, axis=1)

    def advance(self, L: int) -> KVCache:
        return dataclasses.replace(self, index=self.index + L)

    def self_mask(self, L: int) -> Array:
        """(B, 1, L, M): a query in slot index + i sees valid slots up to its own (and always itself, so a
        padding query's softmax row is never empty)."""
        q_slots = self.index + jnp.arange(L)[:, None]
        slots = jnp.arange(self.slots)[None, :]
        causal_LM = slots <= q_slots
        return (self.valid_BM[:, None, :] & causal_LM[None] | (slots == q_slots)[None])[:, None]

    def write(self, layer: Array | int, k_BLGK: Array, v_BLGK: Array, *, cross: bool = False) -> KVCache:
        """Store one layer's new keys/values: self-attention at ``index``, cross-attention whole."""
        name_k, name_v, slot = ("cross_k", "cross_v", 0) if cross else ("k", "v", self.index)
        big_k, big_v = getattr(self, name_k), getattr(self, name_v)
        at = (layer, 0, slot, 0, 0)
        return dataclasses.replace(
            self,
            **{
                name_k: jax.lax.dynamic_update_slice(big_k, k_BLGK[None].astype(big_k.dtype), at),
                name_v: jax.lax.dynamic_update_slice(big_v, v_BLGK[None].astype(big_v.dtype), at),
            },
        )

    def read(self, layer: Array | int, *, cross: bool = False) -> tuple[Array, Array]:
        k, v = (self.cross_k, self.cross_v) if cross else (self.k, self.v)
        return k[layer], v[layer]

    def reorder(self, rows_B: Array) -> KVCache:
        """Rows picked by beam search: row b of the result is row ``rows_B[b]`` of this cache. Beams only
        move within their batch item, whose rows share one encoder output: the cross-attention
        keys/values stay as they are (copying them would double the traffic of every step)."""

        def take(x, axis):
            return jnp.take(x, rows_B, axis=axis)

        return dataclasses.replace(
            self,
            k=take(self.k, 1),
            v=take(self.v, 1),
            valid_BM=take(self.valid_BM, 0),
            positions_BM=take(self.positions_BM, 0),
        )
