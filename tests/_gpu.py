"""Helpers of the GPU test files: fresh random keys and a NaN-poisoned allocator."""

import jax
import jax.numpy as jnp
import numpy as np

_RNG = np.random.default_rng()


def random_key():
  """A key drawn anew per call, so repeated runs cover other inputs."""
  return jax.random.key(int(_RNG.integers(1 << 30)))


def poison_allocator():
  """Fills and frees 1 GiB of device memory with NaN: a kernel that reads memory it never
  wrote then gives NaN instead of a stale right answer."""
  bufs = [jnp.full((1 << 26,), jnp.nan, jnp.float32) for _ in range(4)]
  jax.block_until_ready(bufs)
  del bufs
