"""Token data for the GPT: an embedded corpus, the standard library, text, FineWeb shards, HF.

Every source ends as two 1-D integer token arrays (train, validation) plus a sha256 of
the tokens that :func:`load_dataset` records, and :class:`BatchSampler` draws
``(inputs, targets)`` windows from one of them deterministically from ``(seed, step)``:
the batch of step ``s`` does not depend on the steps before it, so a resumed run sees
exactly the batches of an uninterrupted one.

Sources (the ``spec`` string of :func:`load_dataset`):
  ``"embedded"`` (default): needs no download. The English prose of Python's
    ``pydoc_data.topics`` plus a deterministic size-capped subset of the standard
    library's ``.py`` sources, byte-level (vocab 256). Each of the two parts is split
    90/10 (its last 10% is validation), so validation has both prose and code.
  ``"embedded:prose"`` / ``"embedded:code"``: one part only (``prose`` is the corpus of
    the tiny-model validation in ``benchmarks/README.md``).
  ``"stdlib[:lib|:full]"``: needs no download either, and is four times the embedded
    corpus (8.4 MB on CPython 3.11 and 3.12; ``full`` adds the test suite where it is
    installed, 30 MB): the running Python's standard-library sources, byte-level, split
    into training and validation by file (:mod:`ortho_optax.models.corpus`).
  ``"text:<path or glob>[,<path or glob>...]"``: text files, byte-level, files sorted
    by path, concatenated, last 10% validation.
  ``"shards:<train glob>[;<val glob>]"``: modded-nanogpt / FineWeb token shards (256
    int32 header: magic 20240520, version 1, token count; then uint16 GPT-2 tokens), read
    with ``np.memmap``. Without a validation glob the last 10% of the tokens is held out.
  ``"hf:<dataset>[:<config>][@<split>]"``: Hugging Face ``datasets`` streaming (the
    ``hf`` extra), byte-level over the ``text`` field, capped at ``hf_max_bytes``.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import os
import pathlib
import queue
import sysconfig
import threading
from typing import Callable, Iterable

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
#: Standard-library sources in the embedded corpus are capped at this many bytes.
EMBEDDED_CODE_BYTES = 1_500_000
VAL_FRACTION = 0.1


@dataclasses.dataclass
class Dataset:
  """Train and validation tokens of one source.

  Attributes:
    name: the spec it came from.
    train: 1-D integer tokens (may be a read-only memmap).
    val: 1-D integer tokens.
    vocab_size: the tokenizer's vocabulary (256 for bytes, 50257 for GPT-2).
    sha256: hash of the train then validation tokens (uint16/uint8 bytes as stored).
  """

  name: str
  train: np.ndarray
  val: np.ndarray
  vocab_size: int
  sha256: str

  def describe(self) -> dict:
    return {"name": self.name, "train_tokens": int(self.train.size),
            "val_tokens": int(self.val.size), "vocab_size": self.vocab_size,
            "sha256": self.sha256}


def _sha256(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    # Hash in bounded chunks so huge memmapped shards are not read into memory at once.
    flat = np.asarray(a).reshape(-1)
    step = 1 << 24
    for i in range(0, flat.size, step):
      h.update(np.ascontiguousarray(flat[i:i + step]).tobytes())
  return h.hexdigest()


def _split(tokens: np.ndarray, fraction: float = VAL_FRACTION):
  n_val = int(round(tokens.size * fraction))
  return tokens[:tokens.size - n_val], tokens[tokens.size - n_val:]


def embedded_prose() -> bytes:
  """The English text of ``pydoc_data.topics`` (help topics), keys in sorted order."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return "".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def embedded_code(max_bytes: int = EMBEDDED_CODE_BYTES) -> bytes:
  """Top-level standard-library ``.py`` files, sorted by name, until ``max_bytes``.

  Only whole files are taken (the first file that would pass the cap is cut), so the
  subset is deterministic for a given Python version.
  """
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
  if not files:
    raise FileNotFoundError(f"no standard-library .py sources found under {stdlib}.")
  out, total = [], 0
  for p in files:
    data = p.read_bytes()
    take = data[:max_bytes - total]
    out.append(take)
    total += len(take)
    if total >= max_bytes:
      break
  return b"".join(out)


def _bytes_to_tokens(data: bytes) -> np.ndarray:
  return np.frombuffer(data, dtype=np.uint8).copy()


