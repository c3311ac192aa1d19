"""Flax NNX GPT, data and training for validating ortho-optax (``ortho_optax.models``).

Modules:
  gpt: the modded-nanogpt-style GPT (presets ``tiny``, ``small``, ``medium``).
  data: byte-level embedded corpus, text files, FineWeb token shards, HF streaming;
    a deterministic per-step batch sampler and a background prefetcher.
  optimizers: optimizer names -> ``optax.GradientTransformation`` (``adamw`` and
    ``ortho_optax.OPTIMIZERS``), with tuned tiny-preset learning rates.
  config: ``TrainConfig`` (one run's settings), their checks, the run's optimizer.
  step: the training step, one compiled, donated ``jax.jit`` over the split state.
  train: the training loop and the optimizer comparison.
  checkpoints: orbax ``CheckpointManager`` checkpoints that record the run's configuration.
  reports: the header, results table, loss plot and results.json.
  cli: ``ortho-optax train`` / ``ortho-optax compare`` (also ``python -m ortho_optax``).
  mesh: the ``(data, fsdp)`` device mesh and shardings.
"""
