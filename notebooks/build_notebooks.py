"""Writes the tutorial notebooks of ortho-optax (``notebooks/*.ipynb``) from this script.

The notebooks are generated, never edited by hand, so that a review reads this file and
``git diff`` stays readable. They are stored WITHOUT outputs (the tests check it).

Usage::

  python notebooks/build_notebooks.py            # (re)write every notebook
  python notebooks/build_notebooks.py --check    # exit 1 if a stored notebook is stale

Every notebook starts with a settings cell that reads ``ORTHO_OPTAX_NB_FAST``: ``1`` (what
``tests/test_notebooks.py`` sets) shrinks sizes and step counts so the notebook runs in
seconds on a CPU; unset, the notebooks use their full (still CPU-sized) settings.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

SETTINGS = '''\
# Settings. ORTHO_OPTAX_NB_FAST=1 (what tests/test_notebooks.py sets) shrinks every size
# and step count so the whole notebook runs in seconds on a CPU.
import os
FAST = os.environ.get("ORTHO_OPTAX_NB_FAST", "0") == "1"
print("fast settings" if FAST else "full settings")
'''

FIND_ROOT = '''\
import pathlib

def find_repo_root():
  """The ortho-optax checkout this notebook lives in (None when run elsewhere)."""
  for d in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]:
    if (d / "benchmarks").is_dir() and (d / "ortho_optax").is_dir():
      return d
  return None

ROOT = find_repo_root()
RESULTS_DIR = ROOT / "benchmarks" / "results" if ROOT else None
print("repository root:", ROOT)
'''


def md(text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
  return v4.new_code_cell(textwrap.dedent(text).strip("\n"))


# ---------------------------------------------------------------------------------------
# 01 quickstart
# ---------------------------------------------------------------------------------------


def quickstart():
  return [
      md("""
      # ortho-optax quickstart

      ortho-optax writes every orthogonalized optimizer of the Muon family as a chain of small
      Optax stages:

      ```
      [l2 decay] -> ema_momentum -> orthogonalize -> [second moment] -> scale_by_shape -> learning rate + decay
      ```

      applied to the hidden weight matrices, with embeddings, the output head, biases and norm
      scales routed to AdamW. This notebook

      1. builds Muon from the stages with `optax.chain` and checks it against `ortho_optax`'s `muon`;
      2. swaps one stage at a time: AOL preconditioning (Turbo-Muon), Polar Express coefficients,
         a NorMuon second moment on Aurora's leverage-uniform polar factor;
      3. trains a small MLP regression with each of them;
      4. plugs an optimizer into a Flax NNX training loop (`nnx.Optimizer(model, tx, wrt=nnx.Param)`
         and `nnx.jit`) on the tiny GPT of `ortho_optax.models`, after a dry run with
         `routing_report`.

      Everything runs on a CPU.
      """),
      code(SETTINGS),
      code("""
      %matplotlib inline
      import jax
      import jax.numpy as jnp
      import matplotlib.pyplot as plt
      import numpy as np
      import optax
      from flax import nnx

      import ortho_optax as oo

      print("jax", jax.__version__, "optax", optax.__version__, "backend", jax.default_backend())
      """),
      md("""
      ## 1. Muon from stages

      `hidden_chain` is the orthogonalized branch; `with_adamw_fallback` wraps it in an
      `optax.multi_transform` that sends every leaf labelled `"ortho"` by
      `ortho_optax.default_label_fn` to it and the rest to AdamW. Each stage is an
      ordinary `optax.GradientTransformation`, testable alone.
      """),
      code('''
      def hidden_chain(orth, *, second_moment=None, learning_rate=0.02, weight_decay=0.01,
                       momentum=0.95):
        """momentum -> orth -> [second moment] -> shape scale -> lr + decoupled decay."""
        stages = [oo.ema_momentum(momentum, nesterov=True), orth]
        if second_moment is not None:
          stages.append(second_moment)
        stages += [oo.scale_by_shape("shape_scaling"),
                   oo.scale_by_learning_rate_and_decay(learning_rate, weight_decay, "decoupled")]
        return optax.chain(*stages)


      def routed(hidden_tx, adam_learning_rate=3e-3):
        """Hidden matrices -> hidden_tx, everything else -> AdamW."""
        return oo.with_adamw_fallback(hidden_tx, adam_learning_rate=adam_learning_rate)


      muon_from_stages = routed(hidden_chain(
          oo.orthogonalize("newton_schulz", steps=5, coefficients="muon",
                        preconditioning="frobenius")))
      '''),
      md("""
      A small MLP in plain pytrees (Flax layout: `kernel` is `(in, out)`). The dry run shows
      where each leaf goes and how it is viewed as a `(batch, out, in)` matrix stack:
      """),
      code('''
      D_IN, WIDTH = 16, (32 if FAST else 64)


      def init_mlp(key, sizes):
        params = {}
        names = [f"layer{i}" for i in range(len(sizes) - 2)] + ["head"]
        for name, (n_in, n_out), k in zip(names, zip(sizes[:-1], sizes[1:]),
                                          jax.random.split(key, len(names))):
          params[name] = {"kernel": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in),
                          "bias": jnp.zeros((n_out,))}
        return params


      def mlp(params, x):
        for name in sorted(k for k in params if k != "head"):
          x = jax.nn.gelu(x @ params[name]["kernel"] + params[name]["bias"])
        return x @ params["head"]["kernel"] + params["head"]["bias"]


      params0 = init_mlp(jax.random.key(0), [D_IN, WIDTH, WIDTH, 1])
      print(oo.routing_report(params0))
      '''),
      md("""
      The hand-built chain and the library's `muon` (same hyperparameters) give identical updates:
      """),
      code('''
      library_muon = oo.muon(learning_rate=0.02, weight_decay=0.01, adam_learning_rate=3e-3)
      grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params0)
      update1, update2 = jax.jit(muon_from_stages.update), jax.jit(library_muon.update)
      s1, s2 = muon_from_stages.init(params0), library_muon.init(params0)
      for _ in range(3):
        u1, s1 = update1(grads, s1, params0)
        u2, s2 = update2(grads, s2, params0)
      diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                 zip(jax.tree.leaves(u1), jax.tree.leaves(u2)))
      print("max |stages - muon()| over 3 updates:", diff)
      assert diff == 0.0
      '''),
      md("""
      ## 2. Swap one stage

      * **Turbo-Muon**: AOL preconditioning (a row scaling from the first Gram matrix, fused into
        NS step 1) lets it drop one step: 4 steps of the `turbo_aol` table.
      * **Polar Express**: minimax-optimal quintic coefficients, one triple per step. The
        published 8-step table is the `polar_express` preset; `polar_express_coefficients`
        recomputes such a schedule for any step count and lower bound.
      * **NorMuon on Aurora**: Aurora's leverage-uniform polar factor (`method="aurora"`)
        followed by NorMuon's per-neuron second moment.
      """),
      code('''
      pe5 = oo.polar_express_coefficients(5, lower_bound=1e-3)
      print("Polar Express, 5 steps, l=1e-3:")
      for a, b, c in pe5:
        print(f"  ({a:8.4f}, {b:9.4f}, {c:8.4f})")

      def make_optimizers(lr=0.02, adam_lr=3e-3):
        """AdamW and four orthogonalized variants that differ in one stage each."""
        def variant(orth, **kw):
          return routed(hidden_chain(orth, learning_rate=lr, **kw), adam_learning_rate=adam_lr)
        return {
            "AdamW": optax.adamw(adam_lr, b1=0.9, b2=0.95),
            "Muon (stages)": variant(oo.orthogonalize(steps=5, coefficients="muon")),
            "Turbo-Muon: AOL + 4 steps": variant(oo.orthogonalize(
                steps=4, coefficients="turbo_aol", preconditioning="aol", eps=1e-6)),
            "Polar Express, 5 steps": variant(oo.orthogonalize(steps=5, coefficients=pe5)),
            "NorMuon on Aurora polar": variant(
                oo.orthogonalize("aurora"),
                second_moment=oo.scale_by_second_moment("normuon", beta2=0.95)),
        }
      '''),
      md("""
      ## 3. Train a small model

      A student MLP regresses a random teacher MLP on fixed inputs (full batch). Each
      optimizer trains the same initial parameters with a cosine-decayed learning rate (an
      orthogonalized step has a fixed size, so without decay it never settles); one
      `jax.lax.scan` per optimizer. A toy problem shows the mechanics, not which optimizer is
      best: `03_optimizer_comparison.ipynb` compares them on a language model.
      """),
      code('''
      STEPS = 40 if FAST else 400
      N = 256 if FAST else 1024
      x_train = jax.random.normal(jax.random.key(2), (N, D_IN))
      teacher = init_mlp(jax.random.key(3), [D_IN, 32, 1])
      y_train = mlp(teacher, x_train)


      def mse(params):
        return jnp.mean(jnp.square(mlp(params, x_train) - y_train))


      def train(tx, params, steps=STEPS):
        def step(carry, _):
          params, state = carry
          loss, grads = jax.value_and_grad(mse)(params)
          updates, state = tx.update(grads, state, params)
          return (optax.apply_updates(params, updates), state), loss
        _, losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps))(
            params)
        return np.asarray(losses)


      cosine = lambda peak: optax.cosine_decay_schedule(peak, STEPS)
      optimizers = make_optimizers(lr=cosine(0.02), adam_lr=cosine(3e-3))
      curves = {name: train(tx, params0) for name, tx in optimizers.items()}
      for name, losses in curves.items():
        assert np.all(np.isfinite(losses)), name
        print(f"{name:28s} final loss {losses[-1]:.4g}")
      '''),
      code('''
      fig, ax = plt.subplots(figsize=(7, 4))
      for name, losses in curves.items():
        ax.semilogy(losses, label=name)
      ax.set(xlabel="step", ylabel="train MSE", title="teacher-student MLP regression")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
      plt.show()
      '''),
      md("""
      ## 4. A Flax NNX training loop

      Any ortho-optax optimizer is an `optax.GradientTransformation`, so it goes straight into
      `nnx.Optimizer(model, tx, wrt=nnx.Param)`. For NNX models, `ortho_optax.label_from_model`
      labels parameters by module type (the `kernel` of an `nnx.Linear` is a hidden matrix
      unless it sits under a head; every `nnx.Embed` parameter goes to AdamW). Run the dry run
      first:
      """),
      code('''
      from ortho_optax.models import data as data_lib
      from ortho_optax.models import gpt

      cfg = (gpt.get_config("tiny", num_layers=1, model_dim=64, num_heads=2, seq_len=32) if FAST
             else gpt.get_config("tiny"))
      model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
      label_fn = oo.label_from_model(model)
      print(oo.routing_report(nnx.state(model, nnx.Param), label_fn=label_fn))
      '''),
      code('''
      tx = oo.muon(learning_rate=0.02, adam_learning_rate=3e-3, label_fn=label_fn)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


      @nnx.jit
      def train_step(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(gpt.loss_fn)(model, inputs, targets)
        optimizer.update(model, grads)
        return loss


      dataset = data_lib.load_dataset("embedded:prose")
      sampler = data_lib.BatchSampler(dataset.train, 8 if FAST else 32, cfg.seq_len, seed=0)
      gpt_losses = []
      for step in range(10 if FAST else 200):
        inputs, targets = sampler(step)
        gpt_losses.append(float(train_step(model, optimizer, jnp.asarray(inputs),
                                           jnp.asarray(targets))))
      print(f"loss {gpt_losses[0]:.3f} -> {gpt_losses[-1]:.3f} (ln 256 = {np.log(256):.3f})")
      assert gpt_losses[-1] < gpt_losses[0]

      fig, ax = plt.subplots(figsize=(6, 3.5))
      ax.plot(gpt_losses)
      ax.set(xlabel="step", ylabel="train loss (nats/byte)", title="tiny GPT, Muon, NNX loop")
      ax.grid(alpha=0.3)
      plt.show()
      '''),
      md("""
      ## Where next

      * `02_orthogonality.ipynb`: how close each Newton–Schulz variant gets to the polar factor.
      * `03_optimizer_comparison.ipynb`: loss curves of the `compare` command.
      * `04_kernels.ipynb`: Pallas Mosaic-GPU kernels vs the XLA path and the Triton peers.
      * The optimizers themselves: `ortho_optax.optimizers.{muon, turbo_muon, adaptive_muon,
        auon, aurora, oadamw}`; every one takes `label_fn`, `dimension_numbers` and `backend`.
      """),
  ]


# ---------------------------------------------------------------------------------------
# 02 orthogonality
# ---------------------------------------------------------------------------------------


def orthogonality():
  return [
      md("""
      # How orthogonal is "orthogonalized"?

      Muon-family optimizers replace a matrix update `G = U Σ Vᵀ` by (an approximation of) its
      polar factor `U Vᵀ`, all singular values set to 1. Newton–Schulz (NS) iterations get
      there with a few matrix products, each step mapping every singular value through an odd
      polynomial `σ ↦ aσ + bσ³ + cσ⁵`; they do not get all the way. This notebook measures how
      far each variant gets, against the exact (SVD) polar factor:

      | variant | what | function |
      |---|---|---|
      | Muon | Frobenius normalisation + 5 steps of `(3.4445, −4.7750, 2.0315)` | `newton_schulz(coefficients="muon")` |
      | Turbo-Muon | AOL row scaling + 4 steps of the `turbo_aol` table | `newton_schulz(preconditioning="aol")` |
      | Polar Express | 8 minimax-optimal quintics | `newton_schulz(coefficients="polar_express")` |
      | Aurora polar | 12 steps of `(2, −1.5, 0.5)` | `aurora_polar` |
      | Aurora leverage-uniform | row-rebalanced polar of a non-square matrix | `leverage_uniform_polar` |
      | AuON | no NS: `G / r` with a cosh-based scalar `r ≈ 1` | `cosh_normalize` |
      | exact | `U Vᵀ` from an SVD | `polar` |

      Two numbers per output `X`: the orthogonality error `‖XXᵀ − I‖_F / √m` on the short
      side (`XᵀX` for a tall matrix), and the distance to the exact polar factor
      `‖X − UVᵀ‖_F / ‖UVᵀ‖_F`. Iterations run in float32 here so that the differences come from
      the polynomials, not from rounding (the optimizers default to bfloat16).
      """),
      code(SETTINGS),
      code("""
      %matplotlib inline
      import jax
      import jax.numpy as jnp
      import matplotlib.pyplot as plt
      import numpy as np

      from ortho_optax import (aurora_polar, cosh_normalize, leverage_uniform_polar,
                               newton_schulz, polar)

      F32 = dict(compute_dtype=jnp.float32)
      VARIANTS = {
          "Muon: Frobenius + 5 muon": lambda x: newton_schulz(
              x, steps=5, coefficients="muon", **F32),
          "Turbo: AOL + 4 turbo_aol": lambda x: newton_schulz(
              x, steps=4, coefficients="turbo_aol", preconditioning="aol", eps=1e-6, **F32),
          "Polar Express (8)": lambda x: newton_schulz(
              x, steps=8, coefficients="polar_express", **F32),
          "Aurora quintic (12)": lambda x: aurora_polar(x, steps=12, **F32),
          "Aurora leverage-uniform": lambda x: leverage_uniform_polar(x, **F32),
          "AuON cosh (no NS)": cosh_normalize,
          "exact polar (SVD)": polar,
      }
      """),
      code('''
      def short_side_gram_error(x):
        """||X Xt - I||_F / sqrt(m) on the short side m of X."""
        x = np.asarray(x, np.float64)
        if x.shape[0] > x.shape[1]:
          x = x.T
        m = x.shape[0]
        return np.linalg.norm(x @ x.T - np.eye(m)) / np.sqrt(m)


      def evaluate(g):
        """Outputs, singular values and both errors of every variant on matrix g."""
        exact = np.asarray(polar(g), np.float64)
        rows = {}
        for name, fn in VARIANTS.items():
          out = np.asarray(jax.jit(fn)(g), np.float64)
          rows[name] = dict(
              out=out, sv=np.linalg.svd(out, compute_uv=False),
              gram_err=short_side_gram_error(out),
              polar_dist=np.linalg.norm(out - exact) / np.linalg.norm(exact))
        return rows


      def print_table(rows, title):
        print(title)
        print(f"  {'variant':26s} {'||XXt-I||/sqrt(m)':>18s} {'dist to polar':>14s} "
              f"{'sigma min':>10s} {'sigma max':>10s}")
        for name, r in rows.items():
          print(f"  {name:26s} {r['gram_err']:18.3e} {r['polar_dist']:14.3e} "
                f"{r['sv'].min():10.4f} {r['sv'].max():10.4f}")


      def plot_histograms(rows, g, title):
        names = list(rows)
        fig, axes = plt.subplots(2, (len(names) + 2) // 2, figsize=(15, 6))
        axes = axes.ravel()
        sv_in = np.linalg.svd(np.asarray(g, np.float64), compute_uv=False)
        axes[0].hist(sv_in / sv_in.max(), bins=40, color="gray")
        axes[0].set_title("input (sigma / sigma_max)", fontsize=9)
        for ax, name in zip(axes[1:], names):
          sv = rows[name]["sv"]
          ax.hist(sv, bins=40)
          ax.axvline(1.0, color="k", lw=0.8, ls="--")
          ax.set_title(f"{name}\\n||XXt-I||/sqrt(m) = {rows[name]['gram_err']:.2e}", fontsize=9)
        for ax in axes[len(names) + 1:]:
          ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        plt.show()
      '''),
      md("""
      ## Random matrices

      A Gaussian matrix has a spread-out spectrum (Marchenko–Pastur), with singular values
      down near 0 for a square matrix, the hard case for NS, which moves small singular values
      up by roughly a factor `a` per step.
      """),
      code('''
      SIZES = [(64, 64), (32, 128)] if FAST else [(256, 256), (128, 512)]
      random_rows = {}
      for shape in SIZES:
        g = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        random_rows[shape] = rows = evaluate(g)
        print_table(rows, f"Gaussian {shape[0]}x{shape[1]}")
        plot_histograms(rows, g, f"singular values after each variant, Gaussian {shape}")
      '''),
      md("""
      Reading the histograms: Muon's coefficients deliberately overshoot (slope 3.4 at 0), so its
      output singular values land anywhere in roughly `[0.7, 1.2]`, never converging to 1 but
      lifting small ones fast. AOL preconditioning starts Turbo-Muon closer to orthogonal, so
      its 4 steps end nearer to 1 than Muon's 5 on these matrices. Polar Express (8 minimax
      steps, the first ones aggressive, the last ones polishing) and Aurora's 12 steps of
      `(2, −1.5, 0.5)` (`p'(1) = 0`: quadratic convergence near 1, but tiny singular values only
      doubled per step) reach float32 precision on well-conditioned inputs. For a wide matrix the
      leverage-uniform variant is orthogonal too but is a *different* polar factor (that of the
      row-rebalanced matrix), hence its distance to `UVᵀ`. AuON's cosh scaling is a scalar
      brake, not an orthogonalization: its "singular values" are the input's, unnormalised.

      ## Real gradients of the tiny GPT

      Gradients are far from Gaussian: a few large directions and a long tail of tiny singular
      values. We train the tiny GPT of `ortho_optax.models` for a few steps (its output head is
      zero-initialised, so the very first gradient of the hidden matrices is zero), then take
      one gradient and look at its hidden matrices.

      Early gradients are close to rank-deficient: many singular values are ~0. The exact polar
      factor keeps those directions at 0 (a partial isometry, so its `‖XXᵀ − I‖` is not 0
      either), and so does every NS variant; the distance to the exact polar factor is the
      number to compare here.
      """),
      code('''
      from flax import nnx

      import ortho_optax as oo
      from ortho_optax import routing
      from ortho_optax.matrix_view import path_str
      from ortho_optax.models import data as data_lib
      from ortho_optax.models import gpt

      cfg = (gpt.get_config("tiny", num_layers=1, model_dim=64, num_heads=2, seq_len=32) if FAST
             else gpt.get_config("tiny"))
      model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, oo.muon(learning_rate=0.02, adam_learning_rate=3e-3),
                                wrt=nnx.Param)
      sampler = data_lib.BatchSampler(data_lib.load_dataset("embedded:prose").train,
                                      16, cfg.seq_len, seed=0)


      @nnx.jit
      def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(gpt.loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss


      for step in range(5 if FAST else 50):
        train_step(model, optimizer, *map(jnp.asarray, sampler(step)))
      grads = nnx.grad(gpt.loss_fn)(model, *map(jnp.asarray, sampler(10_000)))

      # Flax kernels are (in, out); transpose to the library's (out, in) orientation.
      labels = routing.default_label_fn(grads)
      hidden = {}
      for (path, g), (_, lbl) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                     jax.tree_util.tree_flatten_with_path(labels)[0]):
        if lbl == routing.ORTHO:
          hidden[path_str(path)] = jnp.asarray(g).T
      print({k: v.shape for k, v in hidden.items()})
      '''),
      code('''
      picked = [k for k in hidden if k.endswith("attn/q/kernel")][:1] + \\
               [k for k in hidden if k.endswith("mlp/fc/kernel")][:1]
      assert len(picked) == 2, list(hidden)
      gpt_rows = {}
      for name in picked:
        g = hidden[name]
        gpt_rows[name] = rows = evaluate(g)
        print_table(rows, f"GPT gradient {name} (out, in) = {g.shape}")
        plot_histograms(rows, g, f"singular values, tiny-GPT gradient {name} {g.shape}")
      '''),
      md("""
      ## Row-norm balance: Aurora vs Muon on a wide matrix

      For a wide `m × n` matrix (`m < n`) the polar factor has orthonormal rows, but its
      column norms² (the leverage scores of the `n` input directions; they sum to `m`) can be
      very uneven. Aurora rescales the rows of the tall orientation (`Gᵀ`, i.e. the columns of
      `G`) before the polar step so that every column of the update gets the same norm²
      `m/n`. Here `G` has columns of very different scales (lognormal), as input features of
      a real layer do.
      """),
      code('''
      m, n = (32, 128) if FAST else (128, 512)
      k1, k2 = jax.random.split(jax.random.key(4))
      col_scale = jnp.exp(1.5 * jax.random.normal(k1, (n,)))
      g_wide = jax.random.normal(k2, (m, n)) * col_scale[None, :]

      balance = {
          "Muon NS (Frobenius + 5 muon)": VARIANTS["Muon: Frobenius + 5 muon"](g_wide),
          "exact polar": polar(g_wide),
          "Aurora leverage-uniform": leverage_uniform_polar(g_wide, **F32),
      }
      fig, ax = plt.subplots(figsize=(7, 4))
      for name, out in balance.items():
        col_norm2 = np.sort(np.sum(np.square(np.asarray(out, np.float64)), axis=0))[::-1]
        cv = col_norm2.std() / col_norm2.mean()
        print(f"{name:30s} column norm^2: min {col_norm2.min():.3e} max {col_norm2.max():.3e} "
              f"coefficient of variation {cv:.3f}")
        ax.plot(col_norm2, label=f"{name} (CV {cv:.2f})")
      ax.axhline(m / n, color="k", ls="--", lw=0.8, label="uniform target m/n")
      ax.set_yscale("log")
      ax.set(xlabel="column (sorted)", ylabel="column norm² of the update",
             title=f"leverage balance on a wide {m}x{n} matrix")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
      plt.show()
      '''),
  ]


# ---------------------------------------------------------------------------------------
# 03 optimizer comparison
# ---------------------------------------------------------------------------------------


def comparison():
  return [
      md("""
      # Optimizer comparison on the tiny GPT

      The `compare` command (`ortho-optax compare`, or `ortho_optax.models.train.compare` from
      Python) trains the same GPT on the same data and seed once per optimizer, with the
      embeddings and the output head on AdamW in every hybrid optimizer, and writes
      `results.json`, `results.md` and `loss.png`.

      This notebook plots saved results when the repository holds some
      (`benchmarks/results/**/results.json`) and otherwise runs a small comparison itself. With
      `ORTHO_OPTAX_NB_FAST=1` it always runs a micro comparison (a few steps of a 1-layer model)
      and reads it back through the same loader.
      """),
      code(SETTINGS),
      code(FIND_ROOT),
      code("""
      %matplotlib inline
      import dataclasses
      import json
      import tempfile

      import matplotlib.pyplot as plt
      import numpy as np
      from IPython.display import Markdown, display

      from ortho_optax.models import optimizers as opt_lib
      from ortho_optax.models import train as train_lib
      """),
      code('''
      def load_results(path):
        """Runs of a results.json written by `compare` / `train` (``{"runs": [...]}``)."""
        payload = json.loads(pathlib.Path(path).read_text())
        runs = payload.get("runs", [])
        if not runs or "train_loss" not in runs[0]:
          raise ValueError(f"{path} is not a compare/train results.json")
        return payload.get("title", str(path)), runs


      def saved_results():
        if RESULTS_DIR is None or not RESULTS_DIR.is_dir():
          return []
        found = []
        for p in sorted(RESULTS_DIR.glob("**/results.json")):
          try:
            found.append((p, *load_results(p)))
          except (ValueError, KeyError, json.JSONDecodeError) as e:
            print(f"skipping {p}: {e}")
        return found


      saved = [] if FAST else saved_results()
      print(f"{len(saved)} saved result file(s)"
            + (" (not read with fast settings)" if FAST else ""))
      for p, title, runs in saved:
        print(" ", p.relative_to(ROOT), "-", title, "-", len(runs), "runs")
      '''),
      md("""
      ## Running a comparison

      Runs only when nothing is saved (or with fast settings). The full settings are the
      `compare` defaults on the `tiny` preset, shortened to 200 steps (a few minutes on a CPU);
      the fast ones are a 1-layer, 32-wide model for a handful of steps, only a smoke test.
      """),
      code('''
      if FAST:
        base = train_lib.TrainConfig(
            preset="tiny", model=dict(num_layers=1, model_dim=32, num_heads=2), seq_len=16,
            data="embedded:prose", batch_size=4, steps=12, eval_every=6, eval_batches=2,
            log_every=2, warmup_steps=0, schedule="constant")
        names = ("adamw", "muon", "turbo_muon", "normuon")
      else:
        base = train_lib.TrainConfig(preset="tiny", steps=200, eval_every=50, log_every=10)
        names = opt_lib.COMPARE_DEFAULT

      if not saved:
        out_dir = pathlib.Path(tempfile.mkdtemp(prefix="ortho_optax_compare_"))
        train_lib.compare(dataclasses.replace(base, out_dir=str(out_dir)), names,
                          progress=not FAST)
        path = out_dir / "results.json"
        saved = [(path, *load_results(path))]
        print("wrote and re-read", path)
      '''),
      md("""
      ## Loss curves
      """),
      code('''
      # train_lib's own report writer switches matplotlib to the Agg backend; switch back.
      %matplotlib inline


      def smooth(y, k):
        k = max(1, min(k, len(y)))
        return np.convolve(y, np.ones(k) / k, mode="valid")


      for path, title, runs in saved:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        for r in runs:
          c = r["config"]
          label = f"{c['optimizer']} lr={c['lr']:g}"
          if r["train_loss"]:
            s, l = np.asarray(r["train_loss"], dtype=float).T
            k = max(1, len(l) // 50)
            ax1.plot(s[k - 1:], smooth(l, k), label=label)
          if r["val_loss"]:
            s, l = np.asarray(r["val_loss"], dtype=float).T
            ax2.plot(s, l, marker="o", ms=3, label=label)
        ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="train (smoothed)")
        ax2.set(xlabel="step", ylabel="validation loss", title="validation")
        for ax in (ax1, ax2):
          ax.grid(alpha=0.3)
        ax2.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        plt.show()
        display(Markdown(train_lib.markdown_table(runs)))
      '''),
      md("""
      ## Final validation loss per optimizer

      The best learning rate of each optimizer when the file holds a sweep (`--lr-mults`).
      """),
      code('''
      for path, title, runs in saved:
        best = {}
        for r in runs:
          name, v = r["config"]["optimizer"], r.get("final_val_loss")
          if v is not None and np.isfinite(v) and (name not in best or v < best[name]):
            best[name] = v
        if not best:
          continue
        order = sorted(best, key=best.get)
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(order) + 1.2))
        ax.barh(order[::-1], [best[k] for k in order[::-1]])
        lo = min(best.values())
        ax.set_xlim(lo - 0.05 * abs(lo), max(best.values()) + 0.02 * abs(lo))
        ax.set(xlabel="final validation loss (lower is better)", title=title)
        ax.grid(alpha=0.3, axis="x")
        plt.show()
      '''),
      md("""
      ## GPT-2 small on a GPU: validation loss per step and per second

      `benchmarks/quality_gpt.py` runs the trainer's GPT-2-small model (byte vocabulary) on the
      standard-library corpus (`--data stdlib`) on one GPU: a short learning-rate sweep per
      optimizer, full runs at the chosen rates, two seeds for the best three. Its CPU block writes
      `benchmarks/results/quality_gpt/quality_gpt.json` (the summary) next to the run files;
      this section plots them when the repository holds them (the run is too long for a CPU).
      """),
      code('''
      STUDY = RESULTS_DIR / "quality_gpt" if RESULTS_DIR else None
      if STUDY is None or not (STUDY / "quality_gpt.json").is_file():
        print("no saved GPU study: run benchmarks/quality_gpt.py on a GPU (see its --plan)")
      else:
        study = json.loads((STUDY / "quality_gpt.json").read_text())
        summary = study["summary"]
        curves = {}  # optimizer -> [(steps, val loss, training seconds)] per seed
        for rel in study["runs"]:
          if not rel.startswith("full/"):
            continue
          run = json.loads((STUDY / rel).read_text())
          steps, losses = np.asarray(run["val_loss"], dtype=float).T
          curves.setdefault(run["study"]["optimizer"], []).append(
              (steps, losses, np.asarray(run["val_seconds"], dtype=float)))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        for name, seeds in curves.items():
          lr = summary["rows"][name]["lr"]
          for i, (steps, losses, seconds) in enumerate(seeds):
            label = f"{name} lr={lr:g}" if i == 0 else None
            color = f"C{list(curves).index(name)}"
            ax1.plot(steps, losses, color=color, alpha=0.8, label=label)
            ax2.plot(seconds, losses, color=color, alpha=0.8, label=label)
        for ax, xlabel in ((ax1, "step"), (ax2, "training seconds")):
          ax.axhline(summary["target"], color="k", ls="--", lw=0.8,
                     label=f"{summary['reference']}'s final loss")
          ax.set(xlabel=xlabel, ylabel="validation loss (nats/token)", ylim=(None, 2.0))
          ax.grid(alpha=0.3)
        ax1.legend(fontsize=8)
        fig.suptitle("GPT-2 small, one seed per line")
        fig.tight_layout()
        plt.show()
        rows = [f"| {n} | {r['lr']:g} | {len(r['seeds'])} | {r['final_val_loss']:.4f} | "
                f"{r['seed_spread']:.4f} | {r['lowest_val_loss']:.4f} ({r['lowest_val_step']:.0f}) |"
                if len(r["seeds"]) > 1 else
                f"| {n} | {r['lr']:g} | 1 | {r['final_val_loss']:.4f} | - | "
                f"{r['lowest_val_loss']:.4f} ({r['lowest_val_step']:.0f}) |"
                for n, r in sorted(summary["rows"].items(), key=lambda kv: kv[1]["final_val_loss"])]
        display(Markdown("| optimizer | lr | seeds | validation loss (seeds averaged) | seed "
                         "spread | lowest (step) |\\n|---|---|---|---|---|---|\\n"
                         + "\\n".join(rows)))
      '''),
  ]


# ---------------------------------------------------------------------------------------
# 04 kernels
# ---------------------------------------------------------------------------------------


def kernels():
  return [
      md("""
      # Newton–Schulz kernels vs the XLA path and the Triton peers

      `ortho_optax.newton_schulz(backend="pallas")` runs Newton–Schulz with Pallas Mosaic-GPU
      kernels on Hopper GPUs (one-triangle symmetric Gram and polynomial products, fused
      epilogues, same-shape matrices batched into one launch); `backend="xla"` is a plain
      `jnp.matmul` chain; `"auto"` picks the kernels when they can run.
      `benchmarks/bench_kernels.py` times both and writes `bench_kernels.json`.

      This notebook
      * runs the benchmark live when a Hopper GPU with the Pallas kernels is present (not with
        fast settings);
      * otherwise reads saved results from `benchmarks/results/*.json`;
      * always plots the peers' numbers (PyTorch / Triton / XLA on an H100, from the project's
        measurements, stored in `benchmarks/results/peers_anchors.json`).

      Peers and our numbers may come from different cards and sessions: compare shapes
      within one series, and across series only as ratios.
      """),
      code(SETTINGS),
      code(FIND_ROOT),
      code("""
      %matplotlib inline
      import json
      import subprocess
      import sys
      import tempfile

      import jax
      import matplotlib.pyplot as plt
      import numpy as np

      import ortho_optax.pallas as opl

      print("devices:", jax.devices())
      print("Pallas Mosaic-GPU kernels available:", opl.is_available())
      """),
      md("""
      ## Our numbers: live or saved
      """),
      code('''
      def is_bench_json(payload):
        """A bench_kernels.py output: timing rows with a shape and a configuration each."""
        rows = payload.get("timings") if isinstance(payload, dict) else None
        return (isinstance(rows, list) and bool(rows)
                and all(isinstance(r, dict) and "shape" in r and "config" in r for r in rows))


      def find_saved_bench():
        """Saved bench_kernels.py outputs under benchmarks/results (newest first)."""
        if RESULTS_DIR is None or not RESULTS_DIR.is_dir():
          return []
        found = []
        for p in sorted(RESULTS_DIR.glob("**/*.json"), key=lambda p: p.stat().st_mtime,
                        reverse=True):
          try:
            payload = json.loads(p.read_text())
          except (OSError, json.JSONDecodeError):
            continue
          if is_bench_json(payload):
            found.append((p, payload))
        return found


      bench, bench_source = None, None
      if opl.is_available() and not FAST and ROOT is not None:
        out = tempfile.mkdtemp(prefix="bench_kernels_")
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"),
                        "--quick", "--out", out], check=True)
        bench_source = pathlib.Path(out) / "bench_kernels.json"
        bench = json.loads(bench_source.read_text())
      else:
        saved = find_saved_bench()
        if saved:
          bench_source, bench = saved[0]
          if len(saved) > 1:
            print("other saved benchmark files:", [str(p) for p, _ in saved[1:]])

      if bench is None:
        print("No kernel benchmark results here: no Hopper GPU to run "
              "benchmarks/bench_kernels.py on, and no saved bench_kernels.json under "
              f"{RESULTS_DIR}. Run `python benchmarks/bench_kernels.py --out benchmarks/results` "
              "on an H100/H200 to make one. The peers are still plotted below.")
      else:
        print(f"kernel results from {bench_source}: device {bench.get('device')}, "
              f"jax {bench.get('jax')}, {bench.get('time')}")
      '''),
      code('''
      def shape_label(shape):
        b, m, n = shape
        return f"{m}x{n}" if b == 1 else f"{b}x{m}x{n}"


      def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"


      if bench is not None:
        lines = [f"peak bf16 matmul {fmt(bench.get('peak_tflops'), '.0f')} TFLOP/s, "
                 f"XLA path: {bench.get('xla_backend', '?')}",
                 "",
                 f"{'shape':>14} {'config':>7} {'pallas ms':>10} {'xla ms':>9} {'speedup':>8} "
                 f"{'TFLOP/s':>8} {'% of floor':>10}"]
        for r in bench["timings"]:
          frac = r.get("frac_floor")
          lines.append(
              f"{shape_label(r['shape']):>14} {r.get('config', '?'):>7} "
              f"{fmt(r.get('pallas_ms'), '10.3f'):>10} {fmt(r.get('xla_ms'), '9.3f'):>9} "
              f"{fmt(r.get('speedup'), '8.2f'):>8} {fmt(r.get('tflops'), '8.0f'):>8} "
              f"{fmt(100 * frac if frac is not None else None, '10.0f'):>10}")
        for r in bench.get("optimizer", []):
          lines.append(f"optimizer step {r['optimizer']}: pallas {fmt(r.get('pallas_ms'), '.3f')} "
                       f"ms, xla {fmt(r.get('xla_ms'), '.3f')} ms")
        if "checks_ok" in bench:
          lines.append(f"correctness checks passed: {bench['checks_ok']}")
        print("\\n".join(lines))
      '''),
      md("""
      ## The peers

      Milliseconds per call on one H100 (median; JAX columns are device time inside one jitted
      loop, PyTorch columns `triton.testing.do_bench`). Source: the project's anchor
      measurements, copied with their provenance into `peers_anchors.json`.
      """),
      code('''
      PEERS_PATH = RESULTS_DIR / "peers_anchors.json" if RESULTS_DIR else None
      if PEERS_PATH is None or not PEERS_PATH.exists():
        raise FileNotFoundError("benchmarks/results/peers_anchors.json not found: run this "
                                "notebook from an ortho-optax checkout.")
      peers = json.loads(PEERS_PATH.read_text())
      print("source:", peers["source"])
      cols = peers["columns"]
      print(f"{'shape':>14} " + " ".join(f"{k:>12}" for k in cols))
      for row in peers["rows"]:
        print(f"{shape_label(row['shape']):>14} " +
              " ".join(f"{fmt(row['ms'].get(k), '12.3f'):>12}" for k in cols))
      print()
      for k, desc in cols.items():
        print(f"{k:>12}: {desc}")
      '''),
      md("""
      ## Time vs size

      x: flops of one NS step with the one-triangle trick, `batch · (3m²n + m³)` (m ≤ n); y:
      milliseconds per call, both log scale. Dashed: peers; solid: our kernels and our XLA
      path (when results exist).
      """),
      code('''
      def step_flops(shape):
        b, m, n = shape
        m, n = min(m, n), max(m, n)
        return b * (3.0 * m * m * n + m ** 3)


      fig, ax = plt.subplots(figsize=(9, 5.5))
      for key, desc in cols.items():
        pts = sorted((step_flops(r["shape"]), r["ms"][key]) for r in peers["rows"]
                     if r["ms"].get(key) is not None)
        if pts:
          x, y = zip(*pts)
          ax.plot(x, y, ls="--", marker=".", lw=1, label=f"peer: {desc}")
      if bench is not None:
        # Ours: colour = backend, line style = configuration (peers use the colour cycle).
        for i, config in enumerate(sorted({r.get("config") for r in bench["timings"]})):
          for backend, color, marker in (("pallas", "black", "o"), ("xla", "crimson", "s")):
            pts = sorted((step_flops(r["shape"]), r[f"{backend}_ms"]) for r in bench["timings"]
                         if r.get("config") == config and f"{backend}_ms" in r)
            if pts:
              x, y = zip(*pts)
              ax.plot(x, y, color=color, marker=marker, ls=("-", ":", "-.")[i % 3], lw=2,
                      ms=4, label=f"ortho-optax {backend}, {config}")
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set(xlabel="flops of one NS step (one triangle), batch·(3m²n + m³)",
             ylabel="ms per call",
             title="Newton–Schulz time vs size" + ("" if bench is not None
                                                   else " (peers only: no kernel results here)"))
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=7, loc="upper left")
      plt.show()
      '''),
      md("""
      ## Speed-up over the XLA path

      Per shape: XLA time / kernel time from our benchmark, and the best Triton peer's speed-up
      over its own XLA bf16 column on the same shape (same card and session for each ratio).
      """),
      code('''
      peer_by_shape = {tuple(r["shape"]): r["ms"] for r in peers["rows"]}
      labels, ours, theirs = [], [], []
      for r in (bench or {}).get("timings", []):
        if r.get("config") != "AOL+4" or "speedup" not in r:
          continue
        labels.append(shape_label(r["shape"]))
        ours.append(r["speedup"])
        p = peer_by_shape.get(tuple(r["shape"]), {})
        theirs.append(p["xla_bf16_aol4"] / p["triton_turbo_aol4"]
                      if p.get("xla_bf16_aol4") and p.get("triton_turbo_aol4") else np.nan)
      if not labels:  # no results of ours: peers only
        for shape, p in peer_by_shape.items():
          if p.get("xla_bf16_aol4") and p.get("triton_turbo_aol4"):
            labels.append(shape_label(shape))
            theirs.append(p["xla_bf16_aol4"] / p["triton_turbo_aol4"])
            ours.append(np.nan)
      x = np.arange(len(labels))
      fig, ax = plt.subplots(figsize=(9, 4))
      if np.isfinite(ours).any():
        ax.bar(x - 0.2, ours, 0.4, label="ortho-optax Pallas AOL+4 vs our XLA")
      ax.bar(x + 0.2, theirs, 0.4, label="Triton Turbo-Muon AOL+4 vs XLA bf16 AOL+4 (H100)")
      ax.axhline(1.0, color="k", lw=0.8)
      ax.set_xticks(x, labels, rotation=30)
      ax.set(ylabel="speed-up over XLA (x)", title="AOL + 4 steps")
      ax.grid(alpha=0.3, axis="y")
      ax.legend(fontsize=8)
      plt.show()
      '''),
  ]


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_orthogonality.ipynb": orthogonality,
    "03_optimizer_comparison.ipynb": comparison,
    "04_kernels.ipynb": kernels,
}


def build(name: str) -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  nb.cells = NOTEBOOKS[name]()
  # Stable cell ids keep regenerated notebooks byte-identical (reviewable diffs).
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"cell-{i:02d}"
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                     "name": "python3"},
      "language_info": {"name": "python"},
  }
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true",
                  help="do not write; exit 1 when a stored notebook differs from this script")
  ap.add_argument("--out", default=str(HERE), help="directory to write into")
  args = ap.parse_args(argv)
  stale = []
  for name in NOTEBOOKS:
    path = pathlib.Path(args.out) / name
    text = render(name)
    if args.check:
      if not path.exists() or path.read_text() != text:
        stale.append(name)
    else:
      path.write_text(text)
      print("wrote", path)
  if stale:
    print("stale (run python notebooks/build_notebooks.py):", ", ".join(stale))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
