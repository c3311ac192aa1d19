"""Which parameters are orthogonalized and which go to the AdamW fallback.

Every optimizer of the library orthogonalizes only *weight matrices*; biases, norm
parameters, scalars, embeddings and output heads go to an element-wise optimizer (AdamW,
or OAdamW's StableAdamW core). The split is a pytree of string labels, the
``param_labels`` of :func:`optax.multi_transform`:

* ``"ortho"``: a weight matrix, sent to the orthogonalized chain;
* ``"adam"``: everything else that is trained, sent to the AdamW branch;
* ``"frozen"``: leaves that are not floating point (integer / bool counters, PRNG key
  data, ``float0`` gradients): their update is set to zero
  (:func:`optax.set_to_zero`), so they are left untouched and never reach a
  floating-point formula.

The default rules (:func:`default_label_fn`), the ecosystem's rule (optax.contrib.muon and
the seed systems orthogonalize every matrix) with the usual exceptions, read the leaf's
rank, dtype and *path*:

* a real floating-point leaf of rank 2 is ``"ortho"`` unless its path names an embedding
  (:data:`EMBEDDING_NAMES`, any part containing ``embed``), an output head
  (:data:`OUTPUT_HEAD_NAMES`, any part ending in ``_head``) or a normalisation layer
  (:data:`NORM_NAMES`, any part containing ``norm``, ``ln`` / ``ln_f`` / ``ln_1``), or its
  own name is a bias or norm parameter (:data:`NON_MATRIX_NAMES`: a bias or a norm scale
  stacked over layers is 2-D too);
* a leaf of rank >= 3 passes the same name tests and is ``"ortho"`` only when its matrix
  view is known: a ``MatrixDims`` given for it in ``dimension_numbers`` or the default
  view of a Flax conv kernel (:func:`ortho_optax.matrix_view.default_dims`); otherwise it
  is ``"adam"`` and :func:`routing_report` says why;
* rank 0 and 1 leaves and complex leaves (the orthogonalizers are real-only;
  :func:`optax.adamw` handles complex parameters) are ``"adam"``; non floating-point
  leaves are ``"frozen"``.

The label says nothing about orientation: a PyTorch / Equinox ``weight`` is ``(out, in)``,
so pass ``dimension_numbers=ortho_optax.TORCH_LAYOUT`` for such trees (the default view
of a 2-D leaf is Flax's ``(in, out)``). :func:`label_from_model` uses the module *types*
of a Flax NNX model instead of names. Optimizers warn once, at ``init``, when no leaf at
all reaches the orthogonalized branch.

Overriding: every optimizer takes ``label_fn``, anything :func:`optax.multi_transform`
accepts as ``param_labels``: a callable ``params -> pytree of labels`` or the label
pytree itself. Common recipes::

  # route by your own rule on the path
  label_fn = ortho_optax.routing.label_by_path(
      lambda path, leaf: "ortho" if path.startswith("blocks/") and leaf.ndim >= 2 else "adam")
  # use NNX module types
  label_fn = ortho_optax.routing.label_from_model(model)
  # check the result before training
  print(ortho_optax.routing.routing_report(params, label_fn))

Leaves given as NNX ``Variable`` objects (``nnx.Optimizer`` calls ``init`` with an
``nnx.State``) and as plain arrays (``update``) get the same label: paths go through
:func:`ortho_optax.matrix_view.path_str`, which drops NNX's trailing ``value`` key.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ortho_optax import matrix_view

ORTHO = "ortho"
ADAM = "adam"
FROZEN = "frozen"
#: All labels the fallback wrapper understands.
LABELS = (ORTHO, ADAM, FROZEN)

#: Path parts that mark an embedding table (compared lower-case). Any part that
#: *contains* ``embed`` (``embedding``, ``value_embeds``, ``unembed``...) also counts,
#: and so does any part ending in ``_emb`` or starting with ``emb_``.
EMBEDDING_NAMES = (
    "embedding", "embeddings", "embed", "emb", "wte", "wpe", "tok_emb", "pos_emb",
    "token_embedding", "position_embedding", "embed_tokens", "word_embeddings",
    "position_embeddings",
)

#: Path parts that mark an output layer (compared lower-case). Any part ending in
#: ``_head`` (``lm_head``, ``cls_head``...) also counts. The attention output
#: projection (``out_proj``, ``c_proj``, ``o_proj``) is a hidden matrix and is NOT listed,
#: nor is a bare ``output`` (HF Flax BERT's ``attention/output/dense`` is hidden).
OUTPUT_HEAD_NAMES = (
    "lm_head", "head", "unembed", "unembedding", "logits", "output_proj",
    "output_layer", "classifier", "readout", "out_head",
)

#: Path parts that mark a normalisation layer (compared lower-case). Any part that
#: *contains* ``norm`` (``LayerNorm_0``, ``input_layernorm``, ``final_norm``, ``qk_norm``)
#: also counts, and so does ``ln`` alone or followed by digits or ``_...`` (GPT-2's
#: ``ln_f``, ``ln_1``; ``ln2``). Their parameters are element-wise gains and offsets,
#: whatever their rank.
NORM_NAMES = ("norm", "ln", "layernorm", "rmsnorm", "layer_norm", "rms_norm", "batchnorm",
              "groupnorm", "ln_f")

#: Leaf names that are never weight matrices, whatever their rank (a bias or a norm scale
#: stacked over layers under ``scan`` is 2-D): biases and the element-wise parameters of
#: normalisation layers (Flax ``scale`` / ``bias``, Haiku ``scale`` / ``offset``). Short
#: names such as Haiku's ``b`` are not listed: a user's ``{"a": ..., "b": ...}`` matrices
#: would be misread, and a 1-D bias goes to AdamW by its rank anyway.
NON_MATRIX_NAMES = ("bias", "scale", "offset")

_LN_PART = re.compile(r"^ln(\d+|_.*)?$")


def _is_embedding_part(part: str) -> bool:
  p = part.lower()
  return (p in EMBEDDING_NAMES or "embed" in p or p.endswith("_emb")
          or p.startswith("emb_"))


def _is_head_part(part: str) -> bool:
  p = part.lower()
  return p in OUTPUT_HEAD_NAMES or p.endswith("_head")


def _is_norm_part(part: str) -> bool:
  p = part.lower()
  return p in NORM_NAMES or "norm" in p or bool(_LN_PART.match(p))


def _leaf_array(leaf):
  """The array inside an NNX ``Variable`` (or the leaf itself)."""
  if _is_variable(leaf):
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
  return leaf


def _dtype(leaf):
  dtype = getattr(leaf, "dtype", None)
  if dtype is None and isinstance(leaf, (float, complex)):  # Python scalars
    return jnp.dtype(type(leaf))
  return dtype


def _is_floating(leaf) -> bool:
  """Floating point or complex (anything an optimizer can update)."""
  try:
    return bool(jnp.issubdtype(_dtype(leaf), jnp.inexact))
  except TypeError:  # None, float0 and other exotic dtypes
    return False


def _is_complex(leaf) -> bool:
  try:
    return bool(jnp.issubdtype(_dtype(leaf), jnp.complexfloating))
  except TypeError:
    return False


def _ndim(leaf) -> int:
  return len(getattr(leaf, "shape", ()))


def _is_variable(x) -> bool:
  try:
    from flax import nnx  # local: flax is only needed for NNX inputs
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Variable)


def path_parts(path) -> tuple[str, ...]:
  """The parts of :func:`matrix_view.path_str` (NNX ``value`` key dropped)."""
  s = matrix_view.path_str(path)
  return tuple(s.split("/")) if s else ()


def label_and_reason(path: str, leaf, dims=None) -> tuple[str, str]:
  """The default label of one leaf and the reason for it (see the module docstring).

  Args:
    path: the leaf's ``a/b/c`` path (:func:`ortho_optax.matrix_view.path_str`).
    leaf: the array, ``jax.ShapeDtypeStruct`` or NNX ``Variable``.
    dims: the ``MatrixDims`` declared for it in ``dimension_numbers``, if any.

  Returns:
    ``(label, reason)``: ``label`` is ``"ortho"``, ``"adam"`` or ``"frozen"``; ``reason``
    a short phrase for :func:`routing_report`.
  """
  leaf = _leaf_array(leaf)
  if not _is_floating(leaf):
    return FROZEN, "not floating point"
  if _is_complex(leaf):
    return ADAM, "complex dtype (orthogonalizers are real-only; AdamW handles complex)"
  ndim = _ndim(leaf)
  if ndim < 2:
    return ADAM, f"rank {ndim}"
  parts = tuple(path.split("/")) if path else ()
  for test, what in ((_is_embedding_part, "embedding"), (_is_head_part, "output head"),
                     (_is_norm_part, "norm")):
    named = next((p for p in parts if test(p)), None)
    if named is not None:
      return ADAM, f"{what} ('{named}' in the path)"
  if parts and parts[-1].lower() in NON_MATRIX_NAMES:
    return ADAM, f"'{parts[-1]}' is not a weight matrix"
  if ndim == 2:
    return ORTHO, "matrix"
  if dims is not None:
    return ORTHO, "matrix view from dimension_numbers"
  if matrix_view.default_dims(path, tuple(leaf.shape)) is not None:
    return ORTHO, "conv kernel"
  return ADAM, (f"rank {ndim} with no known matrix view (to orthogonalize it, give it a "
                "MatrixDims in dimension_numbers, e.g. ortho_optax.dims_from_model(model) "
                "for NNX conv kernels)")


def default_label(path: str, leaf, dims=None) -> str:
  """The default label of one leaf given its ``a/b/c`` path (see module docstring)."""
  return label_and_reason(path, leaf, dims)[0]


def _map_leaves(fn: Callable[[str, Any], Any], tree):
  """``fn(path_str, leaf)`` over array leaves; NNX Variables count as one leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: fn(matrix_view.path_str(p), x), tree, is_leaf=_is_variable)


