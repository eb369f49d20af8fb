"""An older commit's `nmattn` and `pallas_kernels`, copied under other names.

One process can then run the working tree's attention next to an earlier
version's, on the same inputs and in turn with cuDNN, which is how
docs/BENCHMARKS.md wants a change timed against its predecessor:

  python -m tools.baseline COMMIT DIR          # here: needs git
  python -m tools.ab --baseline DIR ...        # the public API, every backend
  python -m tools.mosaic_probe --baseline DIR --sections time,ir ...

`COMMIT`'s two packages become `DIR/nmattn_<hash>` and
`DIR/pallas_kernels_<hash>`, every reference to either package renamed the
same way, so the copy of `nmattn` dispatches to the copy of the kernels.
`DIR` goes to the GPU machine as a carried path (the device gets the work
tree without `.git`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from types import ModuleType

PACKAGES = ("nmattn", "pallas_kernels")
_COPY_NAME = re.compile(rf"^({'|'.join(PACKAGES)})_([0-9a-f]{{7,40}})$")
_PACKAGE_WORD = re.compile(rf"\b({'|'.join(PACKAGES)})\b")


def make(commit: str, root: str, repo: str = ".") -> str:
  """Writes `COMMIT`'s packages to `root/<package>_<hash>`; returns `<hash>`."""
  try:
    rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short=7",
                          f"{commit}^{{commit}}"], check=True, text=True,
                         capture_output=True).stdout.strip()
  except subprocess.CalledProcessError as e:
    raise ValueError(f"commit={commit!r} is not a commit of {repo}: "
                     f"{e.stderr.strip()}") from e
  with tempfile.TemporaryDirectory() as tmp:
    archive = os.path.join(tmp, "src.tar")
    subprocess.run(["git", "-C", repo, "archive", "-o", archive, rev, *PACKAGES],
                   check=True)
    with tarfile.open(archive) as tar:
      tar.extractall(tmp, filter="data")
    for package in PACKAGES:
      for folder, _, files in os.walk(os.path.join(tmp, package)):
        for file in files:
          if file.endswith(".py"):
            path = os.path.join(folder, file)
            with open(path) as f:
              text = f.read()
            with open(path, "w") as f:
              f.write(_PACKAGE_WORD.sub(rf"\1_{rev}", text))
    os.makedirs(root, exist_ok=True)
    for package in PACKAGES:
      target = os.path.join(root, f"{package}_{rev}")
      shutil.rmtree(target, ignore_errors=True)
      shutil.move(os.path.join(tmp, package), target)
  return rev


def copy_hash(root: str) -> str:
  """The `<hash>` of the one copy in `root` (both packages present)."""
  found = {}
  for entry in sorted(os.listdir(root)):
    match = _COPY_NAME.match(entry)
    if match and os.path.isdir(os.path.join(root, entry)):
      found.setdefault(match.group(2), set()).add(match.group(1))
  complete = sorted(rev for rev, packages in found.items()
                    if packages == set(PACKAGES))
  if len(complete) != 1 or len(found) != 1:
    raise ValueError(
        f"root={root!r} must hold exactly one copy (nmattn_<hash> and "
        f"pallas_kernels_<hash> of one commit); found "
        f"{ {rev: sorted(packages) for rev, packages in found.items()} }")
  return complete[0]


def load(root: str, module: str = "nmattn") -> ModuleType:
  """The copy in `root` of `module`, named as in the tree (e.g. "pallas_kernels.triton")."""
  package, _, rest = module.partition(".")
  if package not in PACKAGES:
    raise ValueError(f"module={module!r} must be in one of {PACKAGES}")
  rev = copy_hash(root)
  root = os.path.abspath(root)
  # First on the path, and no copy of the same commit from another root
  # left in sys.modules (two roots can hold the same `<hash>` names).
  if root in sys.path:
    sys.path.remove(root)
  sys.path.insert(0, root)
  for name in (f"{p}_{rev}" for p in PACKAGES):
    loaded = sys.modules.get(name)
    if loaded is not None and not (loaded.__file__ or "").startswith(root + os.sep):
      for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
  return importlib.import_module(f"{package}_{rev}" + (f".{rest}" if rest else ""))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("commit")
  parser.add_argument("root")
  args = parser.parse_args(argv)
  rev = make(args.commit, args.root)
  for package in PACKAGES:
    print(os.path.join(args.root, f"{package}_{rev}"))


if __name__ == "__main__":
  main()
