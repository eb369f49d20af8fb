"""tools.topk_cost: the two rankings agree, and the tool times every phase."""

import json

import jax.numpy as jnp
import numpy as np

from nmattn import patterns
from tools import topk_cost


def test_rank_argsort_matches_the_library_top_k():
  rng = np.random.default_rng(0)
  # Integer values make many ties; -inf and inf as topk_blocks writes them.
  values = rng.integers(0, 4, (3, 5, 16)).astype(np.float32)
  values[0, 0, :3] = np.inf
  values[1, 2, 5:] = -np.inf
  for count in (1, 4, 16):
    want = np.zeros_like(values, bool)
    for row in np.ndindex(values.shape[:-1]):
      order = sorted(range(16), key=lambda j: (-values[row][j], j))
      want[row][order[:count]] = True
    np.testing.assert_array_equal(topk_cost.rank_argsort(jnp.asarray(values), count), want)
    np.testing.assert_array_equal(patterns._top(jnp.asarray(values), count), want)  # pylint: disable=protected-access


def test_main_times_every_phase(tmp_path):
  path = tmp_path / "topk.json"
  topk_cost.main(["--seq", "512", "--heads", "2", "--head-dim", "16", "--block", "64",
                  "--density", "0.5", "--iters", "2", "--json", str(path)])
  records = json.loads(path.read_text())
  assert [r["phase"] for r in records] == [
      "means", "means_sum_f32", "means_dot", "pooled", "topk_blocks",
      "topk_blocks_aot", "rank_argsort", "rank_top_k"]
  assert all(r["ms"] > 0 and r["count"] == 4 for r in records)