def default_label_fn(params, dimension_numbers=None):
  """Labels weight matrices ``"ortho"``, other float leaves ``"adam"`` (module docstring).

  Args:
    params: a pytree of parameters or updates (plain arrays, ``nnx.State`` or
      ``nnx.Variable`` leaves).
    dimension_numbers: as the optimizers take it; a leaf of rank >= 3 with a
      ``MatrixDims`` here is a matrix (``None``: only conv kernels have a view).

  Returns:
    A pytree with the structure of ``params`` whose leaves are ``"ortho"``, ``"adam"``
    or ``"frozen"`` (non floating-point leaves, left untouched).

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/ (hidden matrices to Muon, the rest to
    AdamW); optax.contrib.muon (every 2-D leaf, or leaves given dimension numbers).
  """
  dims = _dims_by_path(params, dimension_numbers)
  return _map_leaves(lambda path, leaf: default_label(path, leaf, dims.get(path)), params)


def label_by_path(rule: Callable[[str, Any], str]) -> Callable[[Any], Any]:
  """A ``label_fn`` from a rule ``(path, leaf) -> label``.

  The path is the ``a/b/c`` string of :func:`matrix_view.path_str`. Non floating-point
  leaves are labelled ``"frozen"`` before the rule is asked.

  Args:
    rule: ``rule(path, leaf) -> label`` called for every floating-point leaf, with
      ``path`` the leaf's ``a/b/c`` string; it must return ``"ortho"``, ``"adam"`` or
      ``"frozen"``.

  Returns:
    ``label_fn(params) -> pytree of labels`` with the structure of ``params``, usable as
    the ``label_fn`` argument of every optimizer. Calling it raises ``ValueError``
    (naming the path) when ``rule`` returns any other label.

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/ (hidden matrices to Muon, the rest to
    AdamW); optax.contrib.muon (every 2-D leaf, or leaves given dimension numbers).
  """

  def label_fn(params):
    def one(path, leaf):
      if not _is_floating(_leaf_array(leaf)):
        return FROZEN
      label = rule(path, leaf)
      if label not in LABELS:
        raise ValueError(f"label rule returned {label!r} for '{path}'; valid labels: {LABELS}.")
      return label
    return _map_leaves(one, params)

  return label_fn