def load_embedded(part: str = "all") -> Dataset:
  """The built-in byte-level corpus; ``part`` in ``"all"``, ``"prose"``, ``"code"``."""
  parts = {"prose": [embedded_prose], "code": [embedded_code],
           "all": [embedded_prose, embedded_code]}
  if part not in parts:
    raise ValueError(f"unknown embedded corpus part {part!r}; valid: {sorted(parts)}.")
  trains, vals = [], []
  for fn in parts[part]:
    tr, va = _split(_bytes_to_tokens(fn()))
    trains.append(tr)
    vals.append(va)
  train, val = np.concatenate(trains), np.concatenate(vals)
  name = "embedded" if part == "all" else f"embedded:{part}"
  return Dataset(name, train, val, 256, _sha256(train, val))


def load_stdlib(part: str = "lib") -> Dataset:
  """The standard-library corpus of :func:`corpus.build_stdlib` as byte-level tokens."""
  from ortho_optax.models import corpus  # pylint: disable=import-outside-toplevel
  source = corpus.build_stdlib(part)
  train, val = _bytes_to_tokens(source.train), _bytes_to_tokens(source.val)
  name = "stdlib" if part == "lib" else f"stdlib:{part}"
  return Dataset(name, train, val, 256, _sha256(train, val))


def _expand(patterns: str | list[str]) -> list[pathlib.Path]:
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p]
  files = []
  for pat in patterns:
    hits = sorted(globlib.glob(os.path.expanduser(pat)))
    if not hits:
      raise FileNotFoundError(f"no file matches {pat!r}.")
    paths = [pathlib.Path(h) for h in hits]
    if all(p.is_dir() for p in paths):
      raise ValueError(f"{pat!r} is a folder, not files: name the files or a glob, e.g. "
                       f"{os.path.join(pat, '*.txt')!r}.")
    files.extend(p for p in paths if not p.is_dir())
  return sorted(set(files))


def load_text(patterns: str | list[str]) -> Dataset:
  """Byte-level tokens of text files (sorted by path), last 10% validation."""
  files = _expand(patterns)
  data = b"".join(p.read_bytes() for p in files)
  if not data:
    raise ValueError(f"the text files {[str(f) for f in files]} are empty.")
  train, val = _split(_bytes_to_tokens(data))
  return Dataset(f"text:{patterns}", train, val, 256, _sha256(train, val))


