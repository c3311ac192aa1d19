"""Flax NNX GPT, data and training for validating ortho-optax (``ortho_optax.models``).

Modules:
  gpt: the modded-nanogpt-style GPT (presets ``tiny``, ``small``, ``medium``).
  data: byte-level embedded corpus, text files, FineWeb token shards, HF streaming;
    a deterministic per-step batch sampler.
  optimizers: registry of optimizer names -> ``optax.GradientTransformation``.
  train: the jitted training step, validation, orbax checkpoints, reports.
  cli: ``ortho-optax train`` / ``ortho-optax compare`` (also ``python -m ortho_optax``).
"""
