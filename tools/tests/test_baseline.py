"""tools.baseline: an older commit's kernels beside the tree's, on the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tools import baseline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_git_history():
  return shutil.which("git") is not None and subprocess.run(
      ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_git_history(), reason="needs git and the checkout")
def test_copy_of_head_builds_the_same_kernel_ir(tmp_path):
  from tools import mosaic_probe as probe
  if subprocess.run(["git", "-C", REPO, "diff", "--quiet", "HEAD", "--",
                     "pallas_kernels"]).returncode:
    pytest.skip("pallas_kernels has uncommitted changes: HEAD is not the tree")
  name = baseline.make("HEAD", str(tmp_path), repo=REPO)
  assert name.startswith("pallas_kernels_") and len(name) == len("pallas_kernels_") + 7
  copy = tmp_path / name
  sources = [p.read_text() for p in copy.rglob("*.py")]
  assert sources and not any("pallas_kernels." in s.replace(name, "") for s in sources)
  forward = baseline.load(str(tmp_path))
  assert forward.__name__ == f"{name}.mosaic_gpu.forward"
  assert forward.__file__.startswith(str(copy))
  rows = probe.section_ir(["2:4 sparse-pv"], forwards=probe.TREE + (("base", forward),))
  tree, base = (dict(r) for r in rows)
  assert (tree.pop("variant"), base.pop("variant")) == (
      "mosaic 2:4 sparse-pv", "base 2:4 sparse-pv")
  assert tree == base and tree["select"] > 0


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_unknown_commit_is_refused(tmp_path):
  with pytest.raises(ValueError, match="commit='no-such-rev' is not a commit"):
    baseline.make("no-such-rev", str(tmp_path), repo=REPO)


def test_load_needs_exactly_one_copy(tmp_path):
  with pytest.raises(ValueError, match="must hold exactly one pallas_kernels_<hash> copy; found \\[\\]"):
    baseline.load(str(tmp_path))
  (tmp_path / "pallas_kernels_aaaaaaa").mkdir()
  (tmp_path / "pallas_kernels_bbbbbbb").mkdir()
  with pytest.raises(ValueError, match="found \\['pallas_kernels_aaaaaaa', 'pallas_kernels_bbbbbbb'\\]"):
    baseline.load(str(tmp_path))


@pytest.mark.skipif(not _has_git_history(), reason="needs git and the checkout")
def test_copies_of_one_commit_in_two_roots_load_from_their_own_root(tmp_path):
  for root in ("a", "b"):
    baseline.make("HEAD", str(tmp_path / root), repo=REPO)
  for root in ("a", "b", "a"):
    module = baseline.load(str(tmp_path / root), "triton")
    assert module.__file__.startswith(str(tmp_path / root) + os.sep)
