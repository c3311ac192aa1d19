"""Hyperparameter checks shared by every stage and optimizer.

One policy: only *Python numbers* are checked, and a failure raises a ``ValueError`` that
names the hyperparameter, its value and what is allowed. Anything else (a ``jax.Array``, a
schedule, a tracer under ``optax.inject_hyperparams``) is accepted as is, because it may
only be known at run time.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Optional


def is_python_number(value) -> bool:
  """True for Python (and NumPy scalar) real numbers; False for bools, arrays and callables."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and not callable(value))


def check_non_negative(name: str, value) -> None:
  """Raises ``ValueError`` if ``value`` is a number < 0 (or NaN)."""
  if is_python_number(value) and not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {name}={value!r}.")


def check_positive(name: str, value) -> None:
  """Raises ``ValueError`` if ``value`` is a number <= 0 (or NaN)."""
  if is_python_number(value) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {name}={value!r}.")


def check_in_range(name: str, value, low=None, high=None, *, low_inclusive: bool = True,
                   high_inclusive: bool = True) -> None:
  """Raises ``ValueError`` if the number ``value`` is outside ``[low, high]``.

  Args:
    name: hyperparameter name used in the message.
    value: the value to check (non-numbers are skipped).
    low, high: bounds, ``None`` for unbounded.
    low_inclusive, high_inclusive: whether the bounds themselves are allowed.
  """
  if not is_python_number(value):
    return
  ok = value == value  # NaN fails every range
  if low is not None:
    ok = ok and (value >= low if low_inclusive else value > low)
  if high is not None:
    ok = ok and (value <= high if high_inclusive else value < high)
  if not ok:
    lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + repr(low)
    hi = "inf)" if high is None else repr(high) + ("]" if high_inclusive else ")")
    raise ValueError(f"{name} must be in {lo}, {hi}, got {name}={value!r}.")


def check_choice(name: str, value, choices: Iterable) -> None:
  """Raises ``ValueError`` if ``value`` is not one of ``choices``."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(
        f"{name}={value!r} is not supported; valid choices: "
        + ", ".join(repr(c) for c in choices) + ".")


def check_int(name: str, value, minimum: Optional[int] = None) -> None:
  """Raises ``ValueError`` unless ``value`` is a Python ``int`` (>= ``minimum``).

  Step counts and iteration counts fix array shapes / loop lengths, so they must be
  static Python integers (``bool`` is rejected).
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be a Python int, got {name}={value!r}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}.")


def check_learning_rate(value, name: str = "learning_rate") -> None:
  """A learning rate is a number >= 0 or a schedule (callable) or an array."""
  if value is None:
    raise ValueError(f"{name} must be a number or a schedule, got None.")
  check_non_negative(name, value)


def check_momentum(value, name: str = "momentum") -> None:
  """EMA coefficients live in [0, 1]."""
  check_in_range(name, value, 0.0, 1.0)


def check_range(name: str, value, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> None:
  """:func:`check_in_range` with open / closed bounds spelled as the stages use them."""
  check_in_range(name, value, low, high, low_inclusive=not low_open,
                 high_inclusive=not high_open)


#: Spellings of floating dtypes accepted wherever a dtype is a hyperparameter.
DTYPE_NAMES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "f32": "float32", "fp32": "float32", "float": "float32",
    "float64": "float64", "f64": "float64", "fp64": "float64", "double": "float64",
}


def check_dtype(name: str, value, *, allow_none: bool = True):
  """A floating dtype hyperparameter as a ``numpy.dtype`` (``None`` stays ``None``).

  Accepts dtype objects (``jnp.bfloat16``, ``np.float32``, ``jnp.dtype("float32")``) and
  the names of :data:`DTYPE_NAMES` (``"bf16"``, ``"float32"``, ...).

  Raises:
    ValueError: naming the value and the accepted spellings, for anything else (an
      unknown name, an integer or complex dtype, ``None`` when ``allow_none`` is False).
  """
  import jax.numpy as jnp  # local: keeps this module importable without initialising JAX
  choices = ("a floating dtype such as jnp.bfloat16 or jnp.float32, or one of "
             + ", ".join(repr(k) for k in DTYPE_NAMES) + (", or None" if allow_none else ""))
  if value is None:
    if allow_none:
      return None
    raise ValueError(f"{name} must be {choices}; got None.")
  if isinstance(value, str):
    key = value.strip().lower()
    if key not in DTYPE_NAMES:
      raise ValueError(f"{name}={value!r} is not a dtype name; use {choices}.")
    value = DTYPE_NAMES[key]
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise ValueError(f"{name}={value!r} is not a dtype; use {choices}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name}={value!r} is not a floating dtype; use {choices}.")
  return dtype
