"""The MiniLM retrieval finetune over seeds 0-4, dense and 2:4, evaluated on a
test split three times as large: 60% of the stdlib files (3769 pairs)
instead of 20% (1128), training on the remaining 35% (1856 pairs; the
finetune's 128 steps of 16 take about one pass over them).

`retrieval_finetune_seeds` measured the noise of dense - 2:4 recall@1 on
1128 queries: 0.83 points of 95% half-width from five seeds, and a
0.5-point difference would need about 3100 queries. This sweep has them.
Seed by seed, dense then 2:4, so a sweep stopped early still pairs them.

  nice -n 10 python -m experiments.launch \
      --sweep=experiments/sweeps/retrieval_finetune_large_test.py \
      --workdir=RUNS/retrieval_finetune_large_test
  python -m experiments.report \
      --retrieval_ranks=RUNS/retrieval_finetune_large_test --runs=RUNS

(`RUNS` any scratch directory; the report looks for the sweep's work dir
under it by the sweep's name.) Ten trials of about 4 minutes each on two
CPU cores, then about 16 minutes to recompute the test ranks.
"""

from experiments.launch import ATTENTION_KINDS, Sweep, axis, product

SEEDS = (0, 1, 2, 3, 4)
OVERRIDES = {"data.max_eval_pairs": 0, "data.test_percent": 60}


def get_sweep() -> Sweep:
  return Sweep(config="experiments/configs/retrieval.py",
               trials=product(axis("seed", SEEDS), ATTENTION_KINDS[:2],
                              [OVERRIDES]))