#: NNX module types whose ``kernel`` is a hidden weight matrix (unless under a head).
_NNX_MATRIX_MODULES = ("Linear", "LinearGeneral", "Einsum", "Conv", "ConvTranspose")
#: NNX module types whose every parameter goes to AdamW.
_NNX_EMBED_MODULES = ("Embed",)


def label_from_model(model) -> Callable[[Any], Any]:
  """A ``label_fn`` from the module types of a Flax NNX model.

  Walks the model's graph (``nnx.iter_graph``). Parameters of an ``nnx.Embed`` are
  ``"adam"``; the ``kernel`` of an ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` /
  ``Conv`` / ``ConvTranspose`` is ``"ortho"`` unless the module path names an output head
  (:data:`OUTPUT_HEAD_NAMES`) or an embedding. Every other parameter (biases, norm
  scales, custom modules' parameters) follows :func:`default_label`.

  Args:
    model: an ``nnx.Module``.

  Returns:
    ``label_fn(params) -> pytree of labels`` for ``nnx.state(model, nnx.Param)``-shaped
    trees (with or without ``Variable`` wrappers; the path is the key).

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/ (hidden matrices to Muon, the rest to
    AdamW); optax.contrib.muon (every 2-D leaf, or leaves given dimension numbers).
  """
  from flax import nnx

  by_path: dict[str, str] = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    kind = type(node).__name__
    prefix = "/".join(str(p) for p in path)
    under_head = any(_is_head_part(str(p)) or _is_embedding_part(str(p)) for p in path)
    for attr, value in vars(node).items():
      if not isinstance(value, nnx.Variable):
        continue
      key = f"{prefix}/{attr}" if prefix else attr
      if isinstance(node, nnx.Embed) or kind in _NNX_EMBED_MODULES:
        by_path[key] = ADAM
      elif (kind in _NNX_MATRIX_MODULES and attr == "kernel" and not under_head
            and _ndim(value) >= 2):
        by_path[key] = ORTHO
      elif kind in _NNX_MATRIX_MODULES:
        by_path[key] = ADAM

  def label_fn(params):
    def one(path, leaf):
      if not _is_floating(_leaf_array(leaf)):
        return FROZEN
      return by_path.get(path, None) or default_label(path, leaf)
    return _map_leaves(one, params)

  return label_fn


