"""Hyperparameter checks: the one validation dialect of the library.

Each hyperparameter is checked once, at construction, by the stage (or optimizer) that owns
it, with the helpers below. The policy:

* a numeric hyperparameter is a Python real number (checked against its range, and
  finite), a JAX / NumPy array or a tracer (accepted as is: its value is only known at run
  time, e.g. under ``optax.inject_hyperparams``), or, where a schedule is allowed, a
  callable of the step count. A schedule is evaluated at steps 0 and 1 with Python ints and
  those values are checked like numbers; a schedule that cannot be evaluated outside a
  trace is accepted;
* anything else (a string such as ``"0.02"``, a bool, ``None``, a list) is rejected;
* step and iteration counts are Python ints (they fix loop lengths and shapes), flags are
  Python bools, names are one of their choices, dtypes go through :func:`check_dtype`.

Every failure raises a ``ValueError`` that names the hyperparameter, its value and what is
allowed.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import numpy as np

#: The error of a stage that needs the parameters when ``update`` got none.
NO_PARAMS = ("This transformation needs the parameters: call update(updates, state, params).")

#: Appended to errors about values that ``optax.inject_hyperparams`` turned into arrays.
INJECT_HINT = (
    "Under optax.inject_hyperparams, keep it static: "
    "optax.inject_hyperparams(factory, static_args=ortho_optax.inject_static_args(factory)).")


def is_python_number(value) -> bool:
  """True for Python (and NumPy scalar) real numbers; False for bools, arrays and callables."""
  return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
          and not callable(value))


def is_array(value) -> bool:
  """True for JAX / NumPy arrays and tracers (values known at run time)."""
  return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type)


def _bounds(low, high, low_open, high_open) -> str:
  lo = "(-inf" if low is None else ("(" if low_open else "[") + repr(low)
  hi = "inf)" if high is None else repr(high) + (")" if high_open else "]")
  return f"{lo}, {hi}"


def _in_range(value, low, high, low_open, high_open) -> bool:
  ok = math.isfinite(value)  # NaN and +-inf fail every range
  if low is not None:
    ok = ok and (value > low if low_open else value >= low)
  if high is not None:
    ok = ok and (value < high if high_open else value <= high)
  return ok


def _schedule_values(schedule):
  """``[(step, value)]`` of ``schedule`` at steps 0 and 1, or ``[]`` when it needs a trace."""
  values = []
  for step in (0, 1):
    try:
      value = np.asarray(schedule(step), dtype=np.float64)
    except Exception:  # pylint: disable=broad-except
      # Needs traced inputs (or state) to evaluate: only known at run time.
      return []
    values.append((step, value))
  return values


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False,
                high_open: bool = False, schedule: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite number in the range, or a run-time value.

  Args:
    name: hyperparameter name used in the message.
    value: a Python number or a concrete scalar array (checked), a tracer (accepted: its
      value is known only at run time), or with
      ``schedule=True`` a callable ``step -> value`` (checked at steps 0 and 1).
    low, high: bounds, ``None`` (or an infinite bound) for unbounded.
    low_open, high_open: whether the bounds themselves are excluded.
    schedule: whether a schedule (a callable) is allowed.
  """
  high = None if high is not None and math.isinf(high) else high
  low = None if low is not None and math.isinf(low) else low
  allowed = "a number" + (" or a schedule" if schedule else "")
  bounds = _bounds(low, high, low_open, high_open)
  if is_python_number(value):
    if not _in_range(float(value), low, high, low_open, high_open):
      raise ValueError(f"{name} must be a finite number in {bounds}, got {name}={value!r}.")
    return
  if is_array(value):
    try:
      array = np.asarray(value)
    except Exception:  # pylint: disable=broad-except
      return  # a tracer: its value is known only at run time
    if array.ndim != 0:
      raise ValueError(f"{name} must be a scalar, got an array of shape {array.shape}.")
    if not _in_range(float(array), low, high, low_open, high_open):
      raise ValueError(f"{name} must be a finite number in {bounds}, got "
                       f"{name}={array.item()!r} (a concrete array).")
    return
  if schedule and callable(value):
    for step, v in _schedule_values(value):
      if not all(_in_range(float(x), low, high, low_open, high_open) for x in v.ravel()):
        raise ValueError(
            f"{name} is a schedule whose value at step {step} is {v.tolist()!r}; it must be "
            f"finite and in {bounds}.")
    return
  raise ValueError(f"{name} must be {allowed} in {bounds}, got {name}={value!r} "
                   f"({type(value).__name__}).")


