"""ListOps (Long Range Arena): nested list operations, 10-way classification.

An expression such as `[MAX 4 [MIN 2 9 ] 0 [SM 3 8 ] ]` evaluates to a digit:
MAX / MIN of the arguments, MED their median (rounded down), SM their sum
modulo 10. The generator follows LRA's (`lra_benchmarks/data/listops.py`):
random trees up to `max_depth`, 2..`max_args` arguments per operator, kept
when the token count lies in [`min_length`, `max_length`]. Examples are
unique across the splits; a fixed seed gives the same splits on any machine.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
PAD, CLS = 0, 1
VOCAB = ("<pad>", "<cls>") + tuple(str(d) for d in range(10)) + OPERATORS + (
    CLOSE,)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
NUM_CLASSES = 10


def evaluate(tree) -> int:
  """Value 0..9 of a tree: an int, or `(operator, [children])`."""
  if isinstance(tree, int):
    return tree
  operator, children = tree
  values = [evaluate(child) for child in children]
  if operator == "[MAX":
    return max(values)
  if operator == "[MIN":
    return min(values)
  if operator == "[MED":
    return int(np.median(values))
  return sum(values) % 10


def to_tokens(tree) -> list[str]:
  """Tokens of a tree, e.g. `['[MAX', '4', '2', ']']`."""
  if isinstance(tree, int):
    return [str(tree)]
  operator, children = tree
  tokens = [operator]
  for child in children:
    tokens.extend(to_tokens(child))
  return tokens + [CLOSE]


class _TooLong(Exception):
  """Raised while drawing a tree that has passed its token budget."""


def _random_tree(rng: random.Random, depth: int, max_depth: int,
                 max_args: int, leaf_probability: float, budget: list[int]):
  """A random tree; `budget[0]` counts down tokens and stops oversized draws."""
  budget[0] -= 1
  if budget[0] < 0:
    raise _TooLong
  if depth >= max_depth or (depth > 1 and rng.random() < leaf_probability):
    return int(rng.random() * 10)
  operator = OPERATORS[int(rng.random() * len(OPERATORS))]
  num_args = 2 + int(rng.random() * (max_args - 1))
  budget[0] -= 1  # the closing bracket
  return (operator, [
      _random_tree(rng, depth + 1, max_depth, max_args, leaf_probability,
                   budget)
      for _ in range(num_args)])


@dataclasses.dataclass(frozen=True)
class ListOpsSpec:
  """Generator settings and split sizes."""
  num_train: int = 20_000
  num_valid: int = 2_000
  num_test: int = 2_000
  min_length: int = 16
  max_length: int = 127
  max_depth: int = 6
  max_args: int = 5
  leaf_probability: float = 0.5
  seed: int = 0

  def __post_init__(self):
    for name in ("num_train", "num_valid", "num_test"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0; got {name}={getattr(self, name)}")
    if not 3 <= self.min_length <= self.max_length:
      raise ValueError("need 3 <= min_length <= max_length; got "
                       f"min_length={self.min_length}, "
                       f"max_length={self.max_length}")
    if self.max_depth < 1 or self.max_args < 2:
      raise ValueError("need max_depth >= 1 and max_args >= 2; got "
                       f"max_depth={self.max_depth}, max_args={self.max_args}")
    if not 0.0 <= self.leaf_probability < 1.0:
      raise ValueError("leaf_probability must be in [0, 1); got "
                       f"leaf_probability={self.leaf_probability}")


@dataclasses.dataclass(frozen=True)
class Split:
  """`tokens [num, max_length + 1]` int32 ([CLS] first, then the expression,
  then padding), `mask [num, max_length + 1]` bool, `labels [num]` int32."""
  tokens: np.ndarray
  mask: np.ndarray
  labels: np.ndarray


def generate(spec: ListOpsSpec) -> dict[str, Split]:
  """The "train", "valid" and "test" splits for `spec` (deterministic)."""
  rng = random.Random(spec.seed)  # Mersenne Twister: the same everywhere
  sizes = {"train": spec.num_train, "valid": spec.num_valid,
           "test": spec.num_test}
  total = sum(sizes.values())
  seen = set()
  examples = []
  attempts = 0
  while len(examples) < total:
    attempts += 1
    if attempts > 200 * total + 10_000:
      raise ValueError(
          f"could not draw {total} unique ListOps examples with lengths in "
          f"[{spec.min_length}, {spec.max_length}]; got {len(examples)}; "
          "loosen min_length/max_length/max_depth")
    try:
      tree = _random_tree(rng, 1, spec.max_depth, spec.max_args,
                          spec.leaf_probability, [spec.max_length])
    except _TooLong:
      continue
    tokens = to_tokens(tree)
    if not spec.min_length <= len(tokens) <= spec.max_length:
      continue
    text = " ".join(tokens)
    if text in seen:
      continue
    seen.add(text)
    examples.append((tokens, evaluate(tree)))
  splits = {}
  start = 0
  for name, size in sizes.items():
    chunk = examples[start:start + size]
    start += size
    ids = np.full((size, spec.max_length + 1), PAD, np.int32)
    ids[:, 0] = CLS
    for row, (tokens, _) in enumerate(chunk):
      ids[row, 1:len(tokens) + 1] = [TOKEN_ID[t] for t in tokens]
    labels = np.asarray([label for _, label in chunk], np.int32)
    splits[name] = Split(tokens=ids, mask=ids != PAD, labels=labels)
  return splits