def dims_from_model(model) -> Callable[[Any], Any]:
  """``dimension_numbers`` from the module types of a Flax NNX model.

  ``nnx.Conv`` / ``nnx.ConvTranspose`` kernels ``(*spatial, in, out)`` get
  :func:`ortho_optax.matrix_view.conv_dims` whatever their attribute name (the path
  default only recognises names containing ``conv``); every other leaf gets ``None``
  (the default view: Flax ``(in, out)`` for 2-D leaves). ``nnx.Einsum`` /
  ``LinearGeneral`` kernels of rank > 2 still need an explicit ``MatrixDims``, since
  their layout depends on the einsum string.

  Args:
    model: an ``nnx.Module``.

  Returns:
    A callable ``params -> pytree of MatrixDims | None`` (the callable form of
    ``dimension_numbers``), keyed by path like :func:`label_from_model`.

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/ (hidden matrices to Muon, the rest to
    AdamW); optax.contrib.muon (every 2-D leaf, or leaves given dimension numbers).
  """
  from flax import nnx

  by_path: dict[str, matrix_view.MatrixDims] = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module) or type(node).__name__ not in ("Conv", "ConvTranspose"):
      continue
    kernel = vars(node).get("kernel")
    if isinstance(kernel, nnx.Variable):
      prefix = "/".join(str(p) for p in path)
      by_path[f"{prefix}/kernel" if prefix else "kernel"] = matrix_view.conv_dims(
          _ndim(kernel))

  def dims_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: by_path.get(matrix_view.path_str(p)), params, is_leaf=_is_variable)

  return dims_fn


