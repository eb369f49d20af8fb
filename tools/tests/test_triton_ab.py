"""tools.triton_ab: the tree's Triton kernels against a copy, on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import jax.numpy as jnp
import pytest

from tools import baseline, triton_ab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_summarize_takes_medians_and_ratios():
  records = [dict(seq=64, causal=c, mode="fwd", row=row, ms=ms)
             for c in (False, True)
             for row, values in (("xla dense", (1.0, 3.0, 2.0)), ("tree", (4.0, 4.0)),
                                 ("base", (8.0, 6.0, 5.0)))
             for ms in values]
  rows = triton_ab.summarize(records)
  assert [(r["seq"], r["causal"], r["mode"]) for r in rows] == [
      (64, False, "fwd"), (64, True, "fwd")]
  r = rows[0]
  assert r["dense_row"] == "xla dense"
  assert (r["dense_ms"], r["tree_ms"], r["base_ms"]) == (2.0, 4.0, 6.0)
  assert r["tree_x_dense"] == 0.5 and r["base_x_dense"] == pytest.approx(1 / 3)
  assert r["tree_over_base"] == pytest.approx(2 / 3)


def test_max_relative_difference_over_leaves():
  want = (jnp.array([1.0, -4.0]), jnp.array([[2.0]]))
  got = (jnp.array([1.5, -4.0]), jnp.array([[2.0]]))
  assert triton_ab.max_relative_difference(got, want) == pytest.approx(0.125)
  assert triton_ab.max_relative_difference(want, want) == 0.0
  # An all-zero reference measures the absolute difference.
  assert triton_ab.max_relative_difference((jnp.array([0.25]),),
                                           (jnp.zeros(1),)) == 0.25


def test_counts_below_one_are_refused(tmp_path):
  with pytest.raises(ValueError, match="got rounds=0, calls=5, iters=10"):
    triton_ab.main(["--baseline", str(tmp_path), "--rounds", "0"])


def _pallas_kernels_is_head():
  return shutil.which("git") is not None and subprocess.run(
      ["git", "-C", REPO, "diff", "--quiet", "HEAD", "--", "pallas_kernels"],
      capture_output=True).returncode == 0 and subprocess.run(
      ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _pallas_kernels_is_head(),
                    reason="needs git and pallas_kernels as committed")
def test_tree_against_a_copy_of_head_agrees_exactly(tmp_path):
  baseline.make("HEAD", str(tmp_path / "copy"), repo=REPO)
  out = tmp_path / "ab.json"
  triton_ab.main(["--baseline", str(tmp_path / "copy"), "--seq", "64",
                  "--tokens", "64", "--heads", "2", "--head-dim", "16",
                  "--dtype", "float32", "--causal", "true", "--rounds", "1",
                  "--calls", "1", "--iters", "1", "--interpret", "--json", str(out)])
  result = json.loads(out.read_text())
  assert [(a["mode"], a["max_rel_diff"]) for a in result["agreement"]] == [
      ("fwd", 0.0), ("fwd+bwd", 0.0)]
  assert {(r["row"], r["mode"]) for r in result["records"]} == {
      (row, mode) for row in ("xla dense", "tree", "base") for mode in triton_ab.MODES}
  assert all(r["ms"] > 0 for r in result["records"])
  [fwd, fwd_bwd] = result["summary"]
  assert (fwd["mode"], fwd_bwd["mode"]) == ("fwd", "fwd+bwd")
  assert fwd["tree_over_base"] > 0 and fwd_bwd["dense_row"] == "xla dense"
