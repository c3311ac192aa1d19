"""One training run's configuration, its checks, and the objects it defines.

:class:`TrainConfig` holds every setting of :func:`ortho_optax.models.train.train`;
:meth:`TrainConfig.validate` checks all of them up front (before any data is read or any
file written), naming each bad value and what is allowed. The command line passes a
``name`` function so that messages name its flags (``--log-every``) instead of the
fields (``log_every``). :func:`make_optimizer` builds the run's optax transformation
(warm-up + decay schedule) and :func:`run_record` the settings a checkpoint must match to
be resumed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from ortho_optax import distributed
from ortho_optax import validation
from ortho_optax.models import gpt
from ortho_optax.models import mesh as mesh_lib
from ortho_optax.models import optimizers as opt_lib

SCHEDULES = ("cosine", "linear", "constant")

#: Model fields that :attr:`TrainConfig.model` may override (the others are the preset's).
MODEL_OVERRIDES = ("num_layers", "model_dim", "num_heads", "vocab_size", "attention",
                   "compute_dtype", "fp8_head")


def field_name(field: str) -> str:
  """The default ``name`` of a field in messages: the field itself."""
  return field


@dataclasses.dataclass
class TrainConfig:
  """One training run.

  Attributes:
    preset: model preset (``tiny``, ``small``, ``medium``).
    model: overrides of :class:`gpt.GPTConfig` fields (e.g. ``{"num_layers": 1}``).
    data: data spec of :func:`data.load_dataset`.
    optimizer: registry name (:data:`optimizers.OPTIMIZERS`).
    lr: peak learning rate of the main branch; ``None`` = the registry's tiny default.
    adam_lr: peak learning rate of the AdamW branch of hybrid optimizers.
    weight_decay: decoupled weight decay of the main branch.
    opt_args: further optimizer keyword arguments.
    steps: training steps.
    batch_size: sequences per step.
    seq_len: tokens per sequence; ``None`` = the preset's.
    warmup_steps: linear warm-up from 0; a float in (0, 1) is a fraction of ``steps``,
      anything else a whole number of steps.
    schedule: decay after warm-up: ``cosine``, ``linear`` (both to
      ``final_lr_frac·peak``) or ``constant``.
    final_lr_frac: end of the decay as a fraction of the peak.
    seed: model init and batch order.
    eval_every: validation every this many steps (and at the end); 0 = only at the end.
    eval_batches: validation batches (fixed windows) per evaluation.
    log_every: interval of train-loss reads and progress updates (the only times the
      host waits for the device, besides evaluation and checkpoints).
    checkpoint_every: orbax checkpoint interval (needs ``out_dir``); 0 = none.
    keep_checkpoints: how many of the newest checkpoints are kept.
    async_checkpoints: write checkpoints in the background (the device-to-host copy
      still happens before training goes on).
    out_dir: where results.json / loss.png / results.md / checkpoints go.
    resume: continue from the newest checkpoint in ``out_dir`` (there must be one, of
      the same configuration).
    stop_after: stop (after checkpointing) at this step, as if interrupted (tests).
    mesh_data, mesh_fsdp: a ``(data, fsdp)`` device mesh (:mod:`ortho_optax.models.mesh`)
      when either is set (the other fills the devices; ``mesh_fsdp=1`` alone = every
      device on ``data``); ``None`` for both = single device, no mesh.
    ortho_sharding: orthogonalization strategy on a mesh (``gather_whole`` | ``auto``,
      :func:`ortho_optax.distributed.distribute`).
  """

  preset: str = "tiny"
  model: dict = dataclasses.field(default_factory=dict)
  data: str = "embedded"
  optimizer: str = "adamw"
  lr: float | None = None
  adam_lr: float = opt_lib.TINY_ADAM_LR
  weight_decay: float = 0.0
  opt_args: dict = dataclasses.field(default_factory=dict)
  steps: int = 300
  batch_size: int = 32
  seq_len: int | None = None
  warmup_steps: float = 0.05
  schedule: str = "cosine"
  final_lr_frac: float = 0.0
  seed: int = 0
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  async_checkpoints: bool = False
  out_dir: str | None = None
  resume: bool = False
  stop_after: int | None = None
  mesh_data: int | None = None
  mesh_fsdp: int | None = None
  ortho_sharding: str = "gather_whole"

  def validate(self, name: Callable[[str], str] = field_name) -> None:
    """Checks every setting; the data and the output folder are checked by the trainer.

    Args:
      name: how a field is named in messages (the command line passes its flags).

    Raises:
      ValueError: naming the first bad value and what is allowed.
    """
    validation.check_choice(name("preset"), self.preset, sorted(gpt.PRESETS))
    validation.check_choice(name("optimizer"), self.optimizer, opt_lib.OPTIMIZERS)
    for field, minimum in (("steps", 1), ("batch_size", 1), ("seed", 0), ("eval_every", 0),
                           ("eval_batches", 1), ("log_every", 1), ("checkpoint_every", 0),
                           ("keep_checkpoints", 1)):
      validation.check_int(name(field), getattr(self, field), minimum)
    for field in ("seq_len", "stop_after"):
      if getattr(self, field) is not None:
        validation.check_int(name(field), getattr(self, field), 1)
    if self.stop_after is not None and self.stop_after > self.steps:
      raise ValueError(f"{name('stop_after')}={self.stop_after} is past the run's last step "
                       f"({name('steps')}={self.steps}): it would never stop the run early.")
    # Learning rates are finite and > 0; weight decay and warm-up finite and >= 0.
    lrs = ("adam_lr",) if self.lr is None else ("lr", "adam_lr")
    for field in lrs:
      validation.check_range(name(field), getattr(self, field), 0.0, low_open=True)
    for field in ("weight_decay", "warmup_steps"):
      validation.check_range(name(field), getattr(self, field), 0.0)
    w = self.warmup_steps
    if w >= 1 and w != int(w):
      raise ValueError(f"{name('warmup_steps')}={w!r}: a warm-up of one step or more is a "
                       "whole number of steps (a value in (0, 1) is a fraction of the steps).")
    if warmup_steps_of(self) > self.steps:
      raise ValueError(f"{name('warmup_steps')}={w!r} is longer than "
                       f"{name('steps')}={self.steps}.")
    validation.check_choice(name("schedule"), self.schedule, SCHEDULES)
    validation.check_range(name("final_lr_frac"), self.final_lr_frac, 0.0, 1.0)
    validation.check_choice(name("ortho_sharding"), self.ortho_sharding, distributed.STRATEGIES)
    bad = sorted(set(self.model) - set(MODEL_OVERRIDES))
    if bad:
      raise ValueError(f"{name('model')}: unknown field(s) {bad}; valid: "
                       f"{list(MODEL_OVERRIDES)}.")
    fields = dataclasses.asdict(gpt.PRESETS[self.preset]) | self._model_overrides()
    gpt.check_fields(fields, name)
    self._validate_backend(fields, name)
    self._validate_mesh(name)
    if self.out_dir is not None and not str(self.out_dir).strip():
      raise ValueError(f"{name('out_dir')} is empty; give a folder (or leave it out for "
                       "runs/<command>-<date-time>).")
    if (self.resume or self.checkpoint_every) and not self.out_dir:
      raise ValueError(f"{name('resume')} and {name('checkpoint_every')} need "
                       f"{name('out_dir')} (the folder that holds the checkpoints).")
    try:
      make_optimizer(self)
    except (TypeError, ValueError) as e:
      if not self.opt_args:
        raise
      args = " ".join(f"{k}={v}" for k, v in self.opt_args.items())
      raise ValueError(f"{name('opt_args')} {args}: {e}") from None

  @staticmethod
  def _validate_backend(fields, name) -> None:
    """Settings this JAX backend cannot run fail here, not in the compiler."""
    backend = jax.default_backend()
    if fields.get("attention") == "cudnn" and backend != "gpu":
      raise ValueError(f"{name('attention')} cudnn needs an NVIDIA GPU (cuDNN), and this "
                       f"JAX backend is {backend}: use auto or xla.")
    if fields.get("compute_dtype") == "float16" and backend == "cpu":
      raise ValueError(f"{name('compute_dtype')} float16: XLA's CPU backend cannot run the "
                       "model's float16 matrix products (float16 inputs, float32 "
                       "accumulation); use bfloat16 or float32 on the CPU.")

  def _validate_mesh(self, name) -> None:
    if self.mesh_data is None and self.mesh_fsdp is None:
      if self.ortho_sharding != "gather_whole":
        raise ValueError(f"{name('ortho_sharding')} {self.ortho_sharding} lays out "
                         f"orthogonalization on a device mesh, and this run has none: add "
                         f"{name('mesh_data')} and/or {name('mesh_fsdp')}.")
      return
    for field in ("mesh_data", "mesh_fsdp"):
      if getattr(self, field) is not None:
        validation.check_int(name(field), getattr(self, field), 1)
    n = jax.device_count()
    try:
      data, fsdp = mesh_lib.mesh_shape(self.mesh_data, self.mesh_fsdp, n)
    except ValueError:
      given = " and ".join(f"{name(f)} {getattr(self, f)}" for f in ("mesh_data", "mesh_fsdp")
                           if getattr(self, f) is not None)
      raise ValueError(f"{given}: the mesh must use all {n} device(s) "
                       f"(data x fsdp = {n}).") from None
    if self.batch_size % (data * fsdp):
      raise ValueError(
          f"{name('batch_size')}={self.batch_size} must be divisible by the "
          f"{data * fsdp} devices the batch is split over ({name('mesh_data')} {data} x "
          f"{name('mesh_fsdp')} {fsdp}).")

  def check_dataset(self, dataset, name: Callable[[str], str] = field_name) -> None:
    """Raises ``ValueError`` when ``dataset`` cannot feed this run (vocabulary, lengths)."""
    mcfg = self.model_config()
    if dataset.vocab_size > mcfg.vocab_size:
      raise ValueError(f"{name('data')} {dataset.name}: its vocabulary of "
                       f"{dataset.vocab_size} tokens exceeds the model's {mcfg.vocab_size}; "
                       f"choose a preset or {name('vocab_size')} that fits.")
    for part, tokens in (("training", dataset.train), ("validation", dataset.val)):
      if tokens.size < mcfg.seq_len + 1:
        raise ValueError(f"{name('data')} {dataset.name}: the {part} split has "
                         f"{tokens.size} tokens, too few for {name('seq_len')} "
                         f"{mcfg.seq_len} (needs {mcfg.seq_len + 1}).")

  def model_config(self) -> gpt.GPTConfig:
    return gpt.get_config(self.preset, **self._model_overrides())

  def _model_overrides(self) -> dict:
    overrides = {k: v for k, v in self.model.items() if v is not None}
    if self.seq_len is not None:
      overrides["seq_len"] = self.seq_len
    return overrides

  def peak_lr(self) -> float:
    return opt_lib.default_lr(self.optimizer) if self.lr is None else self.lr


def warmup_steps_of(cfg: TrainConfig) -> int:
  """The warm-up of ``cfg`` in steps (a fraction in (0, 1) is of ``cfg.steps``)."""
  w = cfg.warmup_steps
  return int(round(w * cfg.steps)) if 0 < w < 1 else int(w)


def lr_multiplier(steps: int, warmup: int, kind: str = "cosine", final_frac: float = 0.0):
  """Schedule ``step -> multiplier`` in [0, 1]: linear warm-up then decay.

  Warm-up goes linearly from ``1/warmup`` at step 0 to 1 at ``warmup`` (so the first
  step already moves); the decay reaches ``final_frac`` at ``steps``.
  """
  validation.check_choice("schedule", kind, SCHEDULES)
  decay_steps = max(steps - warmup, 1)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum((step + 1.0) / max(warmup, 1), 1.0) if warmup > 0 else 1.0
    frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == "cosine":
      decay = final_frac + (1 - final_frac) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    elif kind == "linear":
      decay = 1.0 - (1 - final_frac) * frac
    else:
      decay = 1.0
    return warm * decay

  return fn


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """The run's optimizer: the registry's, with both peaks on the warm-up + decay schedule."""
  mult = lr_multiplier(cfg.steps, warmup_steps_of(cfg), cfg.schedule, cfg.final_lr_frac)
  peak, adam_peak = cfg.peak_lr(), cfg.adam_lr
  return opt_lib.build(
      cfg.optimizer, lambda s: peak * mult(s),
      adam_learning_rate=lambda s: adam_peak * mult(s),
      weight_decay=cfg.weight_decay, **cfg.opt_args)


#: Settings that may change when a run is resumed: where and how often it reports, and
#: how it is laid out on the devices (orbax restores onto any mesh).
RESUMABLE_CHANGES = ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
                     "async_checkpoints", "out_dir", "resume", "stop_after", "mesh_data",
                     "mesh_fsdp", "ortho_sharding")


def run_record(cfg: TrainConfig, dataset) -> dict:
  """What defines the run's trajectory: every setting but :data:`RESUMABLE_CHANGES`, with
  the resolved model, learning rate and warm-up, and the data's hash.

  A checkpoint stores it; resuming compares it field by field (:func:`differences`).
  """
  record = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
  record.pop("model")
  record.pop("seq_len")
  record["lr"] = cfg.peak_lr()
  record["warmup_steps"] = warmup_steps_of(cfg)
  record["model_config"] = dataclasses.asdict(cfg.model_config())
  record["data_sha256"] = dataset.sha256
  return record


def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
  """``(field, saved value, current value)`` for every field of two :func:`run_record`\\ s
  that differs; model fields are reported by their own name (``model_dim``)."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if key == "model_config" and isinstance(a, dict) and isinstance(b, dict):
      out += [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      out.append((key, a, b))
  return out
