"""Behaving like an optax optimizer: empty branches, default routing, updates in the
parameters' dtype, optax.contrib.muon as a configuration of ``muon``, integer
hyperparameters under ``inject_hyperparams``, complex parameters, construction-time
validation."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ortho_optax as oo
from ortho_optax import distributed, routing
from ortho_optax.models import gpt as gpt_lib
from ortho_optax.models import mesh as mesh_lib
from ortho_optax.matrix_view import path_str

NAMES = sorted(oo.OPTIMIZERS)
#: Optimizers with a ``kahan_sum`` flag (OAdamW's ``None`` means on for bf16/fp16 leaves).
KAHAN = ["adamuon", "adaptive_muon", "muon", "namo", "normuon", "oadamw", "turbo_muon"]


def _labels(label_fn, params):
  flat = jax.tree_util.tree_flatten_with_path(label_fn(params))[0]
  return {path_str(p): v for p, v in flat}


# --- 1. an empty orthogonalized branch ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_no_matrix_at_all_runs_and_warns_once(name):
  params = {"bias": jnp.ones(3), "gain": jnp.float32(2.0)}
  tx = oo.OPTIMIZERS[name]()
  with pytest.warns(UserWarning, match="no parameter reaches the orthogonalized branch"):
    state = tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once: a second init is silent
    state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_no_warning_when_a_matrix_is_orthogonalized():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    oo.muon().init({"w": jnp.ones((3, 4)), "b": jnp.ones(4)})


@pytest.mark.parametrize("name", ["normuon", "adamuon", "namo", "muon"])
def test_empty_branch_under_a_sharded_update(name):
  mesh = mesh_lib.make_mesh(4, 2)
  tx = distributed.distribute(oo.OPTIMIZERS[name](), mesh)
  params = {"bias": jnp.arange(8.0), "embed": {"embedding": jnp.ones((16, 4))}}
  with pytest.warns(UserWarning):
    state = tx.init(params)
  shardings = mesh_lib.state_shardings(params, mesh)
  params = jax.device_put(params, shardings)
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# --- 2. default routing -----------------------------------------------------------------


def test_project_gpt_routes_embedding_and_head_to_adamw():
  model = gpt_lib.GPT(gpt_lib.GPTConfig(vocab_size=32, num_layers=2, num_heads=2,
                                        model_dim=16, seq_len=8), rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  for label_fn in (routing.default_label_fn, routing.label_from_model(model)):
    got = _labels(label_fn, state)
    assert got.pop("embed/embedding") == "adam" and got.pop("lm_head/kernel") == "adam"
    assert got and set(got.values()) == {"ortho"}, got  # every hidden kernel
    assert {k.rsplit("/", 2)[-2] for k in got} == {"q", "k", "v", "o", "fc", "proj"}


class UserGPT(nnx.Module):
  """A GPT as a user writes it: GPT-2's names, a fused qkv, learned positions."""

  def __init__(self, rngs, vocab=32, d=16, layers=2):
    self.wte = nnx.Embed(vocab, d, rngs=rngs)
    self.wpe = nnx.Embed(8, d, rngs=rngs)
    self.h = nnx.List([UserBlock(d, rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)
    self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)


class UserBlock(nnx.Module):

  def __init__(self, d, rngs):
    self.ln_1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.Module()
    self.attn.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.attn.proj = nnx.Linear(d, d, rngs=rngs)
    self.ln_2 = nnx.RMSNorm(d, rngs=rngs)
    self.mlp = nnx.Module()
    self.mlp.fc = nnx.Linear(d, 4 * d, rngs=rngs)
    self.mlp.proj = nnx.Linear(4 * d, d, rngs=rngs)


def test_user_gpt_routes_sensibly():
  model = UserGPT(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  for label_fn in (routing.default_label_fn, routing.label_from_model(model)):
    got = _labels(label_fn, state)
    ortho = {k for k, v in got.items() if v == "ortho"}
    assert ortho == {f"h/{i}/{m}/kernel" for i in range(2)
                     for m in ("attn/qkv", "attn/proj", "mlp/fc", "mlp/proj")}
    assert got["wte/embedding"] == got["wpe/embedding"] == got["lm_head/kernel"] == "adam"
    assert got["ln_f/scale"] == got["h/0/ln_1/bias"] == got["h/1/ln_2/scale"] == "adam"
  report = routing.routing_report(state)
  assert "embedding ('wte' in the path)" in report
  assert "output head ('lm_head' in the path)" in report


def test_stacked_layers_route_by_name_and_view():
  # Parameters stacked over layers (nnx.scan / vmap): rank 3 kernels, rank 2 norms/biases.
  kernel = jax.random.normal(jax.random.key(0), (4, 8, 16))
  params = {"blocks": {"mlp": {"kernel": kernel, "bias": jnp.ones((4, 16))},
                       "ln": {"scale": jnp.ones((4, 8))}},
            "embed": {"embedding": jnp.ones((32, 8))}}
  dims = {"blocks": {"mlp": {"kernel": oo.MatrixDims((1,), (2,)), "bias": None},
                     "ln": {"scale": None}}, "embed": {"embedding": None}}
  no_view = _labels(routing.default_label_fn, params)
  assert set(no_view.values()) == {"adam"}
  with_view = _labels(functools.partial(routing.default_label_fn, dimension_numbers=dims),
                      params)
  assert with_view["blocks/mlp/kernel"] == "ortho"
  assert with_view["blocks/mlp/bias"] == with_view["blocks/ln/scale"] == "adam"
  # The optimizers route with their dimension_numbers: the stacked kernel is orthogonalized.
  tx = oo.muon(dimension_numbers=dims, compute_dtype="f32")
  state = tx.init(params)
  updates, _ = tx.update(params, state, params)
  for o in updates["blocks"]["mlp"]["kernel"]:  # one orthogonalized (8, 16) matrix per layer
    s = np.linalg.svd(np.asarray(o), compute_uv=False)
    assert s.min() > 0.5 * s.max()


# --- 3. updates in the parameters' dtype ----------------------------------------------


def _mixed_params(dtype):
  k = jax.random.split(jax.random.key(0), 3)
  return {"w": jax.random.normal(k[0], (6, 4), dtype), "sq": jax.random.normal(k[1], (4, 4),
                                                                              dtype),
          "b": jax.random.normal(k[2], (4,), dtype)}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", KAHAN)
def test_kahan_updates_have_the_parameter_dtype_and_are_cond_stable(name, dtype):
  tx = oo.OPTIMIZERS[name](kahan_sum=True)
  params = _mixed_params(dtype)
  state = tx.init(params)

  @jax.jit
  def step(params, state, flip):
    # Both branches of lax.cond must agree in dtype (optax's test_state_shape_dtype_...).
    updates, new_state = jax.lax.cond(flip, lambda: tx.update(params, state, params),
                                      lambda: (params, state))
    return optax.apply_updates(params, updates), new_state, updates

  for flip in (True, False, True):
    params, state, updates = step(params, state, flip)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype == dtype


# --- 4. optax.contrib.muon as a configuration of muon ---------------------------------


def _optax_configured_muon(preconditioning, nesterov, consistent_rms=None, **overrides):
  """``ortho_optax.muon`` configured as ``optax.contrib.muon`` (the README's mapping)."""
  lr = overrides.pop("learning_rate", 0.02)
  kwargs = dict(
      learning_rate=lr, momentum=0.95, nesterov=nesterov, bias_correction=True,
      coefficients="muon", ns_steps=5, preconditioning=preconditioning, eps=1e-8,
      weight_decay=0.0, compute_dtype="float32", backend="xla",
      adam_learning_rate=lr, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
      adam_nesterov=nesterov,
      label_fn=oo.label_by_path(lambda path, leaf: "ortho" if leaf.ndim == 2 and not
                                jnp.iscomplexobj(leaf) else "adam"))
  if consistent_rms is not None:
    kwargs.update(scale_mode="spectral", extra_scale_factor=consistent_rms)
  if preconditioning == "aol":
    # optax's AOL scales the rows of the (in, out) matrix, ortho_optax's those of the
    # (out, in) matrix; for square leaves (the only ones where it matters) take optax's.
    kwargs["dimension_numbers"] = lambda p: jax.tree.map(
        lambda x: oo.TORCH_LAYOUT if x.ndim == 2 and x.shape[0] == x.shape[1] else None, p)
  kwargs.update(overrides)
  return oo.muon(**kwargs)


@pytest.mark.parametrize("preconditioning,nesterov,consistent_rms", [
    ("frobenius", True, None), ("frobenius", False, None), ("aol", True, None),
    ("schatten", True, None), ("frobenius", True, 0.2)])
@jax.default_matmul_precision("highest")  # float32 products on GPUs too (no TF32)
def test_muon_configured_as_optax_contrib_muon_equals_it(preconditioning, nesterov,
                                                          consistent_rms):
  k = jax.random.split(jax.random.key(1), 5)
  params = {"w1": jax.random.normal(k[0], (6, 4)), "w2": jax.random.normal(k[1], (4, 6)),
            "sq": jax.random.normal(k[2], (5, 5)), "b": jax.random.normal(k[3], (4,)),
            "t": jax.random.normal(k[4], (2, 3, 4))}
  ref = optax.contrib.muon(0.02, preconditioning=preconditioning, nesterov=nesterov,
                           consistent_rms=consistent_rms)
  ours = _optax_configured_muon(preconditioning, nesterov, consistent_rms)
  p_ref, p_ours = params, params
  s_ref, s_ours = ref.init(params), ours.init(params)
  ref_step, ours_step = jax.jit(ref.update), jax.jit(ours.update)
  for i in range(5):
    grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)) + 0.1 * x, p_ref)
    u_ref, s_ref = ref_step(grads, s_ref, p_ref)
    u_ours, s_ours = ours_step(grads, s_ours, p_ours)
    for key in params:
      np.testing.assert_allclose(u_ours[key], u_ref[key], rtol=2e-5, atol=2e-7,
                                 err_msg=f"step {i} leaf {key}")
    p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)