def check_non_negative(name: str, value, *, schedule: bool = False) -> None:
  """:func:`check_range` with the range ``[0, inf)``."""
  check_range(name, value, 0.0, schedule=schedule)


def check_positive(name: str, value, *, schedule: bool = False) -> None:
  """:func:`check_range` with the range ``(0, inf)``."""
  check_range(name, value, 0.0, low_open=True, schedule=schedule)


def check_learning_rate(value, name: str = "learning_rate") -> None:
  """A learning rate: a number ``>= 0``, an array, or a schedule whose first values are."""
  check_range(name, value, 0.0, schedule=True)


def check_choice(name: str, value, choices: Iterable) -> None:
  """Raises ``ValueError`` if ``value`` is not one of ``choices``."""
  choices = tuple(choices)
  # Same type and equal: 1 is not True, and an array is never a name.
  if not any(type(value) is type(c) and value == c for c in choices):
    raise ValueError(
        f"{name}={value!r} is not supported; valid choices: "
        + ", ".join(repr(c) for c in choices) + ".")


def check_bool(name: str, value) -> None:
  """Raises ``ValueError`` unless ``value`` is ``True`` or ``False``."""
  if not isinstance(value, (bool, np.bool_)):
    hint = f" {INJECT_HINT}" if is_array(value) else ""
    raise ValueError(f"{name} must be True or False, got {name}={value!r}.{hint}")


def check_int(name: str, value, minimum: Optional[int] = None) -> int:
  """Returns ``value`` as an ``int``; raises ``ValueError`` unless it is a Python int.

  Step and iteration counts fix loop lengths and array shapes, so they must be static
  Python integers (``bool`` is rejected). An array (what ``optax.inject_hyperparams``
  makes of an int it is not told to keep static) gets an error that says how to keep it
  static.
  """
  if is_array(value) and not isinstance(value, numbers.Integral):
    raise ValueError(
        f"{name} must be a Python int: it fixes a loop length or a shape and cannot be an "
        f"array, got {name}={value!r}. {INJECT_HINT}")
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be a Python int, got {name}={value!r}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}.")
  return int(value)


def check_static(**values) -> None:
  """Raises ``ValueError`` for any value that is an array (known only at run time).

  For the structural arguments of an optimizer factory (loop counts, shapes) that a stage
  checks further: ``optax.inject_hyperparams`` turns an int it is not told to keep static
  into an array, which must be refused at the factory with the way out, not deep inside a
  stage. Python values are left to the stage's own check.
  """
  for name, value in values.items():
    if is_array(value):
      raise ValueError(
          f"{name} must be a static Python value: it fixes a loop length or a shape, got "
          f"the array {name}={value!r}. {INJECT_HINT}")


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
      unknown name, an integer or complex dtype, an array, ``None`` when ``allow_none``
      is False).
  """
  import jax.numpy as jnp  # local: keeps this module importable without initialising JAX
  choices = ("a floating dtype such as jnp.bfloat16 or jnp.float32, or one of "
             + ", ".join(repr(k) for k in DTYPE_NAMES) + (", or None" if allow_none else ""))
  if value is None:
    if allow_none:
      return None
    raise ValueError(f"{name} must be {choices}; got None.")
  if is_array(value):
    # optax.inject_hyperparams treats a dtype (a callable class) as a schedule and passes
    # its "value", an array, in its place.
    raise ValueError(f"{name} must be a dtype, got the array {value!r}; use {choices}. "
                     f"{INJECT_HINT}")
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


__all__ = [
    "DTYPE_NAMES", "INJECT_HINT", "NO_PARAMS", "check_bool", "check_choice", "check_dtype",
    "check_int", "check_learning_rate", "check_non_negative", "check_positive", "check_range",
    "check_static", "is_array", "is_python_number",
]
