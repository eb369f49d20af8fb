"""An older commit's `pallas_kernels`, copied under another package name.

One process can then run the working tree's kernels next to an earlier
version's, on the same inputs and in turn with cuDNN, which is how
BENCHMARKS.md wants a change timed against its predecessor:

  python -m tools.baseline COMMIT DIR      # here: needs git
  python -m tools.mosaic_probe --baseline DIR --sections time,ir ...
  python -m tools.triton_ab --baseline DIR ...    # the Triton kernels

`DIR` goes to the GPU machine as a carried path (the device gets the work
tree without `.git`). The probe labels the baseline's rows "base ...".
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

PACKAGE = "pallas_kernels"


def make(commit: str, root: str, repo: str = ".") -> str:
  """Writes `COMMIT:pallas_kernels` to `root/pallas_kernels_<hash>`; returns the name."""
  try:
    rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short=7",
                          f"{commit}^{{commit}}"], check=True, text=True,
                         capture_output=True).stdout.strip()
  except subprocess.CalledProcessError as e:
    raise ValueError(f"commit={commit!r} is not a commit of {repo}: "
                     f"{e.stderr.strip()}") from e
  name = f"{PACKAGE}_{rev}"
  with tempfile.TemporaryDirectory() as tmp:
    archive = os.path.join(tmp, "src.tar")
    subprocess.run(["git", "-C", repo, "archive", "-o", archive, rev, PACKAGE],
                   check=True)
    with tarfile.open(archive) as tar:
      tar.extractall(tmp, filter="data")
    for folder, _, files in os.walk(os.path.join(tmp, PACKAGE)):
      for file in files:
        if file.endswith(".py"):
          path = os.path.join(folder, file)
          with open(path) as f:
            text = f.read()
          with open(path, "w") as f:
            f.write(re.sub(rf"\b{PACKAGE}\b", name, text))
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(os.path.join(tmp, PACKAGE), target)
  return name


def load(root: str, module: str = "mosaic_gpu.forward") -> ModuleType:
  """`module` (default: the Hopper forward) of the one copy in `root`."""
  names = sorted(d for d in os.listdir(root) if d.startswith(PACKAGE + "_")
                 and os.path.isdir(os.path.join(root, d)))
  if len(names) != 1:
    raise ValueError(f"root={root!r} must hold exactly one {PACKAGE}_<hash> "
                     f"copy; found {names}")
  root = os.path.abspath(root)
  # First on the path, and no copy of the same commit from another root
  # left in sys.modules (two roots can hold the same `<hash>` name).
  if root in sys.path:
    sys.path.remove(root)
  sys.path.insert(0, root)
  package = names[0]
  loaded = sys.modules.get(package)
  if loaded is not None and not (loaded.__file__ or "").startswith(root + os.sep):
    for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
      del sys.modules[key]
  return importlib.import_module(f"{package}.{module}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("commit")
  parser.add_argument("root")
  args = parser.parse_args(argv)
  print(os.path.join(args.root, make(args.commit, args.root)))


if __name__ == "__main__":
  main()