@jax.default_matmul_precision("highest")
def test_optax_contrib_muon_dion_coefficients_and_weight_decay():
  params = {"w": jax.random.normal(jax.random.key(2), (6, 10))}
  ref = optax.contrib.muon(0.05, ns_coeffs="dion", weight_decay=0.1)
  ours = _optax_configured_muon("frobenius", True, coefficients="quintic", weight_decay=0.1,
                                learning_rate=0.05)
  s_ref, s_ours = ref.init(params), ours.init(params)
  for _ in range(3):
    u_ref, s_ref = ref.update(params, s_ref, params)
    u_ours, s_ours = ours.update(params, s_ours, params)
    np.testing.assert_allclose(u_ours["w"], u_ref["w"], rtol=2e-5, atol=2e-7)


def test_seed_semantics_stay_the_default():
  # Without the options, the seeds' Muon (no bias correction) differs from optax's.
  params = {"w": jax.random.normal(jax.random.key(3), (6, 4))}
  seed = oo.muon(0.02, compute_dtype="float32", weight_decay=0.0, backend="xla")
  optax_like = _optax_configured_muon("frobenius", True)
  s1, s2 = seed.init(params), optax_like.init(params)
  for grads in (params, jax.tree.map(jnp.sin, params)):  # step 1 only differs in scale
    u1, s1 = seed.update(grads, s1, params)
    u2, s2 = optax_like.update(grads, s2, params)
  assert not np.allclose(u1["w"], u2["w"], rtol=1e-3)