def read_shard(path: str | os.PathLike) -> np.ndarray:
  """Memory-maps one modded-nanogpt / FineWeb token shard and checks its header.

  Raises:
    ValueError: naming the file, when the file is shorter than its header, the magic is
      not 20240520, the version is not 1, or the token count disagrees with the size.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  header_bytes = SHARD_HEADER_INTS * 4
  if size < header_bytes:
    raise ValueError(f"shard {path}: {size} bytes is shorter than the {header_bytes}-byte "
                     "header (truncated file?).")
  header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
  if header[0] != SHARD_MAGIC:
    raise ValueError(f"shard {path}: bad magic {int(header[0])}, expected {SHARD_MAGIC} "
                     "(not a modded-nanogpt token shard).")
  if header[1] != SHARD_VERSION:
    raise ValueError(f"shard {path}: unsupported version {int(header[1])}, expected "
                     f"{SHARD_VERSION}.")
  n = int(header[2])
  expected = header_bytes + 2 * n
  if n < 0 or size != expected:
    raise ValueError(f"shard {path}: header says {n} tokens ({expected} bytes) but the "
                     f"file has {size} bytes (truncated or corrupt).")
  return np.memmap(path, dtype="<u2", mode="r", offset=header_bytes, shape=(n,))


def write_shard(path: str | os.PathLike, tokens) -> None:
  """Writes ``tokens`` (< 65536) as a shard in the same format (tests, small corpora)."""
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
    raise ValueError("shard tokens must lie in [0, 65536).")
  header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
  header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
  with open(path, "wb") as f:
    f.write(header.tobytes())
    f.write(tokens.astype("<u2").tobytes())


def _concat_shards(files: list[pathlib.Path]) -> np.ndarray:
  shards = [read_shard(f) for f in files]
  return shards[0] if len(shards) == 1 else np.concatenate(shards)


def load_shards(train_glob: str, val_glob: str | None = None) -> Dataset:
  """GPT-2-token shards; without ``val_glob`` the last 10% of the train tokens."""
  train = _concat_shards(_expand(train_glob))
  if val_glob:
    val = _concat_shards(_expand(val_glob))
  else:
    train, val = _split(train)
  name = f"shards:{train_glob}" + (f";{val_glob}" if val_glob else "")
  # 50257 GPT-2 tokens (the model pads its vocabulary to 50304).
  return Dataset(name, train, val, 50257, _sha256(train, val))


def load_hf(spec: str, max_bytes: int = 20_000_000, text_field: str = "text") -> Dataset:
  """Streams a Hugging Face dataset's ``text_field``, byte-level, up to ``max_bytes``.

  ``spec`` is ``"<dataset>[:<config>][@<split>]"`` (split defaults to ``train``).
  """
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Hugging Face streaming needs the `datasets` package: "
                      "pip install 'ortho-optax[hf]'.") from e
  split = "train"
  if "@" in spec:
    spec, split = spec.rsplit("@", 1)
  name, _, config = spec.partition(":")
  stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
  chunks, total = [], 0
  for row in stream:
    b = str(row[text_field]).encode("utf-8")
    chunks.append(b)
    total += len(b)
    if total >= max_bytes:
      break
  data = b"".join(chunks)[:max_bytes]
  if not data:
    raise ValueError(f"Hugging Face dataset {spec!r} gave no text in field {text_field!r}.")
  train, val = _split(_bytes_to_tokens(data))
  return Dataset(f"hf:{spec}@{split}", train, val, 256, _sha256(train, val))


def load_dataset(spec: str = "embedded", *, hf_max_bytes: int = 20_000_000) -> Dataset:
  """Loads a corpus from a spec string (see the module docstring)."""
  kind, _, rest = spec.partition(":")
  if kind == "embedded":
    return load_embedded(rest or "all")
  if kind == "stdlib":
    return load_stdlib(rest or "lib")
  if kind == "text":
    return load_text(rest)
  if kind == "shards":
    train_glob, _, val_glob = rest.partition(";")
    return load_shards(train_glob, val_glob or None)
  if kind == "hf":
    return load_hf(rest, max_bytes=hf_max_bytes)
  # A bare path or glob is text.
  if any(ch in spec for ch in "*?/.") or os.path.exists(spec):
    return load_text(spec)
  raise ValueError(f"unknown data spec {spec!r}; valid: 'embedded[:prose|:code]', "
                   "'stdlib[:lib|:full]', 'text:<glob>', 'shards:<train glob>[;<val glob>]', "
                   "'hf:<name>'.")


class Windows:
  """Token windows ``tokens[starts[i] + offset + j]`` (row ``i``, column ``j < seq_len``),
  gathered only when indexed: a batch of inputs (``offset=0``) or targets (``offset=1``).

  It has the ``shape``, ``ndim`` and ``dtype`` (int32) of the batch, so
  :func:`ortho_optax.models.mesh.put_batch` can place it with
  ``jax.make_array_from_callback``: each process then reads from the corpus only the
  rows its own devices hold (its slice of the global batch), never the rows of another
  process. ``np.asarray(windows)`` gathers every row; both give the same values.

  Args:
    tokens: the 1-D corpus (may be a memmap: only the indexed tokens are read).
    starts: 1-D start offset of each row.
    seq_len: columns.
    offset: added to every start (1 for the targets of the inputs at offset 0).
  """

  dtype = np.dtype(np.int32)
  ndim = 2

  def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, offset: int = 0):
    self.tokens, self.starts, self.seq_len, self.offset = tokens, starts, seq_len, offset

  @property
  def shape(self) -> tuple[int, int]:
    return (self.starts.size, self.seq_len)

  def __len__(self) -> int:
    return self.starts.size

  def __getitem__(self, index) -> np.ndarray:
    """The windows of ``index``: ``(rows, columns)`` (``make_array_from_callback``'s
    slices, or any numpy index of each), or ``rows``."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > 2:
      raise IndexError(f"too many indices for Windows of shape {self.shape}: {index}")
    rows, cols = index + (slice(None),) * (2 - len(index))
    positions = np.add.outer(self.starts[rows] + self.offset, np.arange(self.seq_len)[cols])
    return np.asarray(self.tokens[positions], dtype=self.dtype)

  def __array__(self, dtype=None, copy=None):  # pylint: disable=unused-argument
    window = self[:, :]
    return window if dtype is None else window.astype(dtype)


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Windows, Windows]:
  """``(inputs, targets)`` of the windows of ``seq_len + 1`` tokens at ``starts``, lazy."""
  starts = np.asarray(starts, dtype=np.int64)
  return Windows(tokens, starts, seq_len, 0), Windows(tokens, starts, seq_len, 1)


