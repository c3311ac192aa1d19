"""The XLA Newton–Schulz path against optax.contrib's, and candidate formulations of it.

Usage: python benchmarks/bench_xla_ns.py [--out DIR] [--quick | --shapes 8192x8192,...]

For every ``bench_kernels.py`` shape, bf16, AOL + 4 (``turbo_aol``) and Frobenius + 5
(``quintic``): wall ms per call (20 calls in one jitted loop, median of 5, as
``bench_kernels.py`` times) of

* ``optax``: ``optax.contrib._muon.orthogonalize_via_newton_schulz`` (vmapped over the
  stack, as ``optax.contrib.muon`` runs it), the baseline a JAX user already has;
* ``ours``: ``ortho_optax.newton_schulz(backend="xla")``;
* diagnostic formulations of the same iteration (``--variants``): ``astype`` (our math
  with plain casts instead of ``reduce_precision`` roundings), ``bf16_out`` (GEMMs that
  write bf16, combinations in float32), ``bf16_all`` (everything in bf16, as optax),
  ``gram_bf16`` (the separate step with only the Gram GEMM writing bf16), ``fold`` /
  ``fold_bf16`` (``X ← (aI + bA + cA²)·X``: one GEMM writing bf16 per update, ``A²``
  written in float32 / bf16; the step the library runs on accelerators, with plain
  preconditioning), ``fold_scan`` (``fold`` with the steps after the first in a
  ``lax.scan``: what the scan costs);

and each output's relative distance to a float32 HIGHEST-precision run of the same
iteration (so speed is never read without accuracy). Writes ``bench_xla_ns.json``;
prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402  (timing loop, shapes, coefficient tables)

import ortho_optax as oo  # noqa: E402
from optax.contrib import _muon as optax_muon  # noqa: E402

CONFIGS = {
    "AOL+4": dict(coefficients=bk.TURBO_AOL, preconditioning="aol", eps=1e-6),
    "Frob+5": dict(coefficients=bk.QUINTIC, preconditioning="frobenius", eps=1e-7),
}


def optax_fn(cfg):
  coeffs = jnp.asarray(cfg["coefficients"], jnp.float32)
  pre = cfg["preconditioning"]
  one = lambda m: optax_muon.orthogonalize_via_newton_schulz(
      m, coeffs, preconditioning=pre, eps=cfg["eps"])
  return jax.vmap(one)


def ours_fn(cfg):
  kw = dict(cfg, steps=len(cfg["coefficients"]))
  return lambda x: oo.newton_schulz(x, backend="xla", **kw)


def _swap(x):
  return jnp.swapaxes(x, -1, -2)


#: The diagnostic formulations of ``--variants``.
VARIANTS = ("astype", "bf16_out", "bf16_all", "gram_bf16", "fold", "fold_bf16", "fold_scan")


def variant_fn(cfg, mode):
  """One formulation of the bf16 iteration (wide stacks), Frobenius / AOL as ours."""
  triples = cfg["coefficients"]
  aol = cfg["preconditioning"] == "aol"
  eps = cfg["eps"]
  f32, bf = jnp.float32, jnp.bfloat16

  def mm(u, v):
    if mode == "astype":
      return jnp.matmul(u, v, preferred_element_type=f32)
    return jnp.matmul(u, v)  # bf16 out

  def comb(*terms):  # sum of (coef, array) rounded once to bf16
    if mode == "bf16_all":
      out = None
      for c, t in terms:
        v = jnp.asarray(c, bf) * t.astype(bf)
        out = v if out is None else out + v
      return out
    return sum(c * t.astype(f32) for c, t in terms).astype(bf)

  def fold(X, A, a, b, c):
    # X ← (aI + bA + cA²)·X: the a·X term folded into the polynomial, so the update is
    # one GEMM writing bf16 (no float32 product to reread).
    sq = jnp.matmul(A, A, preferred_element_type=bf if mode == "fold_bf16" else f32)
    eye = jnp.eye(A.shape[-1], dtype=f32)
    return jnp.matmul((a * eye + b * A.astype(f32) + c * sq.astype(f32)).astype(bf), X)

  def fn(x):
    xf = x.astype(f32)
    if not aol:
      xf = xf / (jnp.sqrt(jnp.sum(xf * xf, axis=(-2, -1), keepdims=True)) + eps)
    X = xf.astype(bf)
    for step, (a, b, c) in enumerate(triples):
      if mode == "fold_scan" and step == 1:  # the other steps as a lax.scan
        body = lambda X, abc: (fold(X, jnp.matmul(X, _swap(X)), *abc), None)  # noqa: E731
        return lax.scan(body, X, jnp.asarray(triples[1:], f32))[0]
      A = mm(X, _swap(X)).astype(bf)
      if step == 0 and aol:
        s = lax.rsqrt(jnp.maximum(jnp.sum(jnp.abs(A.astype(f32)), axis=-1), eps))
        X = (s[..., :, None] * X.astype(f32)).astype(bf)
        A = (s[..., :, None] * A.astype(f32) * s[..., None, :]).astype(bf)
      if mode in ("fold", "fold_bf16", "fold_scan"):
        X = fold(X, A, a, b, c)
        continue
      if mode == "gram_bf16":  # ours, with only the Gram GEMM writing bf16
        B = comb((b, A), (c, jnp.matmul(A, A, preferred_element_type=f32)))
        X = comb((a, X), (1.0, jnp.matmul(B, X, preferred_element_type=f32)))
        continue
      B = comb((b, A), (c, mm(A, A)))
      X = comb((a, X), (1.0, mm(B, X)))
    return X
  return fn


def reference_fn(cfg):
  """The same iteration in float32 at HIGHEST precision (accuracy reference)."""
  kw = dict(cfg, steps=len(cfg["coefficients"]))

  def fn(x):
    with jax.default_matmul_precision("highest"):
      return oo.newton_schulz(x.astype(jnp.float32), backend="xla", compute_dtype=jnp.float32,
                              **kw)
  return jax.jit(fn)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--quick", action="store_true", help="three shapes only")
  ap.add_argument("--shapes", default=None, help="e.g. 8192x8192,24x768x3072 (default: "
                  "every bench_kernels.py shape)")
  ap.add_argument("--variants", default="astype,bf16_out,bf16_all",
                  help="comma-separated diagnostic formulations ('' for none)")
  args = ap.parse_args()
  shapes = bk.SHAPES if not args.quick else [bk.SHAPES[i] for i in (0, 2, 7)]
  if args.shapes:
    shapes = bk.parse_shapes(args.shapes)
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise SystemExit(f"--variants: {', '.join(unknown)} unknown; choose from "
                     f"{', '.join(VARIANTS)} (comma-separated, '' for none).")
  rows = []
  for shape in shapes:
    x = bk._ns_input(*shape)
    for name, cfg in CONFIGS.items():
      ref = np.asarray(reference_fn(cfg)(x), np.float32)
      row = dict(shape=list(shape), config=name)
      fns = {"optax": optax_fn(cfg), "ours": ours_fn(cfg)}
      fns.update({v: variant_fn(cfg, v) for v in variants})
      for key, fn in fns.items():
        try:
          t, _ = bk.time_call(fn, x)
          out = np.asarray(jax.jit(fn)(x), np.float32)
          row[key + "_ms"] = t * 1e3
          row[key + "_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        except Exception as ex:  # pylint: disable=broad-except
          row[key + "_error"] = repr(ex)[:500]
      rows.append(row)
      bk.log(json.dumps(row))
      with open(os.path.join(args.out, "bench_xla_ns.json"), "w") as f:
        json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, rows=rows), f,
                  indent=1)
  keys = ["optax", "ours"] + variants
  print("| shape | config | " + " | ".join(f"{k} ms (err)" for k in keys) + " |")
  print("|---|---|" + "---|" * len(keys))
  for r in rows:
    cells = [f"{r.get(k + '_ms', float('nan')):.3f} ({r.get(k + '_err', float('nan')):.1e})"
             for k in keys]
    print(f"| {'x'.join(map(str, r['shape']))} | {r['config']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
