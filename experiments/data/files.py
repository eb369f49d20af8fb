"""A user's own data from local files: text for the byte LM, JSONL pairs for retrieval.

`byte_corpus(paths)` reads text files (or every file under directories) into
the same `stdlib.ByteCorpus` the byte-level LM trains on; `read_pairs(path)`
reads (query, document) pairs, one JSON object a line, into splits. Both
assign splits deterministically (by position in the text, by a hash of the
query), so a run sees the same splits on every machine.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from experiments.data import stdlib


def _check_percents(valid_percent: int, test_percent: int) -> None:
  if valid_percent < 0 or test_percent < 0 or valid_percent + test_percent >= 100:
    raise ValueError("need valid_percent, test_percent >= 0 summing to < 100; "
                     f"got valid_percent={valid_percent}, "
                     f"test_percent={test_percent}")


def text_files(paths, suffixes: tuple[str, ...] = ()) -> list[pathlib.Path]:
  """The files named by `paths`: files as given, directories walked.

  A directory contributes every regular file below it, sorted, except hidden
  ones (a name or a parent directory starting with "."); `suffixes` (e.g.
  `(".py", ".md")`) keeps only files with those endings, empty keeps all.
  Files named directly are always kept.
  """
  if isinstance(paths, (str, pathlib.Path)):
    paths = (paths,)
  if not paths:
    raise ValueError(f"text_paths must name at least one file or directory; "
                     f"got text_paths={tuple(paths)}")
  found = []
  for entry in map(pathlib.Path, paths):
    if entry.is_file():
      found.append(entry)
    elif entry.is_dir():
      below = [p for p in sorted(entry.rglob("*")) if p.is_file()
               and not any(part.startswith(".")
                           for part in p.relative_to(entry).parts)
               and (not suffixes or p.name.endswith(tuple(suffixes)))]
      if not below:
        raise ValueError(f"text_paths directory holds no file (suffixes="
                         f"{tuple(suffixes)}); got text_paths entry "
                         f"{str(entry)!r}")
      found.extend(below)
    else:
      raise ValueError(f"text_paths entries must be files or directories; "
                       f"got {str(entry)!r}, which does not exist")
  return found


def byte_corpus(paths, valid_percent: int = 5, test_percent: int = 5,
                suffixes: tuple[str, ...] = ()) -> stdlib.ByteCorpus:
  """A `ByteCorpus` of the bytes of `text_files(paths, suffixes)`.

  The files are joined by a NUL byte (as the stdlib corpus) into one stream,
  cut by position: the first `100 - valid_percent - test_percent` percent is
  "train", then "valid", then "test", so even a single file has all three
  splits. `files[split]` counts the files with bytes in that split.
  """
  _check_percents(valid_percent, test_percent)
  contents = [path.read_bytes() + b"\0" for path in text_files(paths, suffixes)]
  stream = np.frombuffer(b"".join(contents), np.uint8)
  total = len(stream)
  train_end = total * (100 - valid_percent - test_percent) // 100
  valid_end = train_end + total * valid_percent // 100
  bounds = {"train": (0, train_end), "valid": (train_end, valid_end),
            "test": (valid_end, total)}
  file_ends = np.cumsum([len(c) for c in contents])
  file_starts = file_ends - [len(c) for c in contents]
  return stdlib.ByteCorpus(
      streams={split: stream[lo:hi] for split, (lo, hi) in bounds.items()},
      files={split: int(np.sum((file_starts < hi) & (file_ends > lo)))
             for split, (lo, hi) in bounds.items()})


@dataclasses.dataclass(frozen=True)
class Pair:
  """A retrieval example: the query and the one document it should retrieve."""
  query: str
  document: str


def split_of_query(query: str, valid_percent: int, test_percent: int) -> str:
  """"train", "valid" or "test" by CRC32 of the query's UTF-8 bytes."""
  _check_percents(valid_percent, test_percent)
  return stdlib.split_of_key(query, valid_percent, test_percent)


def read_pairs(path, query_field: str = "query",
               document_field: str = "document", valid_percent: int = 5,
               test_percent: int = 20) -> dict[str, list[Pair]]:
  """(query, document) pairs per split from a JSONL file.

  Each non-blank line is a JSON object with string fields `query_field` and
  `document_field`, and optionally "split" ("train", "valid" or "test");
  a line without "split" goes where `split_of_query` puts its query. A query
  that occurs twice is an error (its correct document would be ambiguous), as
  is a missing or non-string field; errors name the line.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"pairs_jsonl must be a JSONL file; got "
                     f"pairs_jsonl={str(path)!r}, which is not a file")
  pairs = {split: [] for split in stdlib.SPLITS}
  first_line_of = {}
  with path.open(encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not a JSON object ({error})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object; got {line.strip()[:80]}")
      for field in (query_field, document_field):
        if not isinstance(record.get(field), str):
          raise ValueError(f"{where}: field {field!r} must be a string; got "
                           f"{field}={record.get(field)!r}")
      query = record[query_field]
      if query in first_line_of:
        raise ValueError(f"{where}: query repeats line {first_line_of[query]} "
                         f"(a query needs one correct document); got "
                         f"query={query[:80]!r}")
      first_line_of[query] = number
      split = record.get("split") or split_of_query(query, valid_percent,
                                                    test_percent)
      if split not in pairs:
        raise ValueError(f"{where}: split must be one of {stdlib.SPLITS}; got "
                         f"split={split!r}")
      pairs[split].append(Pair(query, record[document_field]))
  if not any(pairs.values()):
    raise ValueError(f"pairs_jsonl holds no pair; got pairs_jsonl={str(path)!r}")
  return pairs
