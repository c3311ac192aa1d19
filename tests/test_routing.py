"""Routing: which leaves are orthogonalized, the AdamW fallback and the validation helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ortho_optax as oo
from ortho_optax import routing, validation
from ortho_optax.matrix_view import TORCH_LAYOUT, MatrixDims
from ortho_optax.optimizers import _common


class TinyLM(nnx.Module):

  def __init__(self, rngs):
    self.wte = nnx.Embed(11, 8, rngs=rngs)
    self.tokens = nnx.Embed(11, 8, rngs=rngs)  # an embedding whose name says nothing
    self.fc = nnx.Linear(8, 16, rngs=rngs)
    self.proj = nnx.Linear(16, 8, use_bias=False, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
    self.lm_head = nnx.Linear(8, 11, rngs=rngs)
    self.gain = nnx.Param(jnp.ones(()))

  def __call__(self, x):
    h = self.wte(x) + self.tokens(x)
    h = self.proj(jax.nn.relu(self.fc(h)))
    for b in self.blocks:
      h = h + b(h)
    return self.lm_head(self.norm(h)) * self.gain


EXPECTED_NNX = {
    "wte/embedding": "adam", "tokens/embedding": "adam",
    "fc/kernel": "ortho", "fc/bias": "adam", "proj/kernel": "ortho",
    "norm/scale": "adam", "norm/bias": "adam",
    "blocks/0/kernel": "ortho", "blocks/0/bias": "adam",
    "blocks/1/kernel": "ortho", "blocks/1/bias": "adam",
    "lm_head/kernel": "adam", "lm_head/bias": "adam", "gain": "adam",
}


def _labels_by_path(labels):
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  from ortho_optax.matrix_view import path_str
  return {path_str(p): v for p, v in flat}


def test_default_label_fn_plain_dict():
  params = {
      "Dense_0": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)},
      "conv": {"kernel": jnp.ones((3, 3, 4, 8))},
      "embed": {"embedding": jnp.ones((10, 4))},
      "wpe": {"kernel": jnp.ones((10, 4))},  # name marks an embedding even for "kernel"
      "head": {"kernel": jnp.ones((4, 10))},
      "out_proj": {"kernel": jnp.ones((4, 4))},  # attention output: hidden
      "output_proj": {"kernel": jnp.ones((4, 4))},  # documented head name
      "classifier_head": {"kernel": jnp.ones((4, 3))},
      "w_matrix_without_kernel_name": jnp.ones((4, 4)),  # any 2-D leaf is a matrix
      "stacked": {"kernel": jnp.ones((2, 4, 4))},  # rank 3, no view: AdamW
      "scalar": jnp.float32(1.0),
      "step": jnp.zeros((), jnp.int32),
      "int_table": {"kernel": jnp.zeros((3, 3), jnp.int32)},
      "complex_w": jnp.ones((3, 3), jnp.complex64),
      # Norm parameters stacked over layers are 2-D; so is a stacked bias.
      "ln_f": {"scale": jnp.ones((2, 4))}, "LayerNorm_0": {"w": jnp.ones((2, 4))},
      "layers": {"bias": jnp.ones((2, 4)), "offset": jnp.ones((2, 4))},
      # HF Flax BERT names: a hidden "output/dense" and nested embeddings.
      "attention": {"output": {"dense": {"kernel": jnp.ones((4, 4))}}},
      "embeddings": {"word_embeddings": {"embedding": jnp.ones((10, 4))}},
  }
  got = _labels_by_path(routing.default_label_fn(params))
  assert got == {
      "Dense_0/kernel": "ortho", "Dense_0/bias": "adam", "conv/kernel": "ortho",
      "embed/embedding": "adam", "wpe/kernel": "adam", "head/kernel": "adam",
      "out_proj/kernel": "ortho", "output_proj/kernel": "adam",
      "classifier_head/kernel": "adam", "w_matrix_without_kernel_name": "ortho",
      "stacked/kernel": "adam",
      "scalar": "adam", "step": "frozen", "int_table/kernel": "frozen",
      "complex_w": "adam", "ln_f/scale": "adam", "LayerNorm_0/w": "adam",
      "layers/bias": "adam", "layers/offset": "adam",
      "attention/output/dense/kernel": "ortho",
      "embeddings/word_embeddings/embedding": "adam",
  }
  # A declared view makes the rank-3 leaf a matrix.
  dims = {"stacked": {"kernel": MatrixDims((1,), (2,))}}
  got = _labels_by_path(routing.default_label_fn(params, dims))
  assert got["stacked/kernel"] == "ortho" and got["Dense_0/kernel"] == "ortho"


def test_unnamed_matrices_are_orthogonalized():
  # The shapes of a user's first try: no kernel / weight names at all.
  for params in ({"w1": jnp.ones((64, 32)), "w2": jnp.ones((32, 16))},
                 {"square": jnp.ones((18, 18))}, [jnp.ones((3, 5)), jnp.ones(5)]):
    labels = jax.tree.leaves(routing.default_label_fn(params))
    assert labels.count("ortho") == sum(jnp.ndim(x) == 2 for x in jax.tree.leaves(params))


def test_nnx_state_variables_and_pure_arrays_get_the_same_labels():
  model = TinyLM(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  by_default = _labels_by_path(routing.default_label_fn(state))
  by_pure = _labels_by_path(routing.default_label_fn(nnx.as_pure(state)))
  assert by_default == by_pure
  # Names alone cannot tell that "tokens" is an embedding, but its leaf name can.
  assert by_default == EXPECTED_NNX
  # Variable objects as leaves (older NNX passes them to tx.init).
  leaves = {"fc": {"kernel": model.fc.kernel, "bias": model.fc.bias}}
  assert _labels_by_path(routing.default_label_fn(leaves)) == {
      "fc/kernel": "ortho", "fc/bias": "adam"}


def test_label_from_model_uses_module_types():

  class Odd(nnx.Module):
    def __init__(self, rngs):
      self.lookup = nnx.Embed(7, 4, rngs=rngs)
      self.mixer = nnx.Linear(4, 4, rngs=rngs)
      self.einsum = nnx.Einsum("ab,bc->ac", (4, 4), (4,), rngs=rngs)

  model = Odd(nnx.Rngs(0))
  label_fn = routing.label_from_model(model)
  got = _labels_by_path(label_fn(nnx.state(model, nnx.Param)))
  assert got == {
      "lookup/embedding": "adam", "mixer/kernel": "ortho", "mixer/bias": "adam",
      "einsum/kernel": "ortho", "einsum/bias": "adam",
  }
  got_full = _labels_by_path(routing.label_from_model(TinyLM(nnx.Rngs(0)))(
      nnx.as_pure(nnx.state(TinyLM(nnx.Rngs(0)), nnx.Param))))
  assert got_full == EXPECTED_NNX


def test_label_by_path_and_validation():
  label_fn = routing.label_by_path(lambda path, leaf: "ortho" if leaf.ndim == 2 else "adam")
  got = label_fn({"a": jnp.ones((2, 2)), "b": jnp.ones(3), "c": jnp.zeros((2, 2), jnp.int8)})
  assert got == {"a": "ortho", "b": "adam", "c": "frozen"}
  bad = routing.label_by_path(lambda path, leaf: "muon")
  with pytest.raises(ValueError, match="muon"):
    bad({"a": jnp.ones((2, 2))})


def test_routing_report_lists_every_leaf_and_views():
  model = TinyLM(nnx.Rngs(0))
  report = routing.routing_report(nnx.state(model, nnx.Param))
  lines = report.splitlines()
  assert len(lines) == 2 + len(EXPECTED_NNX) + 1
  fc = next(line for line in lines if line.startswith("fc/kernel "))
  assert "ortho" in fc and "(1, 16, 8)" in fc  # Flax (in, out) -> (batch, out, in)
  assert "lm_head/kernel" in report and "total:" in lines[-1]
  # explicit views, a missing view reported instead of raised, and a bad view.
  params = {"a": {"kernel": jnp.ones((6, 4))}, "b": {"kernel": jnp.ones((2, 3, 4))},
            "c": {"kernel": jnp.ones((2, 3, 4))}}
  dims = {"a": {"kernel": TORCH_LAYOUT}, "b": {"kernel": None},
          "c": {"kernel": MatrixDims((2,), (1,))}}
  rep = routing.routing_report(params, dimension_numbers=dims)
  row = {line.split()[0]: line for line in rep.splitlines()[2:-1]}
  assert "(1, 6, 4)" in row["a/kernel"]
  # No view: AdamW, and the reason says how to orthogonalize it.
  assert " adam " in row["b/kernel"] and "dimension_numbers" in row["b/kernel"]
  assert "(2, 3, 4)" in row["c/kernel"]
  # A label_fn that sends it to "ortho" anyway: the error init would raise.
  rep = routing.routing_report(params, label_fn=lambda p: jax.tree.map(lambda _: "ortho", p))
  row = {line.split()[0]: line for line in rep.splitlines()[2:-1]}
  assert "ERROR" in row["b/kernel"] and "dimension_numbers" in row["b/kernel"]
  assert "label_fn (default: adam" in row["b/kernel"]


def test_with_adamw_fallback_routes_and_accepts_schedules():
  params = {"hidden": {"kernel": jnp.ones((3, 4))}, "bias": jnp.ones(4),
            "count": jnp.zeros((), jnp.int32)}
  grads = {"hidden": {"kernel": jnp.full((3, 4), 2.0)}, "bias": jnp.full(4, 2.0),
           "count": jnp.zeros((), jnp.int32)}
  tx = _common.with_adamw_fallback(
      optax.sgd(1.0), adam_learning_rate=optax.linear_schedule(0.1, 0.0, 10))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(updates["hidden"]["kernel"], -2.0)  # sgd
  # AdamW's first step is -lr * sign(g) (eps negligible).
  np.testing.assert_allclose(updates["bias"], -0.1, rtol=1e-5)
  assert updates["count"] == 0
  # A custom adam branch and a label pytree.
  labels = {"hidden": {"kernel": "adam"}, "bias": "ortho", "count": "frozen"}
  tx = _common.with_adamw_fallback(optax.sgd(1.0), adam_tx=optax.sgd(0.5), label_fn=labels)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["hidden"]["kernel"], -1.0)
  np.testing.assert_allclose(updates["bias"], -2.0)


def test_masked_dimension_numbers_follows_paths():
  dims = {"a": TORCH_LAYOUT, "b": None}
  fn = _common.masked_dimension_numbers(dims)
  got = fn({"a": jnp.ones((2, 3)), "b": optax.MaskedNode()})
  assert got["a"] == TORCH_LAYOUT and isinstance(got["b"], optax.MaskedNode)
  assert _common.masked_dimension_numbers(None) is None
  assert _common.masked_dimension_numbers(TORCH_LAYOUT) is TORCH_LAYOUT


@pytest.mark.parametrize("check, args, match", [
    (validation.check_non_negative, ("learning_rate", -1.0), "learning_rate=-1.0"),
    (validation.check_positive, ("eps", 0.0), "eps=0.0"),
    (validation.check_range, ("momentum", 1.5, 0.0, 1.0), r"\[0.0, 1.0\].*momentum=1.5"),
    (validation.check_choice, ("method", "svd", ("polar", "newton_schulz")), "'polar'"),
    (validation.check_int, ("ns_steps", 2.5, 1), "ns_steps=2.5"),
    (validation.check_int, ("ns_steps", 0, 1), ">= 1"),
    (validation.check_int, ("ns_steps", jnp.array(5), 1), "static_args"),
    (validation.check_non_negative, ("weight_decay", float("nan")), "nan"),
    (validation.check_non_negative, ("weight_decay", float("inf")), "inf"),
    (validation.check_non_negative, ("weight_decay", "0.1"), "'0.1'"),
    (validation.check_non_negative, ("weight_decay", None), "None"),
    (validation.check_non_negative, ("weight_decay", True), "True"),
    (validation.check_bool, ("nesterov", "yes"), "nesterov='yes'"),
    (validation.check_choice, ("kahan_sum", 1, (None, True, False)), "kahan_sum=1"),
])
def test_validators_raise(check, args, match):
  with pytest.raises(ValueError, match=match):
    check(*args)


def test_validators_exclusive_bounds_and_schedules():
  with pytest.raises(ValueError):
    validation.check_range("b2", 1.0, 0.0, 1.0, high_open=True)
  with pytest.raises(ValueError, match="step 0"):
    validation.check_learning_rate(optax.constant_schedule(-1.0))
  with pytest.raises(ValueError, match="step 1"):
    validation.check_learning_rate(lambda step: 0.1 - step)  # negative from step 1 on
  with pytest.raises(ValueError, match="nan"):
    validation.check_learning_rate(lambda step: jnp.log(step - 1.0))
  with pytest.raises(ValueError, match="schedule"):
    validation.check_non_negative("weight_decay", optax.constant_schedule(0.1))


def test_validators_check_concrete_arrays_and_skip_traced_values():
  with pytest.raises(ValueError, match="learning_rate=-1.0 \\(a concrete array\\)"):
    validation.check_non_negative("learning_rate", jnp.array(-1.0))
  with pytest.raises(ValueError, match="momentum=3.0"):
    validation.check_range("momentum", np.array(3.0), 0.0, 1.0)
  validation.check_range("momentum", jnp.array(0.5), 0.0, 1.0)
  jax.jit(lambda m: validation.check_range("momentum", m, 0.0, 1.0) or m)(3.0)  # a tracer
  validation.check_positive("lr", 1)
  validation.check_learning_rate(optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100))

  def needs_a_trace(step):  # a schedule that only works on arrays
    return jnp.where(step.astype(jnp.int32) < 5, 0.1, 0.01)
  validation.check_learning_rate(needs_a_trace)
  with pytest.raises(ValueError, match="adam_b2"):
    _common.with_adamw_fallback(optax.sgd(1.0), adam_b2=1.0)


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "F32", "float", jnp.float16,
                                      np.dtype("float64")])
def test_check_dtype_spellings(spelling):
  assert jnp.issubdtype(validation.check_dtype("compute_dtype", spelling), jnp.floating)


@pytest.mark.parametrize("bad", ["f33", jnp.int8, "complex64", jnp.array(0.0)])
def test_check_dtype_rejects(bad):
  with pytest.raises(ValueError, match="compute_dtype.*bf16"):
    validation.check_dtype("compute_dtype", bad)


def test_dims_from_model_views_conv_kernels_by_type():

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.stem = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)  # no "conv" in the name
      self.fc = nnx.Linear(8, 4, rngs=rngs)

  model = Net(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  dims = routing.dims_from_model(model)
  got = routing.dims_path_dict(dims(state))
  assert got["stem/kernel"] == MatrixDims((0, 1, 2), (3,))
  assert got["fc/kernel"] is None
  # Without it the 4-D kernel has no default view (AdamW, and the report says how to
  # give one); with it the kernel is orthogonalized and the report shows its view.
  row = routing.routing_report(state).split("stem/kernel")[1].splitlines()[0]
  assert " adam " in row and "dims_from_model" in row
  row = routing.routing_report(state, dimension_numbers=dims).split("stem/kernel")[1]
  assert " ortho " in row and "(1, 8, 27)" in row.splitlines()[0]


@pytest.mark.parametrize("label_fn, where", [("adam_all", "<root>"), (3, "<root>"),
                                             ({"w": "ortho", "b": "adm"}, "b")])
def test_a_bad_label_pytree_fails_at_construction(label_fn, where):
  with pytest.raises(ValueError, match=r"label_fn must be None, a callable params -> labels, "
                                       rf"or a pytree of labels in .*at '{where}'"):
    oo.muon(label_fn=label_fn)


def test_routing_report_takes_none_leaves_and_names_a_label_tree_mismatch():
  # None parameters have no leaf (and a None label); a label tree of another structure
  # is a ValueError that says so, not a count mismatch.
  report = oo.routing_report({"w": jnp.ones((8, 16)), "b": None})
  assert "w" in report and "ortho: 1 leaves" in report
  with pytest.raises(ValueError, match="labels do not have the parameters' structure"):
    oo.routing_report({"w": jnp.ones((8, 16)), "b": jnp.ones(3)},
                      label_fn=lambda p: {"w": "adam"})


@pytest.mark.parametrize("make", [oo.auon, oo.hybrid_auon, oo.aurora, oo.riemannian_aurora])
def test_adam_tx_that_is_not_a_transformation_fails_at_construction(make):
  with pytest.raises(ValueError, match="adam_tx must be an optax.GradientTransformation.*'foo'"):
    make(adam_tx="foo")
