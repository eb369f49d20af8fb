"""tools.mosaic_probe: its trace, IR and Nsight Compute summaries (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from tools import baseline
from tools import mosaic_probe as probe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_profile_trace_summary(tmp_path):
  events = []
  # Tracks 1 and 2: the two consumer warpgroups of one CTA (track 3 would be
  # its producer). Times in microseconds.
  for track, (t0, waits) in ((1, (0.0, (0.5, 0.25))), (2, (0.5, (1.0,)))):
    now = t0
    for wait in waits:  # "wait_k", then "select" twice as long
      for name, length in (("wait_k", wait), ("select", 2 * wait)):
        events += [dict(name=name, ph="B", ts=now, tid=track),
                   dict(name=name, ph="E", ts=now + length, tid=track)]
        now += length
  path = tmp_path / "trace.json"
  path.write_text(json.dumps({"traceEvents": events}))
  regions, tracks, overlap = probe.summarize_trace(str(path))
  assert tracks == 2
  assert regions["wait_k"]["count"] == 3
  np.testing.assert_allclose(regions["wait_k"]["mean_ns"], 1750 / 3)
  np.testing.assert_allclose(regions["select"]["ns_per_step"], 3500 / 3)
  # select intervals: track 1 [0.5, 1.5] and [1.75, 2.25], track 2 [1.5, 3.5]:
  # both for 0.5 of the 3.0 that either is in one.
  np.testing.assert_allclose(overlap, 0.5 / 3.0)


def test_ir_op_counts():
  text = """
    %3 = arith.cmpf ogt, %1, %2 : f32
    %4 = arith.select %3, %1, %2 : f32
    %5 = llvm.inline_asm "max.NaN.f32 $0, $1, $2;", "=f,f,f" %1, %2 : (f32, f32) -> f32
    %6 = llvm.inline_asm has_side_effects "bar.sync $0, 128;", "r" %7 : (i32) -> !llvm.void
    %8 = arith.cmpf oge, %4, %5 : f32
  """
  counts = probe.count_ir_ops(text)
  assert counts["arith.cmpf"] == 2 and counts["arith.select"] == 1
  assert counts["max.NaN.f32"] == 1 and counts["bar.sync"] == 1
  assert counts["llvm.inline_asm"] == 2


def test_ir_section_counts_the_selection():
  rows = {r["variant"]: r for r in probe.section_ir(["2:4 sparse-pv", "4:4 dense"])}
  sparse, dense = rows["mosaic 2:4 sparse-pv"], rows["mosaic 4:4 dense"]
  # Four min/max per 4-key group, 16 groups per thread and 128-key tile; the
  # dense kernel selects nothing.
  assert sparse["min/max"] >= 64
  assert sparse["compare"] > dense["compare"] and sparse["select"] > dense["select"]
  # No NaN poison on the compressed path, and sums over the kept half only.
  assert sparse["fadd"] < dense["fadd"]


def test_ncu_source_summary():
  header = ("Address,Source,Warp Stall Sampling (All Samples),"
            "Warp Stall Sampling (Not-issued Samples),Instructions Executed,"
            "stall_barrier,stall_wait,stall_selected,stall_wait (Not Issued)")
  report = "\n".join([
      '"Kernel Name","first",', header,
      '0x10,"  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24",4,3,"1,024",0,3,1,3',
      '0x20,"  WARPGROUP.DEPBAR.LE gsb0, 0x0","1,200",1190,"1,024",1190,0,10,0',
      '"Kernel Name","second",', header,
      '0x30,"  FADD R1, R2, R3",6,2,8,0,2,4,2',
  ])
  first, second = probe.summarize_ncu_source(report, top=1)
  assert first["kernel"] == "first" and first["instructions"] == 2
  assert first["samples"] == 1204
  np.testing.assert_allclose(first["stall_shares"]["barrier"], 1190 / 1204)
  np.testing.assert_allclose(first["stall_shares"]["selected"], 11 / 1204)
  assert list(first["stall_shares"]) == ["barrier", "selected", "wait"]
  (top,) = first["top"]
  assert top["sass"] == "WARPGROUP.DEPBAR.LE gsb0, 0x0"
  assert top["executed"] == 1024 and top["reasons"][0] == (1190.0, "barrier")
  assert second["kernel"] == "second" and second["samples"] == 6
  np.testing.assert_allclose(second["stall_shares"]["selected"], 4 / 6)



def _has_git_history():
  return shutil.which("git") is not None and subprocess.run(
      ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_git_history(), reason="needs git and the checkout")
def test_ir_section_of_a_baseline_copy(tmp_path):
  baseline.make("HEAD", str(tmp_path), repo=REPO)
  base = probe.Version(
      "base", baseline.load(str(tmp_path), "pallas_kernels.mosaic_gpu.forward"),
      baseline.load(str(tmp_path), "nmattn._validation").canonicalize)
  tree, copy = (dict(r) for r in probe.section_ir(["2:4 sparse-pv"],
                                                  versions=probe.TREE + (base,)))
  assert (tree.pop("variant"), copy.pop("variant")) == (
      "mosaic 2:4 sparse-pv", "base 2:4 sparse-pv")
  assert copy["select"] > 0
  if subprocess.run(["git", "-C", REPO, "diff", "--quiet", "HEAD", "--",
                     *baseline.PACKAGES]).returncode == 0:
    assert tree == copy  # the same code builds the same kernel
