"""tools.ab: the tree's nm_attention against a baseline copy, on the CPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import jax.numpy as jnp
import pytest

from tools import ab, baseline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _record(seq, causal, mode, version, ms, impl="xla", nm="2:4"):
  dense = version == "dense"
  return dict(seq=seq, causal=causal, mode=mode, version=version, ms=ms,
              impl=None if dense else impl, nm=None if dense else nm,
              row="xla dense" if dense else version)


def test_summarize_takes_medians_and_ratios():
  records = [_record(64, causal, mode, version, ms)
             for causal in (True, False) for mode in ("fwd+bwd", "fwd")
             for version, values in (("dense", (1.0, 3.0, 2.0)),
                                     ("tree", (4.0, 4.0)), ("base", (8.0, 6.0, 5.0)),
                                     ("tree again", (5.0, 3.0)))
             for ms in values]
  records.append(_record(64, False, "fwd", "tree", 9.0, impl="pallas_triton"))
  records += [_record(64, False, "fwd", v, 2.0, impl="pallas_triton")
              for v in ("base", "tree again")]
  rows = ab.summarize(records)
  assert [(r["causal"], r["mode"], r["impl"]) for r in rows] == [
      (False, "fwd", "pallas_triton"), (False, "fwd", "xla"),
      (False, "fwd+bwd", "xla"), (True, "fwd", "xla"), (True, "fwd+bwd", "xla")]
  r = rows[1]
  assert (r["dense_row"], r["nm"]) == ("xla dense", "2:4")
  assert (r["dense_ms"], r["tree_ms"], r["base_ms"], r["tree_again_ms"]) == (
      2.0, 4.0, 6.0, 4.0)
  assert r["tree_x_dense"] == 0.5 and r["base_x_dense"] == pytest.approx(1 / 3)
  assert r["tree_over_base"] == pytest.approx(2 / 3) and r["tree_over_tree"] == 1.0
  assert rows[0]["tree_over_tree"] == pytest.approx(2 / 9)
  table = ab.format_table(rows)
  assert len(table.splitlines()) == 1 + len(rows) and "tree/tree" in table


def test_max_relative_difference_over_leaves():
  want = (jnp.array([1.0, -4.0]), jnp.array([[2.0]]))
  got = (jnp.array([1.5, -4.0]), jnp.array([[2.0]]))
  assert ab.max_relative_difference(got, want) == pytest.approx(0.125)
  assert ab.max_relative_difference(want, want) == 0.0
  # An all-zero reference measures the absolute difference.
  assert ab.max_relative_difference((jnp.array([0.25]),), (jnp.zeros(1),)) == 0.25
  assert math.isnan(ab.max_relative_difference(
      (jnp.array([jnp.nan, 1.0]), jnp.ones(1)), (jnp.ones(2), jnp.full(1, 9.0))))


def test_disagreement_or_nan_stops_the_run():
  cell = dict(seq=64, causal=True, impl="xla", nm="2:4", mode="fwd+bwd")
  ab.check_agreement([dict(cell, max_rel_diff=0.01)], max_diff=0.01)
  with pytest.raises(ValueError, match=r"S=64 causal=True impl=xla nm=2:4 "
                     r"fwd\+bwd: max relative difference 0.5 > --max-diff=0.01"):
    ab.check_agreement([dict(cell, max_rel_diff=0.5)], max_diff=0.01)
  with pytest.raises(ValueError, match="difference nan"):
    ab.check_agreement([dict(cell, max_rel_diff=math.nan)], max_diff=0.01)


def test_parse_nm():
  assert ab.parse_nm("2:4") == (2, 4) and ab.parse_nm("16:16") == (16, 16)
  for text in ("2", "2:", "a:4", "2-4", "-1:4"):
    with pytest.raises(ValueError, match=f"--nm must be n:m .* got {text!r}"):
      ab.parse_nm(text)


@pytest.mark.parametrize("flag, value, match", [
    ("--rounds", "0", "got rounds=0, calls=5, iters=10"),
    ("--calls", "0", "got rounds=2, calls=0, iters=10"),
    ("--iters", "0", "got rounds=2, calls=5, iters=0"),
    ("--max-diff", "-1", "--max-diff must be >= 0; got -1.0"),
])
def test_bad_counts_are_refused(tmp_path, flag, value, match):
  with pytest.raises(ValueError, match=match):
    ab.main(["--baseline", str(tmp_path), flag, value])


def _has_git_history():
  return shutil.which("git") is not None and subprocess.run(
      ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True).returncode == 0


def _tree_is_head():
  return subprocess.run(["git", "-C", REPO, "diff", "--quiet", "HEAD", "--",
                         *baseline.PACKAGES]).returncode == 0


@pytest.mark.skipif(not _has_git_history(), reason="needs git and the checkout")
def test_tree_against_a_copy_of_head(tmp_path):
  baseline.make("HEAD", str(tmp_path / "copy"), repo=REPO)
  out = tmp_path / "ab.json"
  ab.main(["--baseline", str(tmp_path / "copy"), "--seq", "64",
           "--tokens", "64", "--heads", "2", "--head-dim", "16",
           "--dtype", "float32", "--causal", "true", "--impl", "xla",
           "pallas_triton", "--nm", "2:4", "--rounds", "1", "--calls", "1",
           "--iters", "1", "--json", str(out)])
  result = json.loads(out.read_text())
  cells = [(a["impl"], a["nm"], a["mode"]) for a in result["agreement"]]
  assert cells == [(impl, "2:4", mode) for impl in ("xla", "pallas_triton")
                   for mode in ab.MODES]
  # The same code gives the same bits; an edited tree must still agree closely.
  worst = max(a["max_rel_diff"] for a in result["agreement"])
  assert worst == 0.0 if _tree_is_head() else worst < 1e-5
  assert {(r["impl"], r["version"], r["mode"]) for r in result["records"]} == {
      (None, "dense", mode) for mode in ab.MODES} | {
      (impl, version, mode) for impl in ("xla", "pallas_triton")
      for version in ab.VERSIONS for mode in ab.MODES}
  assert all(r["ms"] > 0 for r in result["records"])
  assert result["meta"]["baseline"].startswith("nmattn_")
  assert len(result["summary"]) == 4
  for row in result["summary"]:
    assert row["dense_row"] == "xla dense"
    assert row["tree_over_base"] > 0 and row["tree_over_tree"] > 0
