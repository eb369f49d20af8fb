"""tools.baseline: an older commit's nmattn and kernels beside the tree's, on the CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import nmattn
from tools import baseline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_git_history():
  return shutil.which("git") is not None and subprocess.run(
      ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_git_history(), reason="needs git and the checkout")
def test_copy_of_head_is_renamed_throughout_and_runs(tmp_path, rng):
  rev = baseline.make("HEAD", str(tmp_path), repo=REPO)
  assert re.fullmatch(r"[0-9a-f]{7}", rev)
  assert sorted(os.listdir(tmp_path)) == [f"nmattn_{rev}", f"pallas_kernels_{rev}"]
  for package in baseline.PACKAGES:
    sources = [p.read_text() for p in (tmp_path / f"{package}_{rev}").rglob("*.py")]
    assert sources
    # Every import names the copies: no word `nmattn` or `pallas_kernels` is left.
    for text in sources:
      assert not re.search(r"\b(nmattn|pallas_kernels)\b", text)
  copy = baseline.load(str(tmp_path))
  assert copy.__name__ == f"nmattn_{rev}"
  assert copy.__file__.startswith(str(tmp_path / f"nmattn_{rev}") + os.sep)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 32, 2, 16)), jnp.float32)
             for _ in range(3))
  got = copy.nm_attention(q, k, v, is_causal=True, implementation="pallas_triton")
  want = nmattn.nm_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The copy of nmattn dispatched to the copy of the kernels.
  kernels = sys.modules[f"pallas_kernels_{rev}.triton"]
  assert kernels.__file__.startswith(str(tmp_path / f"pallas_kernels_{rev}") + os.sep)
  assert baseline.load(str(tmp_path), "pallas_kernels.triton") is kernels


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_unknown_commit_is_refused(tmp_path):
  with pytest.raises(ValueError, match="commit='no-such-rev' is not a commit"):
    baseline.make("no-such-rev", str(tmp_path), repo=REPO)


def test_load_needs_exactly_one_complete_copy(tmp_path):
  with pytest.raises(ValueError, match=r"must hold exactly one copy .*; found \{\}"):
    baseline.load(str(tmp_path))
  (tmp_path / "pallas_kernels_aaaaaaa").mkdir()
  with pytest.raises(ValueError, match=r"found \{'aaaaaaa': \['pallas_kernels'\]\}"):
    baseline.load(str(tmp_path))
  for name in ("nmattn_aaaaaaa", "nmattn_bbbbbbb", "pallas_kernels_bbbbbbb"):
    (tmp_path / name).mkdir()
  with pytest.raises(ValueError, match=r"found \{'aaaaaaa': \['nmattn', 'pallas_kernels'\], "
                     r"'bbbbbbb': \['nmattn', 'pallas_kernels'\]\}"):
    baseline.load(str(tmp_path))


def test_load_refuses_other_packages(tmp_path):
  with pytest.raises(ValueError, match=r"module='experiments.bench' must be in one of"):
    baseline.load(str(tmp_path), "experiments.bench")


@pytest.mark.skipif(not _has_git_history(), reason="needs git and the checkout")
def test_copies_of_one_commit_in_two_roots_load_from_their_own_root(tmp_path):
  for root in ("a", "b"):
    baseline.make("HEAD", str(tmp_path / root), repo=REPO)
  for root in ("a", "b", "a"):
    module = baseline.load(str(tmp_path / root), "pallas_kernels.triton")
    assert module.__file__.startswith(str(tmp_path / root) + os.sep)
    assert baseline.load(str(tmp_path / root)).__file__.startswith(
        str(tmp_path / root) + os.sep)
