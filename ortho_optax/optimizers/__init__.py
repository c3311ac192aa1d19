"""The seed optimizers, each a function returning an ``optax.GradientTransformation``."""