class BatchSampler:
  """Random ``(inputs, targets)`` windows of ``seq_len`` tokens, deterministic per step.

  Batch ``step`` is drawn from ``np.random.default_rng((seed, step))``, so any step can
  be regenerated on its own (resume) and two samplers with the same seed agree. Only the
  start offsets are drawn (:meth:`starts`); :meth:`lazy` gives the batch as
  :class:`Windows` that read the corpus only where indexed (each process of a
  multi-process job its own rows), ``sampler(step)`` the same batch as arrays.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
    if batch_size < 1 or seq_len < 1:
      raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1.")
    if tokens.ndim != 1:
      raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}.")
    if tokens.size < seq_len + 1:
      raise ValueError(f"corpus of {tokens.size} tokens is too short for seq_len={seq_len} "
                       f"(needs at least {seq_len + 1}).")
    self.tokens = tokens
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed

  def starts(self, step: int) -> np.ndarray:
    """The start offset of every window of batch ``step`` (``batch_size`` ints)."""
    rng = np.random.default_rng((self.seed, step))
    return rng.integers(0, self.tokens.size - self.seq_len, size=self.batch_size)

  def lazy(self, step: int) -> tuple[Windows, Windows]:
    """Batch ``step`` as ``(inputs, targets)`` :class:`Windows` (nothing read yet)."""
    return windows(self.tokens, self.starts(step), self.seq_len)

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.asarray(w) for w in self.lazy(step))


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
  """The batches of :func:`eval_batches` as lazy ``(inputs, targets)`` :class:`Windows`."""
  n_seq = (tokens.size - 1) // seq_len
  if n_seq < 1:
    raise ValueError(f"validation set of {tokens.size} tokens is too short for "
                     f"seq_len={seq_len} (needs at least {seq_len + 1}).")
  n_seq = min(n_seq, batch_size * max_batches)
  if n_seq >= batch_size:
    # Whole batches only: one compiled evaluation shape.
    n_seq -= n_seq % batch_size
  for b in range(0, n_seq, batch_size):
    yield windows(tokens, np.arange(b, min(b + batch_size, n_seq)) * seq_len, seq_len)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
  """Fixed, non-overlapping validation windows from the start of ``tokens``.

  Yields at most ``max_batches`` full batches of ``batch_size`` sequences (one smaller
  batch only when the set holds fewer than ``batch_size`` windows); always the same
  windows, so validation losses are comparable.
  """
  for x, y in eval_windows(tokens, batch_size, seq_len, max_batches):
    yield np.asarray(x), np.asarray(y)


class Prefetcher:
  """The batches of ``steps``, placed on the device ahead of use by a background thread.

  ``put(sampler(step))`` runs in the thread, at most ``depth`` steps ahead of the
  consumer, so sampling and the host-to-device copies overlap the device's work instead
  of sitting between two steps. The batches are those of ``sampler`` in step order
  (a :class:`BatchSampler` is a pure function of the step, so a resumed run sees the same
  ones). Use as an iterator; :meth:`close` (or a ``with`` block) stops the thread early.

  Args:
    sampler: ``step -> (inputs, targets)`` host arrays.
    steps: the steps, in order.
    put: ``(inputs, targets) -> device arrays`` (``jax.device_put`` or a sharded put).
    depth: batches held ahead.
  """

  _DONE = object()

  def __init__(self, sampler: Callable, steps: Iterable[int], put: Callable,
               depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()

    def work():
      try:
        for step in steps:
          if self._stop.is_set():
            return
          item = put(*sampler(step))
          while not self._offer(item):
            if self._stop.is_set():
              return
        self._offer(self._DONE, block=True)
      except BaseException as e:  # pylint: disable=broad-except
        self._offer(e, block=True)  # raised in the consumer

    self._thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    self._thread.start()

  def _offer(self, item, block: bool = False) -> bool:
    while True:
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        if self._stop.is_set() or not block:
          return False

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is self._DONE:
      self._queue.put(item)  # later calls stop too
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.1)
      except queue.Empty:
        pass
    self._thread.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
