"""experiments.bench.patterns at a tiny size on the CPU (xla rows in place of the GPU's)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from experiments.bench import patterns as bench
from nmattn import patterns

TINY = ["--seq", "64", "--block", "16", "--heads", "2", "--tokens", "64",
        "--head-dim", "16", "--implementation", "xla",
        "--dense-implementation", "xla", "--iters", "1", "--seconds", "0"]


def test_tiny_matrix_has_every_row_ratio_and_check(tmp_path, capsys):
  out = tmp_path / "bench.json"
  records = bench.main(TINY + ["--causal", "True", "--densities", "1", "0.5", "0.25",
                               "--json", str(out)])
  saved = json.loads(out.read_text())
  assert saved["records"] == json.loads(json.dumps(records))
  assert saved["meta"]["elapsed_s"] > 0
  rows = ("xla dense", "nmattn xla 2:4", "nmattn xla 4:4", "xla masked")
  by_key = {(r["mode"], r["row"], r.get("pattern"), r.get("density")): r
            for r in records}
  # Causal, 4 blocks of 16: rows reach 1, 2, 3, 4 blocks (10 in all); density
  # 0.5 keeps min(2, reachable) = 7 of them, 0.25 keeps 1 a row (random) or the
  # dense diagonal and first block (topk): 4 and 7.
  fractions = {("random", 1.0): 1.0, ("random", 0.5): 0.7, ("random", 0.25): 0.4,
               ("topk", 1.0): 1.0, ("topk", 0.5): 0.7, ("topk", 0.25): 0.7}
  for mode in ("fwd", "fwd_bwd"):
    dense = by_key[mode, "xla dense", None, None]
    assert dense["x_dense"] == 1.0
    for row in rows[1:]:
      for (kind, density), fraction in fractions.items():
        r = by_key[mode, row, kind, density]
        assert "error" not in r and "skipped" not in r, r
        assert r["block_fraction"] == pytest.approx(fraction)
        assert r["x_dense"] == pytest.approx(dense["ms"] / r["ms"])
        flops = 4 * 1 * 2 * 64 * 64 * 16 / 2 * (3.5 if mode == "fwd_bwd" else 1)
        assert r["tflops"] == pytest.approx(flops / r["ms"] / 1e9)
        full = by_key[mode, row, kind, 1.0]
        assert r["over_proportional"] == pytest.approx(
            r["ms"] / full["ms"] / fraction)
        if kind == "topk":
          assert r["pattern_ms"] > 0
          assert r["pattern_fraction"] == pytest.approx(r["pattern_ms"] / r["ms"])
        else:
          assert "pattern_ms" not in r
        # nmattn n == m and cuDNN (here XLA) masked compute the same attention.
        if mode == "fwd" and row == "nmattn xla 4:4":
          assert r["check_rel_err"] < 2e-2
  assert sum("check_rel_err" in r for r in records) == len(fractions)
  printed = capsys.readouterr().out
  assert "x dense" in printed and "nmattn xla 2:4" in printed


def test_skips_say_why(tmp_path):
  records = bench.main(TINY + [
      "--causal", "False", "--modes", "fwd", "--densities", "1", "--patterns",
      "random", "--mask-limit-gib", "0", "--implementation", "pallas_mosaic",
      "--json", str(tmp_path / "bench.json")])
  rows = {r["row"]: r for r in records}
  assert "ms" in rows["xla dense"]
  assert "element mask [1, 2, 64, 64] needs" in rows["xla masked"]["skipped"]
  assert "--mask-limit-gib 0" in rows["xla masked"]["skipped"]
  for n in (2, 4):
    assert rows[f"nmattn pallas_mosaic {n}:4"]["skipped"]  # the backend's reason
  # A spent budget starts no cell and says so.
  records = bench.main(TINY + ["--budget-s", "1e-9", "--causal", "False", "True"])
  assert len(records) == 4 and all("--budget-s" in r["skipped"] for r in records)


@pytest.mark.parametrize("is_causal", [False, True])
def test_random_modes_keep_the_count_among_reachable_blocks(seed, is_causal):
  modes = np.asarray(bench.random_modes(jax.random.key(seed), batch=2, heads=3,
                                        seq=80, block=16, density=0.4,
                                        is_causal=is_causal))
  reachable = bench.reachable_blocks(80, 16, is_causal)  # 5 x 5 blocks
  assert modes.shape == (2, 3, 5, 5)
  assert set(np.unique(modes)) <= {patterns.SKIP, patterns.NM}
  assert not np.any((modes != patterns.SKIP) & ~reachable)
  want = np.minimum(bench.block_count(80, 16, 0.4), reachable.sum(-1))  # 2 a row
  np.testing.assert_array_equal((modes != patterns.SKIP).sum(-1),
                                np.broadcast_to(want, (2, 3, 5)))


def test_element_mask_is_the_pattern_blockwise(rng):
  modes = rng.integers(0, 3, (2, 3, 4, 4)).astype(np.int8)
  got = np.asarray(bench.element_mask(modes, 16, 60))  # the last block partial
  positions = np.arange(60)
  want = patterns.element_modes(modes, positions, positions, block_q=16,
                                block_k=16) != patterns.SKIP
  assert got.shape == (2, 3, 60, 60)
  np.testing.assert_array_equal(got, want)
