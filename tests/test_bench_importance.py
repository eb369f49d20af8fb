"""`experiments.bench.importance` at a tiny size on the CPU (Triton rows in
interpret mode): every row timed, JSON written, extra relative to the forward."""

import json

from experiments.bench import importance


def test_rows_and_json(tmp_path):
  path = tmp_path / "importance.json"
  records = importance.main(["--seq", "64", "--heads", "2", "--head-dim", "16",
                             "--tokens", "64", "--iters", "1", "--json",
                             str(path)])
  rows = [r["row"] for r in records]
  assert rows == ["pallas_triton forward", "pallas_triton forward + importance",
                  "xla forward + importance"]
  assert records[0]["extra"] == 0.0
  assert all(r["ms"] > 0 for r in records)
  assert json.loads(path.read_text())["records"] == records