def resolve_labels(params, label_fn=None, dimension_numbers=None):
  """The label pytree: ``label_fn(params)``, the pytree ``label_fn`` itself, or defaults."""
  if label_fn is None:
    return default_label_fn(params, dimension_numbers)
  if callable(label_fn):
    return label_fn(params)
  return label_fn


def checked_labels(label_fn, dimension_numbers=None) -> Callable[[Any], Any]:
  """The ``param_labels`` callable of the optimizers' :func:`optax.multi_transform`.

  ``label_fn`` (or the default rules) with every non floating-point leaf labelled
  ``"frozen"``: a user label that sends an integer / bool leaf to ``"ortho"`` or
  ``"adam"`` would otherwise hit a matrix-view error or AdamW's integer arithmetic.
  A label pytree may be a prefix of the parameters (its label covers the subtree).

  Args:
    label_fn: ``None`` (:func:`default_label_fn`), a callable ``params -> labels`` or a
      label pytree (or a prefix of one).
    dimension_numbers: for the default labels (see :func:`default_label_fn`).

  Returns:
    ``labels(params) -> pytree of labels`` with the structure of ``params``.

  Raises:
    ValueError: at once for a label pytree with an unknown label (or of another type,
      such as a number); when called, for an unknown label from a callable, or a complex
      leaf labelled ``"ortho"`` (the orthogonalizers are real-only), naming the path.
  """
  if label_fn is not None and not callable(label_fn):
    for path, label in jax.tree_util.tree_flatten_with_path(label_fn)[0]:
      if not isinstance(label, str) or label not in LABELS:
        where = matrix_view.path_str(path) or "<root>"
        raise ValueError(
            f"label_fn must be None, a callable params -> labels, or a pytree of labels in "
            f"{LABELS}; got {label!r} at '{where}'.")

  def labels(params):
    given = resolve_labels(params, label_fn, dimension_numbers)

    def subtree(prefix, label, sub):
      def one(path, leaf):
        leaf = _leaf_array(leaf)
        where = matrix_view.path_str(tuple(prefix) + tuple(path)) or "<root>"
        if label not in LABELS:
          raise ValueError(f"label {label!r} for '{where}' is not one of {LABELS}.")
        if not _is_floating(leaf):
          return FROZEN
        if label == ORTHO and _is_complex(leaf):
          raise ValueError(
              f"'{where}' is complex ({leaf.dtype}) but labelled 'ortho': the "
              "orthogonalizers take real floating-point matrices only. Label it 'adam' "
              "(optax.adamw handles complex parameters).")
        return label
      return jax.tree_util.tree_map_with_path(one, sub, is_leaf=_is_variable)

    return jax.tree_util.tree_map_with_path(subtree, given, params,
                                            is_leaf=lambda x: x is None)

  return labels