# --- 5. integer hyperparameters under inject_hyperparams -------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_with_inject_static_args(name):
  factory = oo.OPTIMIZERS[name]
  tx = optax.inject_hyperparams(factory, static_args=oo.inject_static_args(factory))(
      learning_rate=0.01)
  params = _mixed_params(jnp.float32)
  state = jax.jit(tx.init)(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert "learning_rate" in state.hyperparams


@pytest.mark.parametrize("name", NAMES)
def test_plain_inject_hyperparams_keeps_the_step_counts_static(name):
  """No static_args: step counts default to None, so optax leaves them alone; the injected
  learning rate drives the orthogonalized leaves."""
  factory = oo.OPTIMIZERS[name]
  tx = optax.inject_hyperparams(factory)(learning_rate=0.01)
  params = _mixed_params(jnp.float32)
  state = tx.init(params)
  update = jax.jit(tx.update)
  u1, _ = update(params, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.02)
  u2, _ = update(params, state, params)
  ortho = [k for k in params if params[k].ndim == 2 and min(params[k].shape) > 1][0]
  np.testing.assert_allclose(u2[ortho], 2 * u1[ortho], rtol=1e-5)


@pytest.mark.parametrize("name,arg,value", [("aurora", "pp_iterations", 3),
                                            ("riemannian_aurora", "outer_steps", 2),
                                            ("muon", "ns_steps", 6),
                                            ("oadamw", "update_proj_gap", 2)])
def test_int_hyperparameter_made_an_array_says_how_to_keep_it_static(name, arg, value):
  factory = oo.OPTIMIZERS[name]
  tx = optax.inject_hyperparams(factory)(learning_rate=0.01, **{arg: value})
  params = _mixed_params(jnp.float32)
  with pytest.raises(ValueError, match=f"{arg}.*static_args=ortho_optax.inject_static_args"):
    state = tx.init(params)
    jax.jit(tx.update)(params, state, params)
  fixed = optax.inject_hyperparams(factory, static_args=oo.inject_static_args(factory))(
      learning_rate=0.01, **{arg: value})
  fixed.init(params)


def test_restart_period_under_inject_hyperparams():
  """Unused by standard Newton-Schulz, an injected ``restart_every`` is harmless there; Gram
  Newton-Schulz's loop needs it static and says how."""
  params = _mixed_params(jnp.float32)
  tx = optax.inject_hyperparams(oo.muon)(learning_rate=0.01)
  jax.jit(tx.update)(params, tx.init(params), params)
  gram = optax.inject_hyperparams(oo.muon)(learning_rate=0.01,
                                          orthogonalizer="gram_newton_schulz")
  with pytest.raises(ValueError, match="restart_every.*static_args=ortho_optax.inject_static_args"):
    gram.init(params)


def test_dtype_made_a_schedule_says_how_to_keep_it_static():
  with pytest.raises(ValueError, match="compute_dtype.*inject_static_args"):
    optax.inject_hyperparams(oo.muon)(compute_dtype=jnp.float32).init(
        _mixed_params(jnp.float32))


# --- 6. complex parameters ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_complex_leaves_go_to_adamw(name):
  params = {"w": jnp.ones((4, 3), jnp.float32), "z": jnp.zeros((3, 3), jnp.complex64)}
  grads = {"w": jnp.ones((4, 3)), "z": jnp.full((3, 3), 3 - 4j, jnp.complex64)}
  assert _labels(routing.default_label_fn, params) == {"w": "ortho", "z": "adam"}
  assert "complex dtype" in routing.routing_report(params)
  adam_lr = 1e-3 if name == "oadamw" else 3e-4  # the defaults of the element-wise branch
  tx = oo.OPTIMIZERS[name]()
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # AdamW's first step on a complex leaf: -lr g / |g| (no decay on a zero weight).
  assert updates["z"].dtype == jnp.complex64
  np.testing.assert_allclose(updates["z"], -adam_lr * (0.6 - 0.8j), rtol=1e-4)


def test_complex_leaf_labelled_ortho_is_a_clear_error():
  tx = oo.muon(label_fn=lambda p: jax.tree.map(lambda _: "ortho", p))
  with pytest.raises(ValueError, match="'z' is complex.*Label it 'adam'"):
    tx.init({"z": jnp.ones((3, 3), jnp.complex64)})


# --- 7. bad hyperparameters at construction -----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", ["0.02", True, None, float("nan"), float("inf"), [0.1],
                                   optax.constant_schedule(-0.1),
                                   optax.linear_schedule(0.1, -1.0, 1),
                                   lambda step: jnp.nan * step])
