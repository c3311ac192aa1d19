"""Pallas Mosaic GPU kernels for Newton–Schulz on Hopper GPUs (``ortho_optax.pallas``).

Placeholder surface until the kernels land (issue 3): ``is_available()`` reports False,
so ``backend="auto"`` always takes the XLA path.
"""


def is_available() -> bool:
  """True when a Hopper GPU and the Mosaic GPU Pallas backend are usable."""
  return False
