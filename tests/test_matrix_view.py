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


@pytest.mark.parametrize("bad, where", [("torch", ""), (42, ""), ({"w": "torch"}, " at 'w'"),
                                        ({"b": None, "w": (1, 0)}, " at 'w/0'")])
def test_dimension_numbers_of_another_form_fail_at_construction(bad, where):
  import ortho_optax as oo
  for build in (lambda: oo.muon(dimension_numbers=bad), lambda: oo.turbo_muon(dimension_numbers=bad),
                lambda: oo.orthogonalize("newton_schulz", dimension_numbers=bad),
                lambda: oo.scale_by_shape("spectral", dimension_numbers=bad)):
    with pytest.raises(ValueError, match=r"dimension_numbers must be None, a MatrixDims "
                                         r"\(ortho_optax.TORCH_LAYOUT.*got .*" + where):
      build()


def test_a_callable_giving_another_form_names_the_parameter():
  import ortho_optax as oo
  tx = oo.muon(dimension_numbers=lambda tree: {"w": "torch"})
  with pytest.raises(ValueError, match=r"Parameter 'w': dimension_numbers must be .*got 'torch'"):
    tx.init({"w": jnp.ones((4, 3))})