def test_bad_learning_rate_is_caught_at_construction(name, value):
  with pytest.raises(ValueError, match="learning_rate") as info:
    oo.OPTIMIZERS[name](learning_rate=value)
  if not callable(value):
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_traced_schedules_and_array_learning_rates_are_accepted(name):
  def warmup(step):  # only works on arrays
    return jnp.minimum(1.0, step.astype(jnp.float32) / 10) * 0.01
  for lr in (warmup, jnp.float32(0.01), np.float32(0.01)):
    oo.OPTIMIZERS[name](learning_rate=lr)


@pytest.mark.parametrize("name", ["muon", "turbo_muon", "adaptive_muon", "aurora",
                                  "riemannian_aurora", "hybrid_auon", "oadamw"])
def test_compute_dtype_names(name):
  params = {"w": jnp.ones((4, 3))}
  for spelling in ("f32", "fp32", "float32", "BF16", jnp.float32):
    tx = oo.OPTIMIZERS[name](compute_dtype=spelling)
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="compute_dtype='f33'.*'bf16'"):
    oo.OPTIMIZERS[name](compute_dtype="f33")


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum="0.9"), "momentum='0.9'"), (dict(nesterov="yes"), "nesterov='yes'"),
    (dict(weight_decay=None), "weight_decay=None"), (dict(kahan_sum=1), "kahan_sum=1"),
    (dict(mu_dtype="int8"), "mu_dtype='int8'"), (dict(adam_nesterov=1), "adam_nesterov=1"),
    (dict(extra_scale_factor=-1.0), "extra_scale_factor=-1.0"),
    (dict(adam_learning_rate=optax.constant_schedule(-1.0)), "adam_learning_rate"),
])
def test_bad_muon_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    oo.muon(**kwargs)


def test_presets_keep_their_defaults_and_signature():
  import inspect
  sig = inspect.signature(oo.turbo_muon).parameters
  assert sig["weight_decay"].default == 0.0 and sig["eps"].default == 1e-6
  assert "coefficients" not in sig and sig["scale_mode"].default == "shape_scaling"
  assert "moment2_method" in inspect.signature(oo.normuon).parameters
  assert inspect.signature(oo.normuon).parameters["moment2_method"].default == "normuon"