def routing_report(params, label_fn=None, dimension_numbers=None) -> str:
  """A dry-run table: where each leaf goes, why, and how it is viewed as a matrix.

  Args:
    params: the parameter pytree (arrays, ``jax.ShapeDtypeStruct`` or NNX state).
    label_fn: as the optimizers take it (``None`` = :func:`default_label_fn`).
    dimension_numbers: as the optimizers take it (``None`` = Flax defaults).

  Returns:
    A text table with columns path, shape, dtype, label, reason (the default rule that
    decided, or ``label_fn``) and matrix view (``(batch, out, in)`` for ``"ortho"``
    leaves, or the error ``init`` would raise), then the totals per label.

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/ (hidden matrices to Muon, the rest to
    AdamW); optax.contrib.muon (every 2-D leaf, or leaves given dimension numbers).
  """
  labels = resolve_labels(params, label_fn, dimension_numbers)
  flat_params, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
  # Up to the parameters' structure: a None parameter (no leaf) has a None label.
  try:
    flat_labels = [_leaf_array(lbl) for lbl in treedef.flatten_up_to(labels)]
  except (ValueError, TypeError) as e:
    raise ValueError(f"label_fn's labels do not have the parameters' structure: {e}") from None
  dims_by_path = _dims_by_path(params, dimension_numbers)

  rows = [("path", "shape", "dtype", "label", "reason", "matrix view (batch, out, in)")]
  counts: dict[str, list[int]] = {}
  for (path, leaf), label in zip(flat_params, flat_labels):
    leaf = _leaf_array(leaf)
    name = matrix_view.path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
    default, reason = label_and_reason(name, leaf, dims_by_path.get(name))
    if label_fn is not None:
      reason = "label_fn" + ("" if label == default else f" (default: {default}, {reason})")
    if label == ORTHO:
      view = _view(name, shape, dims_by_path.get(name), leaf)
    elif label == ADAM:
      view = "- (element-wise)"
    elif label == FROZEN:
      view = "- (not floating point: update zero)"
    else:
      view = f"- (custom label {label!r})"
    rows.append((name, str(shape), dtype, str(label), reason, view))
    c = counts.setdefault(str(label), [0, 0])
    c[0] += 1
    c[1] += math.prod(shape)
  n = len(rows[0]) - 1
  widths = [max(len(r[k]) for r in rows) for k in range(n)]
  lines = ["  ".join(r[k].ljust(widths[k]) for k in range(n)) + "  " + r[n] for r in rows]
  lines.insert(1, "-" * (sum(widths) + 2 * n + len(rows[0][n])))
  total = ", ".join(f"{lbl}: {n} leaves / {size:,} values" for lbl, (n, size) in counts.items())
  if ORTHO not in counts:
    total += " (nothing is orthogonalized)"
  lines.append(f"total: {total}")
  return "\n".join(lines)


def _view(name, shape, dims, leaf) -> str:
  """The matrix view of an ``"ortho"`` leaf, or the error ``init`` would raise."""
  if _is_complex(leaf):
    return "ERROR: complex leaf labelled 'ortho'; route it to 'adam'"
  if dims is None:
    dims = matrix_view.default_dims(name, shape)
  if dims is None:
    return "ERROR: no default view; pass dimension_numbers for it or route it to adam"
  try:
    b, o, i = matrix_view.matrix_shape(shape, dims)
    dims = matrix_view.validate_dims(dims, shape)
  except ValueError as e:
    return f"ERROR: {e}"
  return (f"({b}, {o}, {i}) out_axes={dims.output_axes} in_axes={dims.reduction_axes}"
          + (f" splits={dims.num_splits}" if dims.num_splits > 1 else ""))


def _dims_by_path(params, dimension_numbers) -> dict:
  """``path -> MatrixDims or None`` from any ``dimension_numbers`` form."""
  if dimension_numbers is None:
    return {}
  if callable(dimension_numbers) and not isinstance(dimension_numbers, matrix_view.MatrixDims):
    dimension_numbers = dimension_numbers(params)
  if isinstance(dimension_numbers, matrix_view.MatrixDims):
    return {matrix_view.path_str(p): dimension_numbers
            for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]}
  return dims_path_dict(dimension_numbers)


def dims_path_dict(dims_tree) -> dict:
  """Flattens a pytree of ``MatrixDims`` (or ``None``) into ``{path: dims}``."""
  flat = jax.tree_util.tree_flatten_with_path(dims_tree, is_leaf=matrix_view.is_dims_leaf)[0]
  return {matrix_view.path_str(p): d for p, d in flat}


__all__ = [
    "ADAM", "EMBEDDING_NAMES", "FROZEN", "LABELS", "NON_MATRIX_NAMES", "NORM_NAMES", "ORTHO",
    "OUTPUT_HEAD_NAMES", "default_label", "default_label_fn", "dims_from_model",
    "checked_labels", "dims_path_dict", "label_and_reason", "label_by_path", "label_from_model",
    "resolve_labels", "routing_report",
]
