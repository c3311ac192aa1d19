"""Data sources of the GPT trainer: embedded corpus, text, shards, errors, sampler."""

import builtins

import numpy as np
import pytest

from ortho_optax.models import data


def test_embedded_corpus_is_deterministic_and_split():
  a = data.load_embedded("all")
  b = data.load_embedded("all")
  assert a.sha256 == b.sha256 and len(a.sha256) == 64
  assert a.vocab_size == 256 and a.train.dtype == np.uint8
  prose = data.load_embedded("prose")
  code = data.load_embedded("code")
  assert a.train.size == prose.train.size + code.train.size
  assert a.val.size == prose.val.size + code.val.size
  # Last 10% of each part is validation.
  raw = np.frombuffer(data.embedded_prose(), np.uint8)
  np.testing.assert_array_equal(prose.val, raw[-prose.val.size:])
  assert abs(prose.val.size / raw.size - 0.1) < 1e-3
  assert code.train.size + code.val.size <= data.EMBEDDED_CODE_BYTES
  assert b"def " in code.train.tobytes()
  with pytest.raises(ValueError, match="unknown embedded corpus part"):
    data.load_embedded("poetry")


def test_text_files_and_globs(tmp_path):
  (tmp_path / "b.txt").write_bytes(b"world " * 100)
  (tmp_path / "a.txt").write_bytes(b"hello " * 100)
  ds = data.load_dataset(f"text:{tmp_path}/*.txt")
  full = np.concatenate([ds.train, ds.val]).tobytes()
  assert full == b"hello " * 100 + b"world " * 100  # sorted by path
  assert ds.val.size == 120
  ds2 = data.load_dataset(str(tmp_path / "a.txt"))
  assert ds2.train.size == 540


def test_text_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no file matches"):
    data.load_dataset(f"text:{tmp_path}/*.nothing")
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    data.load_dataset(f"text:{tmp_path}/empty.txt")
  with pytest.raises(ValueError, match="unknown data spec"):
    data.load_dataset("bogus")


def test_shards_roundtrip_and_val_glob(tmp_path):
  tokens = np.arange(1000) * 37 % 50257
  data.write_shard(tmp_path / "fw_train_000001.bin", tokens[:600])
  data.write_shard(tmp_path / "fw_train_000002.bin", tokens[600:])
  data.write_shard(tmp_path / "fw_val_000000.bin", tokens[:100])
  shard = data.read_shard(tmp_path / "fw_train_000001.bin")
  assert isinstance(shard, np.memmap) and shard.dtype == np.uint16
  np.testing.assert_array_equal(shard, tokens[:600])
  ds = data.load_dataset(f"shards:{tmp_path}/fw_train_*.bin;{tmp_path}/fw_val_*.bin")
  np.testing.assert_array_equal(ds.train, tokens)
  np.testing.assert_array_equal(ds.val, tokens[:100])
  assert ds.vocab_size == 50257
  ds2 = data.load_dataset(f"shards:{tmp_path}/fw_train_*.bin")
  assert ds2.train.size == 900 and ds2.val.size == 100
  assert ds.sha256 != ds2.sha256


def _header(magic=data.SHARD_MAGIC, version=1, n=10):
  h = np.zeros(256, "<i4")
  h[:3] = magic, version, n
  return h.tobytes()


@pytest.mark.parametrize("content, message", [
    (b"\x00" * 100, "shorter than the 1024-byte header"),
    (_header(magic=1234) + b"\x00" * 20, "bad magic 1234"),
    (_header(version=7) + b"\x00" * 20, "unsupported version 7"),
    (_header(n=10) + b"\x00" * 18, "header says 10 tokens"),
    (_header(n=10) + b"\x00" * 22, "header says 10 tokens"),
])
def test_corrupt_shards_name_file_and_problem(tmp_path, content, message):
  path = tmp_path / "bad_shard.bin"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message) as info:
    data.read_shard(path)
  assert "bad_shard.bin" in str(info.value)
  with pytest.raises(ValueError, match="bad_shard.bin"):
    data.load_dataset(f"shards:{path}")


def test_empty_shard_glob(tmp_path):
  with pytest.raises(FileNotFoundError, match="no file matches"):
    data.load_dataset(f"shards:{tmp_path}/*.bin")


def test_hf_without_datasets_gives_clear_error(monkeypatch):
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "datasets":
      raise ImportError("no datasets")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  with pytest.raises(ImportError, match=r"ortho-optax\[hf\]"):
    data.load_dataset("hf:roneneldan/TinyStories")


