"""Real text that ships with every Python: the CPython standard library sources.

`source_files()` lists the interpreter's own stdlib `.py` files (test suites
and site-packages excluded) in a fixed order; `split_of(path)` puts each file
in "train", "valid" or "test" by a hash of its path relative to the stdlib, so
the split does not depend on the machine or the install location. Two tasks
read them: byte-level language modelling (`ByteCorpus`) and docstring -> code
retrieval (`docstring_pairs`).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import sysconfig
import zlib

import numpy as np

SPLITS = ("train", "valid", "test")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests",
                            "idle_test", "__pycache__"})


def stdlib_dir() -> pathlib.Path:
  """The running interpreter's standard library directory."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def source_files(packages: tuple[str, ...] = ()) -> list[pathlib.Path]:
  """Every stdlib `.py` file outside test suites and site-packages, sorted.

  `packages` keeps only the files of these top-level modules or packages
  (e.g. `("json", "email")`); empty keeps all.
  """
  root = stdlib_dir()
  files = []
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root).parts
    if _EXCLUDED_DIRS.intersection(parts[:-1]):
      continue
    if packages and parts[0].removesuffix(".py") not in packages:
      continue
    files.append(path)
  return files


def split_of_key(key: str, valid_percent: int = 5, test_percent: int = 5) -> str:
  """"train", "valid" or "test" for a string key, by CRC32 of its UTF-8 bytes."""
  if valid_percent < 0 or test_percent < 0 or valid_percent + test_percent > 100:
    raise ValueError("need valid_percent, test_percent >= 0 summing to <= 100; "
                     f"got valid_percent={valid_percent}, "
                     f"test_percent={test_percent}")
  bucket = zlib.crc32(key.encode()) % 100
  if bucket < valid_percent:
    return "valid"
  if bucket < valid_percent + test_percent:
    return "test"
  return "train"


def split_of(path: pathlib.Path, valid_percent: int = 5,
             test_percent: int = 5) -> str:
  """"train", "valid" or "test" for a stdlib file, by CRC32 of its relative path."""
  return split_of_key(path.relative_to(stdlib_dir()).as_posix(), valid_percent,
                      test_percent)


def read_source(path: pathlib.Path) -> str:
  return path.read_bytes().decode("utf-8", errors="replace")


@dataclasses.dataclass
class ByteCorpus:
  """Bytes of the stdlib files of each split, files joined by a NUL byte.

  `streams[split]` is a uint8 array; `files[split]` the number of files.
  """
  streams: dict[str, np.ndarray]
  files: dict[str, int]

  @classmethod
  def load(cls) -> ByteCorpus:
    chunks = {split: [] for split in SPLITS}
    for path in source_files():
      chunks[split_of(path)].append(path.read_bytes() + b"\0")
    return cls(
        streams={split: np.frombuffer(b"".join(parts), np.uint8)
                 for split, parts in chunks.items()},
        files={split: len(parts) for split, parts in chunks.items()})

  def random_windows(self, split: str, length: int, count: int,
                     rng: np.random.Generator) -> np.ndarray:
    """`count` windows of `length` bytes at uniform random offsets: `[count, length]` int32."""
    stream = self._stream(split, length)
    starts = rng.integers(0, len(stream) - length + 1, size=count)
    return stream[starts[:, None] + np.arange(length)].astype(np.int32)

  def strided_windows(self, split: str, length: int, count: int) -> np.ndarray:
    """`count` windows evenly spaced over the split: `[count, length]` int32."""
    stream = self._stream(split, length)
    starts = np.linspace(0, len(stream) - length, count).astype(np.int64)
    return stream[starts[:, None] + np.arange(length)].astype(np.int32)

  def _stream(self, split, length):
    if split not in self.streams:
      raise ValueError(f"split must be one of {SPLITS}; got split={split!r}")
    stream = self.streams[split]
    if not 1 <= length <= len(stream):
      raise ValueError(f"window length must be in [1, {len(stream)}] for "
                       f"split {split!r}; got length={length}")
    return stream


@dataclasses.dataclass(frozen=True)
class DocstringPair:
  """A stdlib function: its docstring (the query) and its code without it."""
  module: str
  name: str
  docstring: str
  code: str


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(stdlib_dir()).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _code_without_docstring(source: str, node) -> str | None:
  """The function's source with its docstring statement removed."""
  lines = source.splitlines(keepends=True)
  doc = node.body[0]
  head = "".join(lines[node.lineno - 1:doc.lineno - 1])
  head += lines[doc.lineno - 1][:doc.col_offset]
  tail = lines[doc.end_lineno - 1][doc.end_col_offset:]
  tail += "".join(lines[doc.end_lineno:node.end_lineno])
  decorators = "".join(lines[d.lineno - 1] for d in node.decorator_list)
  code = decorators + head.rstrip() + "\n" + tail.lstrip("\n")
  return code if tail.strip() else None


def docstring_pairs(min_docstring_words: int = 4, valid_percent: int = 5,
                    test_percent: int = 20, packages: tuple[str, ...] = ()
                    ) -> dict[str, list[DocstringPair]]:
  """Docstring -> code pairs per split ("train", "valid", "test"), by module.

  Every function or method of a stdlib file with a docstring of at least
  `min_docstring_words` words and a non-empty body besides it. A docstring
  that occurs more than once anywhere is dropped (its query is ambiguous).
  The split is the file's (`split_of` with these percentages), so no module
  is in two splits. `packages` restricts the files as in `source_files`.
  """
  found = []
  for path in source_files(packages):
    source = read_source(path)
    try:
      tree = ast.parse(source)
    except SyntaxError:
      continue
    module = _module_name(path)
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      docstring = ast.get_docstring(node)
      if not docstring or len(docstring.split()) < min_docstring_words:
        continue
      code = _code_without_docstring(source, node)
      if code is not None:
        found.append((split_of(path, valid_percent, test_percent), DocstringPair(
            module=module, name=node.name, docstring=docstring, code=code)))
  counts = {}
  for _, pair in found:
    counts[pair.docstring] = counts.get(pair.docstring, 0) + 1
  pairs = {split: [] for split in SPLITS}
  for split, pair in found:
    if counts[pair.docstring] == 1:
      pairs[split].append(pair)
  return pairs
