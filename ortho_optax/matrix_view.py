"""Per-leaf matrix views: which axes of a parameter are fan-in, fan-out and batch.

Every orthogonalizing stage works on a stack of matrices in the PyTorch orientation
``(batch, out, in)`` so that the formulas of the seed systems (rows = out, cols = in)
apply unchanged. A :class:`MatrixDims` tells how to get there from a parameter of any
rank: the reduction (fan-in) axes are flattened into ``in``, the output (fan-out) axes
into ``out``, and every other axis is a batch axis (stacked layers under ``scan``, heads,
experts). The layer axis is therefore never folded into rows or columns.

Flax stores dense kernels as ``(in, out)``: the default view of a 2-D leaf is
``MatrixDims(reduction_axes=(0,), output_axes=(1,))``. PyTorch-layout arrays use
``MatrixDims(reduction_axes=(1,), output_axes=(0,))`` (see :data:`TORCH_LAYOUT`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax.numpy as jnp


class MatrixDims(NamedTuple):
  """How to view one parameter as a stack of matrices.

  Attributes:
    reduction_axes: axes contracted with the layer input (fan-in); flattened into
      the matrix's columns.
    output_axes: axes of the layer output (fan-out); flattened into the matrix's rows.
    num_splits: split the output axis into this many equal blocks and treat each block
      as its own matrix (fused QKV projections: ``num_splits=3``).

  All other axes are batch axes: each index along them is an independent matrix.
  """

  reduction_axes: tuple[int, ...] = (0,)
  output_axes: tuple[int, ...] = (1,)
  num_splits: int = 1


#: The default view of a 2-D Flax kernel ``(in, out)``.
FLAX_LAYOUT = MatrixDims(reduction_axes=(0,), output_axes=(1,))
#: The view of a 2-D PyTorch weight ``(out, in)`` (and of the golden vectors).
TORCH_LAYOUT = MatrixDims(reduction_axes=(1,), output_axes=(0,))
#: A Flax conv kernel ``(*spatial, in, out)`` of rank 3, 4 or 5.
def conv_dims(ndim: int) -> MatrixDims:
  """The view of a Flax convolution kernel ``(*spatial, in, out)``."""
  return MatrixDims(reduction_axes=tuple(range(ndim - 1)), output_axes=(ndim - 1,))


def _normalize_axes(axes: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{what} axis {a} is out of range for a parameter of rank {ndim}.")
    out.append(a % ndim)
  return tuple(out)


def validate_dims(dims: MatrixDims, shape: Sequence[int]) -> MatrixDims:
  """Checks ``dims`` against ``shape`` and returns it with non-negative axes.

  Raises:
    ValueError: naming the bad axes, when axes overlap, are out of range, are empty,
      or when ``num_splits`` does not divide the output size.
  """
  ndim = len(shape)
  red = _normalize_axes(dims.reduction_axes, ndim, "reduction")
  out = _normalize_axes(dims.output_axes, ndim, "output")
  if not red or not out:
    raise ValueError(
        f"MatrixDims needs at least one reduction and one output axis, got {dims} "
        f"for a parameter of shape {tuple(shape)}.")
  if set(red) & set(out) or len(set(red)) != len(red) or len(set(out)) != len(out):
    raise ValueError(f"MatrixDims axes overlap or repeat: {dims} for shape {tuple(shape)}.")
  n_out = math.prod(shape[a] for a in out)
  if dims.num_splits < 1 or n_out % dims.num_splits:
    raise ValueError(
        f"num_splits={dims.num_splits} must be >= 1 and divide the output size {n_out} "
        f"(shape {tuple(shape)}, output axes {out}).")
  return MatrixDims(red, out, dims.num_splits)


def matrix_shape(shape: Sequence[int], dims: MatrixDims) -> tuple[int, int, int]:
  """``(batch, out, in)`` of the matrix stack that :func:`to_matrices` produces."""
  dims = validate_dims(dims, shape)
  n_in = math.prod(shape[a] for a in dims.reduction_axes)
  n_out = math.prod(shape[a] for a in dims.output_axes)
  n_batch = math.prod(
      shape[a] for a in range(len(shape)) if a not in dims.reduction_axes + dims.output_axes)
  return n_batch * dims.num_splits, n_out // dims.num_splits, n_in


def to_matrices(
    x: jnp.ndarray, dims: MatrixDims
) -> tuple[jnp.ndarray, Callable[[jnp.ndarray], jnp.ndarray]]:
  """Views ``x`` as a stack ``(batch, out, in)`` and returns it with its inverse.

  Args:
    x: a parameter-shaped array.
    dims: the parameter's :class:`MatrixDims`.

  Returns:
    ``(mats, restore)`` where ``mats`` has shape ``(batch, out, in)`` and
    ``restore(mats_like)`` maps an array of the same shape back to ``x``'s shape and
    axis order.

  References:
    NVIDIA-NeMo/Emerging-Optimizers and microsoft/dion for the ``(batch, out, in)``
    convention; optax.contrib.muon (``MuonDimensionNumbers``).
  """
  dims = validate_dims(dims, x.shape)
  ndim = x.ndim
  batch_axes = tuple(a for a in range(ndim) if a not in dims.reduction_axes + dims.output_axes)
  perm = batch_axes + dims.output_axes + dims.reduction_axes
  xt = jnp.transpose(x, perm)
  permuted_shape = xt.shape
  n_batch = math.prod(x.shape[a] for a in batch_axes)
  n_out = math.prod(x.shape[a] for a in dims.output_axes)
  n_in = math.prod(x.shape[a] for a in dims.reduction_axes)
  k = dims.num_splits
  # (batch, out, in) -> (batch, k, out/k, in) -> (batch*k, out/k, in): each split block of
  # the output axis becomes its own matrix.
  mats = xt.reshape(n_batch * k, n_out // k, n_in)
  inv_perm = tuple(perm.index(a) for a in range(ndim))

  def restore(m: jnp.ndarray) -> jnp.ndarray:
    return jnp.transpose(m.reshape(permuted_shape), inv_perm)

  return mats, restore


def default_dims(path: str, shape: Sequence[int]) -> MatrixDims | None:
  """The view assumed for a leaf when the user gives none.

  2-D leaves are Flax ``(in, out)`` kernels. Rank-3 to rank-5 leaves whose path ends in
  ``kernel`` and whose name mentions ``conv`` are Flax conv kernels. Anything else has
  no default and returns ``None``: the caller must raise a clear error asking for an
  explicit :class:`MatrixDims` (a stacked ``(layers, in, out)`` kernel, for instance,
  is ``MatrixDims(reduction_axes=(1,), output_axes=(2,))``).
  """
  if len(shape) == 2:
    return FLAX_LAYOUT
  if 3 <= len(shape) <= 5 and "conv" in path.lower() and path.lower().endswith("kernel"):
    return conv_dims(len(shape))
  return None


def path_str(path) -> str:
  """A readable ``a/b/c`` name for a pytree key path.

  Flax NNX wraps leaves in ``Variable`` objects whose value sits under an attribute
  ``value``; that key is dropped so a leaf has the same name inside and outside NNX.
  """
  parts = []
  for k in path:
    name = getattr(k, "key", None)
    if name is None:
      name = getattr(k, "name", None)
    if name is None:
      name = getattr(k, "idx", None)
    if name is None:
      name = str(k)
    parts.append(str(name))
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


DimensionNumbers = (
    "None | MatrixDims | pytree of (MatrixDims | None) | Callable[[params], pytree]")


_DIMS_FORMS = ("None, a MatrixDims (ortho_optax.TORCH_LAYOUT for (out, in) matrices), a "
               "callable params -> a pytree of MatrixDims/None, or such a pytree")


def is_dims_leaf(x) -> bool:
  """The leaves of a ``dimension_numbers`` pytree: a :class:`MatrixDims` or ``None``."""
  return x is None or isinstance(x, MatrixDims)


def check_dimension_numbers(dimension_numbers):
  """Checks the form of ``dimension_numbers`` when a transformation is built.

  Args:
    dimension_numbers: what :func:`resolve_dims` takes.

  Returns:
    ``dimension_numbers`` unchanged.

  Raises:
    ValueError: for anything else (a string such as ``"torch"``, a number, a pytree with
      other leaves), naming the bad leaf and the accepted forms, so that a wrong value is
      never ignored silently.
  """
  if (dimension_numbers is None or isinstance(dimension_numbers, MatrixDims)
      or callable(dimension_numbers)):
    return dimension_numbers
  import jax  # local: keeps this module importable without initialising JAX backends

  flat = jax.tree_util.tree_flatten_with_path(dimension_numbers, is_leaf=is_dims_leaf)[0]
  for path, leaf in flat:
    if not is_dims_leaf(leaf):
      where = f" at '{path_str(path)}'" if path else ""
      raise ValueError(f"dimension_numbers must be {_DIMS_FORMS}; got {leaf!r}{where}.")
  return dimension_numbers


def resolve_dims(tree, dimension_numbers=None):
  """A pytree (same structure as ``tree``) of :class:`MatrixDims`, one per array leaf.

  Args:
    tree: parameters or updates (``None`` leaves are kept as ``None``).
    dimension_numbers: ``None`` (use :func:`default_dims` by path and shape), one
      :class:`MatrixDims` for every leaf, a pytree of ``MatrixDims`` (or ``None`` for the
      default) matching ``tree``, or a callable ``tree -> such a pytree``.

  Returns:
    A pytree of validated ``MatrixDims`` with the structure of ``tree``.

  Raises:
    ValueError: for a leaf with no view, naming its path and shape and how to give one.

  References:
    NVIDIA-NeMo/Emerging-Optimizers and microsoft/dion for the ``(batch, out, in)``
    convention; optax.contrib.muon (``MuonDimensionNumbers``).
  """
  if callable(dimension_numbers) and not isinstance(dimension_numbers, MatrixDims):
    dimension_numbers = dimension_numbers(tree)

  def one(path, leaf, dims=None):
    if leaf is None:
      return None
    name = path_str(path)
    shape = tuple(leaf.shape)
    if dims is not None and not isinstance(dims, MatrixDims):
      raise ValueError(f"Parameter '{name}': dimension_numbers must be {_DIMS_FORMS}; got "
                       f"{dims!r}.")
    if dims is None:
      dims = default_dims(name, shape)
    if dims is None:
      raise ValueError(
          f"Parameter '{name}' of shape {shape} (rank {len(shape)}) has no default matrix "
          "view: only rank-2 kernels (in, out) and conv kernels are inferred. Pass "
          "dimension_numbers with a MatrixDims(reduction_axes=..., output_axes=...) for it "
          "(e.g. a stacked (layers, in, out) kernel is MatrixDims((1,), (2,)); for the conv "
          "kernels of a Flax NNX model, dimension_numbers=ortho_optax.dims_from_model(model)), "
          "or route it to the AdamW branch with label_fn.")
    try:
      return validate_dims(dims, shape)
    except ValueError as e:
      raise ValueError(f"Parameter '{name}': {e}") from None

  import jax  # local: keeps this module importable without initialising JAX backends

  if dimension_numbers is None or isinstance(dimension_numbers, MatrixDims):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: one(p, x, dimension_numbers), tree, is_leaf=lambda x: x is None)
  return jax.tree_util.tree_map_with_path(
      lambda p, x, d: one(p, x, d), tree, dimension_numbers,
      is_leaf=lambda x: x is None)
