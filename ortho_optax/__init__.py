"""ortho-optax: orthogonalized optimizers (the Muon family) as composable Optax transforms."""

from ortho_optax.matrix_view import FLAX_LAYOUT, TORCH_LAYOUT, MatrixDims

__version__ = "0.1.0"