def test_sampler_is_deterministic_per_step_and_shifted():
  tokens = np.arange(5000) % 251
  s1 = data.BatchSampler(tokens, 4, 16, seed=3)
  s2 = data.BatchSampler(tokens, 4, 16, seed=3)
  x5, y5 = s1(5)
  s1(0)
  x5b, _ = s2(5)
  np.testing.assert_array_equal(x5, x5b)  # independent of the steps drawn before
  np.testing.assert_array_equal(x5[:, 1:], y5[:, :-1])
  assert x5.shape == (4, 16) and x5.dtype == np.int32
  assert not np.array_equal(s1(6)[0], x5)
  assert not np.array_equal(data.BatchSampler(tokens, 4, 16, seed=4)(5)[0], x5)


def test_too_short_corpora():
  with pytest.raises(ValueError, match="too short for seq_len=16"):
    data.BatchSampler(np.arange(10), 2, 16)
  with pytest.raises(ValueError, match="validation set of 10 tokens is too short"):
    next(data.eval_batches(np.arange(10), 2, 16, 4))
  batches = list(data.eval_batches(np.arange(1000), 4, 16, 100))
  assert all(x.shape == (4, 16) for x, _ in batches) and len(batches) == 15


def test_a_text_folder_is_named_in_the_error(tmp_path):
  (tmp_path / "a.txt").write_text("hello")
  with pytest.raises(ValueError, match="is a folder, not files.*a.txt|is a folder, not files"):
    data.load_dataset(f"text:{tmp_path}")
  assert data.load_dataset(f"text:{tmp_path}/*.txt").train.size > 0


def test_prefetcher_yields_the_sampler_batches_in_order_and_stops_early():
  sampler = data.BatchSampler(np.arange(1000) % 251, 2, 8, seed=3)
  put = lambda x, y: (x + 0, y + 0)  # any "device" placement
  got = list(data.Prefetcher(sampler, range(5, 12), put, depth=2))
  assert len(got) == 7
  for step, (x, y) in zip(range(5, 12), got):
    ex, ey = sampler(step)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
  with data.Prefetcher(sampler, range(10**9), put) as early:  # closed after two batches
    next(early), next(early)
  assert not early._thread.is_alive()  # pylint: disable=protected-access


def test_prefetcher_raises_the_sampler_error_in_the_consumer():
  def bad(step):
    if step == 2:
      raise ValueError("step 2 is broken")
    return np.zeros(1), np.zeros(1)
  batches = data.Prefetcher(bad, range(5), lambda x, y: (x, y))
  next(batches), next(batches)
  with pytest.raises(ValueError, match="step 2 is broken"):
    next(batches)
  batches.close()


class _CountingTokens(np.ndarray):
  """A corpus that remembers which positions were read."""

  def __getitem__(self, index):
    self.read.update(np.asarray(index).ravel().tolist())
    return np.asarray(self).__getitem__(index)


def test_lazy_windows_read_only_the_rows_asked_for_and_equal_the_batch():
  corpus = (np.arange(5000) % 251).view(_CountingTokens)
  corpus.read = set()
  sampler = data.BatchSampler(corpus, 8, 16, seed=3)
  inputs, targets = sampler.lazy(5)
  assert corpus.read == set() and inputs.shape == (8, 16) and inputs.dtype == np.int32
  x, y = sampler(5)
  starts = sampler.starts(5)
  corpus.read.clear()
  np.testing.assert_array_equal(inputs[2:4], x[2:4])
  np.testing.assert_array_equal(targets[(slice(6, 8), slice(3, 9))], y[6:8, 3:9])
  wanted = {int(s) + j for s in starts[2:4] for j in range(16)}
  wanted |= {int(s) + 1 + j for s in starts[6:8] for j in range(3, 9)}
  assert corpus.read == wanted
  np.testing.assert_array_equal(np.asarray(inputs), x)
  np.testing.assert_array_equal(np.asarray(targets), y)
  for (lx, ly), (ex, ey) in zip(data.eval_windows(corpus, 4, 16, 3),
                                data.eval_batches(corpus, 4, 16, 3)):
    np.testing.assert_array_equal(np.asarray(lx), ex)
    np.testing.assert_array_equal(np.asarray(ly), ey)


def test_put_batch_of_lazy_windows_equals_the_host_batch():
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  mesh = mesh_lib.make_mesh(4, 2)
  sampler = data.BatchSampler(np.arange(5000) % 251, 8, 16, seed=1)
  lazy, host = mesh_lib.put_batch(mesh, *sampler.lazy(2)), mesh_lib.put_batch(mesh, *sampler(2))
  for a, b in zip(lazy, host):
    assert a.sharding == b.sharding and a.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  short = mesh_lib.put_batch(mesh, *next(data.eval_windows(np.arange(40), 8, 16, 1)))
  assert short[0].shape == (2, 16) and short[0].sharding.spec == P()  # replicated
