"""PNG from the JSON of `experiments.bench.attention`: TFLOP/s per row.

  python -m experiments.bench.plot_attention docs/bench_attention_h100.json \
      docs/bench_attention_h100.png

One panel per (head_dim, mode, causal) cell group; x is the sequence length
(a bar group per length when only one or two were measured), y dense-
equivalent TFLOP/s.
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot(records: list[dict], title: str, path: str) -> None:
  good = [r for r in records if "tflops" in r]
  panels = sorted({(r["head_dim"], r["mode"], r["causal"]) for r in good})
  rows = sorted({r["row"] for r in good})
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8),
                           squeeze=False)
  for ax, (head_dim, mode, causal) in zip(axes[0], panels):
    cell = [r for r in good if (r["head_dim"], r["mode"], r["causal"]) ==
            (head_dim, mode, causal)]
    seqs = sorted({r["seq"] for r in cell})
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
      by_seq = {r["seq"]: r["tflops"] for r in cell if r["row"] == row}
      xs = [j + i * width for j, s in enumerate(seqs) if s in by_seq]
      ax.bar(xs, [by_seq[s] for s in seqs if s in by_seq], width, label=row)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(seqs))])
    ax.set_xticklabels([f"{s // 1024}k" for s in seqs])
    ax.set_title(f"D={head_dim} {mode} {'causal' if causal else 'non-causal'}",
                 fontsize=9)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("dense-equivalent TFLOP/s")
  axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("inputs", nargs="+", help="JSON files, then the PNG path")
  args = parser.parse_args(argv)
  *inputs, png = args.inputs
  records, metas = [], []
  for path in inputs:
    with open(path) as f:
      data = json.load(f)
    records += data["records"]
    metas.append(data["meta"])
  meta = metas[0]
  plot(records, f"{meta['device']}, jax {meta['jax']}, {meta['date']}", png)
  print(f"wrote {png}")


if __name__ == "__main__":
  main()
