"""Flax NNX GPT, data and training for validating ortho-optax (``ortho_optax.models``)."""
