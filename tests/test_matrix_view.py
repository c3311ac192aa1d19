import jax.numpy as jnp
import numpy as np
import pytest

from ortho_optax.matrix_view import MatrixDims, TORCH_LAYOUT, matrix_shape, to_matrices, default_dims


def test_flax_2d_becomes_out_in():
  x = jnp.arange(6.0).reshape(2, 3)  # (in=2, out=3)
  mats, restore = to_matrices(x, MatrixDims())
  assert mats.shape == (1, 3, 2)
  np.testing.assert_array_equal(mats[0], x.T)
  np.testing.assert_array_equal(restore(mats), x)


def test_torch_layout_is_identity():
  x = jnp.arange(6.0).reshape(2, 3)
  mats, _ = to_matrices(x, TORCH_LAYOUT)
  np.testing.assert_array_equal(mats[0], x)


def test_stacked_layer_axis_in_the_middle_is_batch():
  x = jnp.arange(2 * 5 * 3 * 4.0).reshape(2, 5, 3, 4)  # (in=2, layers=5, heads=3, out=4)
  dims = MatrixDims(reduction_axes=(0,), output_axes=(3,))
  mats, restore = to_matrices(x, dims)
  assert mats.shape == (15, 4, 2) == matrix_shape(x.shape, dims)
  np.testing.assert_array_equal(mats[1 * 3 + 2], x[:, 1, 2, :].T)
  np.testing.assert_array_equal(restore(mats), x)


def test_fused_qkv_split():
  x = jnp.arange(4 * 6.0).reshape(4, 6)  # (in=4, out=3*2)
  mats, restore = to_matrices(x, MatrixDims(num_splits=3))
  assert mats.shape == (3, 2, 4)
  np.testing.assert_array_equal(mats[1], x[:, 2:4].T)
  np.testing.assert_array_equal(restore(mats), x)


@pytest.mark.parametrize("dims", [MatrixDims((0,), (0,)), MatrixDims((5,), (1,)), MatrixDims(num_splits=4)])
def test_bad_dims_raise(dims):
  with pytest.raises(ValueError):
    to_matrices(jnp.zeros((4, 6)), dims)


def test_defaults():
  assert default_dims("dense/kernel", (3, 4)) == MatrixDims()
  assert default_dims("conv1/kernel", (3, 3, 8, 16)).output_axes == (3,)
  assert default_dims("blocks/kernel", (12, 8, 16)) is None


def test_resolve_dims_errors_name_the_leaf():
  from ortho_optax.matrix_view import resolve_dims
  params = {"blocks": {"kernel": jnp.zeros((12, 8, 16))}, "w": jnp.zeros((3, 4)), "none": None}
  with pytest.raises(ValueError, match="blocks/kernel"):
    resolve_dims(params)
  dims = resolve_dims(params, {"blocks": {"kernel": MatrixDims((1,), (2,))}, "w": None, "none": None})
  assert dims["blocks"]["kernel"] == MatrixDims((1,), (2,))
  assert dims["w"] == MatrixDims((0,), (1,))
  assert dims["none"] is None
