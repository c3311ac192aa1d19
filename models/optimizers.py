"""Optimizer registry for the GPT trainer: names -> ``optax.GradientTransformation``.

``adamw`` is :func:`optax.adamw` on every parameter. Every other name is the
ortho-optax optimizer of that name (``ortho_optax.OPTIMIZERS[name]``), which orthogonalizes the
hidden matrices and sends embeddings and the head to its AdamW branch (``adam_*``
arguments). :data:`TINY_DEFAULTS` holds a tuned-by-sweep learning rate per optimizer for
the ``tiny`` preset on the embedded corpus; the AdamW branch of the hybrid optimizers
uses ``adam_learning_rate`` (default :data:`TINY_ADAM_LR`) so that only the hidden
matrices differ between optimizers.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

import ortho_optax
from ortho_optax import validation

#: Every name the trainer accepts: ``adamw`` and the library's optimizers.
OPTIMIZERS = ("adamw", *ortho_optax.OPTIMIZERS)

#: The optimizers whose update orthogonalizes (what ``ortho_optax.distribute`` lays out on a
#: mesh): all but ``adamw`` and ``auon`` (its cosh-norm brake replaces orthogonalization).
ORTHOGONALIZING = tuple(n for n in OPTIMIZERS if n not in ("adamw", "auon"))

#: ``compare`` with no ``--opt``: the main contenders (fast enough for 2 CPU cores).
COMPARE_DEFAULT = ("adamw", "muon", "turbo_muon", "auon", "aurora", "normuon", "oadamw")

#: Learning rate of the embeddings and head (AdamW branch) in every hybrid optimizer.
TINY_ADAM_LR = 3e-3

#: Peak learning rates for the ``tiny`` preset (300 steps, warm-up then cosine decay): the
#: best of the sweep in benchmarks/results/tiny_compare.md where one was run, else an
#: estimate from the update's scale (noted).
TINY_DEFAULTS: dict[str, float] = {
    "adamw": 3e-3,  # swept 1e-3, 3e-3, 9e-3
    # Keller's shape scaling sqrt(max(1, out/in)): ~0.005 per element on 128-wide matrices.
    "muon": 0.06,  # swept 0.02, 0.06, 0.18
    "turbo_muon": 0.06,
    "aurora": 0.06,
    "riemannian_aurora": 0.06,  # not swept (= aurora)
    "hybrid_auon": 0.06,  # not swept (NS output without shape scaling)
    # AuON's update is the momentum itself (G / r with r ~ 1): SGD-sized learning rates
    # (hidden-matrix gradients have an RMS of ~1e-5..1e-4 on this model).
    "auon": 5.5,  # swept 0.62, 1.85, 5.6, 16.7, 50, 150
    # Spectral scaling sqrt(max(out, in)) gives updates of RMS ~1: Adam-sized rates.
    "normuon": 2e-3,  # swept 2e-3, 6e-3, 1.8e-2
    "namo": 1e-2,  # not swept
    # AdaMuon's sign-like update (RMS ~1) times the spectral factor (~11-22); not swept.
    "adamuon": 5e-4,
    "adaptive_muon": 5e-4,
    # Adam on the orthogonalized gradient (and plain StableAdamW on embeddings / head,
    # at this same lr: OAdamW has no separate AdamW learning rate).
    "oadamw": 9e-3,  # swept 1e-3, 3e-3, 9e-3, 2.7e-2
}

def resolve(name: str) -> Callable[..., optax.GradientTransformation]:
  """The factory of optimizer ``name``: :func:`optax.adamw` or ``ortho_optax.OPTIMIZERS[name]``.

  Raises:
    ValueError: for an unknown name (listing the valid ones).
  """
  validation.check_choice("optimizer", name, OPTIMIZERS)
  return optax.adamw if name == "adamw" else ortho_optax.OPTIMIZERS[name]


def default_lr(name: str) -> float:
  """The tuned peak learning rate of ``name`` for the ``tiny`` preset (:data:`TINY_DEFAULTS`)."""
  validation.check_choice("optimizer", name, OPTIMIZERS)
  return TINY_DEFAULTS[name]


def parse_value(text: str) -> Any:
  """``"0.1"`` -> 0.1, ``"5"`` -> 5, ``"true"`` -> True, ``"none"`` -> None, else str."""
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  for conv in (int, float):
    try:
      return conv(text)
    except ValueError:
      pass
  return text


def parse_opt_args(items: list[str] | None) -> dict[str, Any]:
  """``["momentum=0.9", "nesterov=false"]`` -> ``{"momentum": 0.9, "nesterov": False}``."""
  out = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"--opt-arg {item!r} must look like key=value.")
    out[key.strip()] = parse_value(value)
  return out


def build(name: str, learning_rate, *, adam_learning_rate=None, weight_decay: float = 0.0,
          **kwargs) -> optax.GradientTransformation:
  """Builds optimizer ``name``.

  Args:
    name: one of :data:`OPTIMIZERS`.
    learning_rate: number or schedule for the optimizer's main (orthogonalized) branch;
      for ``adamw`` the only learning rate.
    adam_learning_rate: number or schedule for the AdamW branch of hybrid optimizers
      (ignored by ``adamw``); ``None`` keeps the optimizer's own default.
    weight_decay: decoupled weight decay of the main branch (``adamw``: of everything).
    **kwargs: further keyword arguments of the optimizer (``--opt-arg``).

  Returns:
    The ``optax.GradientTransformation``.

  Raises:
    ValueError: for an unknown optimizer or a keyword it does not take.
  """
  fn = resolve(name)
  if name == "adamw":
    kwargs.setdefault("b1", 0.9)
    kwargs.setdefault("b2", 0.95)
    kwargs.setdefault("eps", 1e-10)
    return _call(fn, name, learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
  params = inspect.signature(fn).parameters
  if adam_learning_rate is not None and "adam_learning_rate" in params:
    kwargs.setdefault("adam_learning_rate", adam_learning_rate)
  if "weight_decay" in params:
    kwargs.setdefault("weight_decay", weight_decay)
  return _call(fn, name, learning_rate=learning_rate, **kwargs)


def _call(fn, name, **kwargs):
  params = inspect.signature(fn).parameters
  takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  bad = [k for k in kwargs if k not in params and not takes_var_kw]
  if bad:
    raise ValueError(f"optimizer {name!r} takes no argument(s) {bad}; it takes: "
                     f"{[p for p in params if params[p].kind is not inspect.Parameter.VAR_POSITIONAL]}.")
  return fn(**kwargs)
