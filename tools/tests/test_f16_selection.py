"""tools.f16_selection: the N:M rule, the running maximum, the rounding comparison."""

import json

import numpy as np
import pytest

from tools import f16_selection as fs


def test_keep_takes_the_best_and_breaks_ties_to_the_lower_index():
  scores = np.array([[1, 3, 3, 0, 5, 5, 5, 5, -1, 2, 0, 2]], np.float32)
  np.testing.assert_array_equal(
      fs.keep(scores, 2, 4)[0],
      [0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(
      fs.keep(scores, 1, 4)[0],
      [0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0])


def test_running_max_is_updated_by_each_tile_before_it_is_used():
  rng = np.random.default_rng(0)
  scores = rng.uniform(-1, 1, (2, 3 * fs.TILE)).astype(np.float32)
  scores[0, 5], scores[0, fs.TILE + 7], scores[0, 2 * fs.TILE + 1] = 4, 2, 6
  scores[1, 2 * fs.TILE + 3] = 3
  tiles = fs.running_max(scores).reshape(2, 3, fs.TILE)
  assert (tiles == tiles[..., :1]).all()  # one value a tile
  np.testing.assert_array_equal(tiles[0, :, 0], [4, 4, 6])
  np.testing.assert_array_equal(
      tiles[1, :, 0], np.maximum.accumulate(scores[1].reshape(3, -1).max(-1)))


def test_exactly_representable_scores_select_identically():
  rng = np.random.default_rng(1)
  scores = rng.integers(-8, 9, (3, 16, 2 * fs.TILE)).astype(np.float32)
  values = rng.standard_normal((3, 2 * fs.TILE, 8))
  result = fs.compare(scores, values, 2, 4)
  assert result["groups"] == 3 * 16 * 2 * fs.TILE // 4
  for rounding in fs.ROUNDINGS:
    assert result[rounding] == dict(mismatch=0.0, total_variation=0.0,
                                    output_rel_err=0.0)


def test_a_gap_below_the_half_precision_step_is_a_mismatch():
  rng = np.random.default_rng(2)
  scores = rng.integers(-8, 0, (1, fs.TILE)).astype(np.float32)
  scores[0, 0] = 8.0  # the row maximum: shifted values near -7.5
  scores[0, 4:8] = [0.5, 0.5001, 0.5002, -3.0]  # f32 keeps 5 and 6
  values = rng.standard_normal((fs.TILE, 4))
  result = fs.compare(scores, values, 2, 4)
  for rounding in ("f16 - max", "bf16 - max", "f16"):  # all three tie them
    assert result[rounding]["mismatch"] == pytest.approx(1 / (fs.TILE // 4))
    assert result[rounding]["output_rel_err"] > 0


def test_main_writes_the_random_source(tmp_path):
  fs.main(["--sources", "random", "--seq", "256", "--rows", "16", "--heads", "2",
           "--out", str(tmp_path)])
  record, = json.loads((tmp_path / "f16_selection.json").read_text())["records"]
  assert record["groups"] == 2 * 16 * 256 // 4 and record["rows"] == 32
  for rounding in fs.ROUNDINGS:
    assert 0 <= record[rounding]["mismatch"] < 0.05
    assert np.isfinite(record[rounding]["output_rel_err"])


def test_a_length_that_is_not_whole_tiles_is_refused(capsys):
  with pytest.raises(SystemExit):
    fs.main(["--sources", "random", "--seq", "200"])
  assert "--seq must be a multiple of 128; got 200" in capsys.readouterr().err
