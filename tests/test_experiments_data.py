"""experiments.data: ListOps generator, stdlib byte corpus, docstring pairs."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from experiments import tasks
from experiments.data import listops, stdlib

SMALL = listops.ListOpsSpec(num_train=300, num_valid=50, num_test=50,
                            min_length=8, max_length=40, max_depth=4)


def _parse(tokens):
  """Inverse of `listops.to_tokens`: token strings -> tree."""
  def parse(i):
    token = tokens[i]
    if token.isdigit():
      return int(token), i + 1
    children, i = [], i + 1
    while tokens[i] != listops.CLOSE:
      child, i = parse(i)
      children.append(child)
    return (token, children), i + 1
  tree, end = parse(0)
  assert end == len(tokens)
  return tree


def test_listops_is_deterministic_and_seeded():
  first, second = listops.generate(SMALL), listops.generate(SMALL)
  other = listops.generate(listops.ListOpsSpec(**{**SMALL.__dict__, "seed": 1}))
  for split in ("train", "valid", "test"):
    np.testing.assert_array_equal(first[split].tokens, second[split].tokens)
    np.testing.assert_array_equal(first[split].labels, second[split].labels)
  assert not np.array_equal(first["train"].tokens, other["train"].tokens)


def test_listops_labels_lengths_and_disjoint_splits():
  splits = listops.generate(SMALL)
  seen = set()
  for split, data in splits.items():
    assert data.tokens.shape == (len(data.labels), SMALL.max_length + 1)
    assert (data.tokens[:, 0] == listops.CLS).all()
    np.testing.assert_array_equal(data.mask, data.tokens != listops.PAD)
    for row, label in zip(data.tokens, data.labels):
      tokens = [listops.VOCAB[i] for i in row[1:] if i != listops.PAD]
      assert SMALL.min_length <= len(tokens) <= SMALL.max_length
      assert listops.evaluate(_parse(tokens)) == label
      key = tuple(tokens)
      assert key not in seen, f"duplicate example in {split}"
      seen.add(key)
  assert len(set(splits["train"].labels)) == 10


def test_listops_operators():
  tree = ("[SM", [7, ("[MED", [1, 9, 4, 2]), ("[MAX", [3, 8]), ("[MIN", [5, 6])])
  assert listops.evaluate(tree) == (7 + 3 + 8 + 5) % 10  # median 3
  assert listops.to_tokens(("[MAX", [3, 8])) == ["[MAX", "3", "8", "]"]


def test_listops_spec_rejects_bad_values():
  with pytest.raises(ValueError, match="min_length=50"):
    listops.ListOpsSpec(min_length=50, max_length=40)
  with pytest.raises(ValueError, match="max_args=1"):
    listops.ListOpsSpec(max_args=1)


@functools.lru_cache(maxsize=None)
def _corpus():
  return stdlib.ByteCorpus.load()


def test_stdlib_files_and_split_are_deterministic():
  files = stdlib.source_files()
  assert len(files) > 100 and files == sorted(files)
  assert not any("site-packages" in f.parts or "test" in f.parts[:-1]
                 for f in files)
  splits = [stdlib.split_of(f) for f in files]
  assert splits == [stdlib.split_of(f) for f in files]
  assert {s: splits.count(s) > 0 for s in stdlib.SPLITS} == {
      s: True for s in stdlib.SPLITS}
  with pytest.raises(ValueError, match="valid_percent=90"):
    stdlib.split_of(files[0], valid_percent=90, test_percent=20)


def test_byte_corpus_holds_each_file_in_its_split(rng):
  corpus = _corpus()
  files = stdlib.source_files()
  path = files[rng.integers(len(files))]
  stream = corpus.streams[stdlib.split_of(path)].tobytes()
  assert path.read_bytes() + b"\0" in stream
  assert sum(corpus.files.values()) == len(files)


def test_byte_windows_are_deterministic(seed):
  corpus = _corpus()
  a = corpus.random_windows("train", 65, 8, np.random.default_rng(seed))
  b = corpus.random_windows("train", 65, 8, np.random.default_rng(seed))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (8, 65) and a.dtype == np.int32
  assert 0 <= a.min() and a.max() < 256
  strided = corpus.strided_windows("valid", 33, 5)
  np.testing.assert_array_equal(strided[0], corpus.streams["valid"][:33])
  with pytest.raises(ValueError, match="split='dev'"):
    corpus.random_windows("dev", 8, 1, np.random.default_rng(seed))


# A few packages keep the test fast; their files fall in every split.
PACKAGES = ("asyncio", "email", "json", "importlib", "concurrent", "xml")


@functools.lru_cache(maxsize=None)
def _pairs():
  return stdlib.docstring_pairs(packages=PACKAGES, valid_percent=10,
                                test_percent=30)


def test_docstring_pairs_split_by_module_and_strip_docstrings(rng):
  pairs = _pairs()
  modules = {split: {p.module for p in pairs[split]} for split in pairs}
  assert len(pairs["train"]) > 100 and len(pairs["test"]) > 30
  assert {p.module.split(".")[0] for s in pairs.values() for p in s} == set(
      PACKAGES)
  assert not modules["train"] & modules["test"]
  assert not modules["train"] & modules["valid"]
  for i in rng.choice(len(pairs["test"]), 10, replace=False):
    pair = pairs["test"][i]
    assert pair.docstring not in pair.code
    assert pair.code.lstrip().startswith(("def ", "async def ", "@"))
    assert f"def {pair.name}" in pair.code
  docstrings = [p.docstring for s in pairs.values() for p in s]
  assert len(docstrings) == len(set(docstrings))


def test_docstring_pairs_are_deterministic():
  again = stdlib.docstring_pairs(packages=PACKAGES, valid_percent=10,
                                 test_percent=30)
  assert again == _pairs()


def test_epoch_indices_walk_permutations(seed):
  num, batch = 10, 4
  steps = [tasks.epoch_indices(num, batch, step, seed) for step in range(5)]
  flat = np.concatenate(steps)  # 20 positions = two whole epochs
  assert sorted(flat[:10]) == list(range(10))
  assert sorted(flat[10:]) == list(range(10))
  np.testing.assert_array_equal(steps[3], tasks.epoch_indices(num, batch, 3,
                                                              seed))
  with pytest.raises(ValueError, match="num_examples=0"):
    tasks.epoch_indices(0, batch, 0, seed)
