"""docs/RESULTS.md, its tables and plots, from the sweeps' own outputs.

  python -m experiments.report --runs=RUNS_DIR

copies each sweep's small outputs from `RUNS_DIR/<sweep>/` (results.csv and,
per trial, final_metrics.json, metrics.csv, config.json, status.json; never
checkpoints) into `experiments/results/<sweep>/`, then renders
docs/RESULTS.md and the plots in docs/results/ from those copies only.
Without `--runs` it re-renders from the committed copies. Hand-written notes
in experiments/results/NOTES.md are included verbatim.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import shutil

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
DOC = REPO / "docs" / "RESULTS.md"
PLOTS = REPO / "docs" / "results"
# Result pages that other scripts write beside the plots: (file, what).
FURTHER = (
    ("hierarchical.md", "block patterns (topk_blocks, sample_attention, "
     "band and sinks, block-sparse) against density on the pretrained "
     "MiniLM, zero-shot (`experiments/hierarchical.py`)"),
    ("long_context.md", "the byte LM from scratch at 4096 bytes on an H200: "
     "dense, 2:4 and 2:4 in topk blocks (`experiments/long_context_gpu.sh`)"),
    ("spatten.md", "SpAtten: MiniLM cascade token pruning (fidelity, "
     "recall, CPU and GPU latency) and byte-LM KV eviction "
     "(`experiments/spatten.py`)"),
)
TRIAL_FILES = ("final_metrics.json", "metrics.csv", "config.json",
               "status.json")

SWEEPS = {
    "minilm_zero_shot": "experiments/sweeps/minilm_zero_shot.py",
    "minilm_zero_shot_long": "experiments/sweeps/minilm_zero_shot_long.py",
    "retrieval_finetune": "experiments/sweeps/retrieval_finetune.py",
    "listops_from_scratch": "experiments/sweeps/listops_from_scratch.py",
    "bytelm_from_scratch": "experiments/sweeps/bytelm_from_scratch.py",
    "bytelm_dense_to_sparse": "experiments/sweeps/bytelm_dense_to_sparse.py",
}


def collect(runs: pathlib.Path) -> None:
  """Copies the small per-trial outputs of every sweep found under `runs`."""
  for sweep in SWEEPS:
    source = runs / sweep
    if not (source / "results.csv").is_file():
      continue  # absent or still running
    target = RESULTS / sweep
    if target.exists():
      shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy(source / "results.csv", target / "results.csv")
    for trial in sorted(p for p in source.iterdir() if p.is_dir()):
      (target / trial.name).mkdir()
      for name in TRIAL_FILES:
        if (trial / name).exists():
          shutil.copy(trial / name, target / trial.name / name)


def load_trials(sweep: str) -> list[dict]:
  """Per trial: name, status, final metrics summary, metrics.csv rows."""
  trials = []
  root = RESULTS / sweep
  if not root.is_dir():
    return trials
  for trial in sorted(p for p in root.iterdir() if p.is_dir()):
    status = json.loads((trial / "status.json").read_text())
    final_path = trial / "final_metrics.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    rows = []
    if (trial / "metrics.csv").exists():
      with (trial / "metrics.csv").open() as f:
        rows = [(int(r["step"]), r["split"], r["metric"], float(r["value"]))
                for r in csv.DictReader(f)]
    trials.append({"name": trial.name, "status": status["status"],
                   "final": final, "rows": rows})
  return trials


def _by_attention(trials):
  return {t["final"]["attention"]: t for t in trials if t["final"]}


def _series(trial, split, metric):
  points = [(s, v) for s, sp, m, v in trial["rows"] if sp == split and
            m == metric]
  return [p[0] for p in points], [p[1] for p in points]


def _plot(path, panels):
  """`panels`: list of (title, ylabel, {label: (xs, ys)} or bars dict)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8))
  axes = [axes] if len(panels) == 1 else axes
  for ax, (title, ylabel, data, kind) in zip(axes, panels):
    if kind == "bar":
      labels = list(data)
      ax.bar(labels, [data[k] for k in labels], color="tab:blue")
      low = min(data.values())
      ax.set_ylim(max(0.0, low - (1.0 - low) * 0.5 - 0.01),
                  max(data.values()) + 0.005)
      for i, k in enumerate(labels):
        ax.text(i, data[k], f"{data[k]:.3f}", ha="center", va="bottom",
                fontsize=8)
    else:
      for label, (xs, ys) in data.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 8 else None,
                markersize=3)
      ax.legend()
      ax.set_xlabel("step")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  PLOTS.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _verdict(met: bool) -> str:
  return "**met**" if met else "**missed**"


def _command(sweep):
  return (f"python -m experiments.launch --sweep={SWEEPS[sweep]} "
          f"--workdir=RUNS/{sweep}")


def _failed(trials):
  failed = [t["name"] for t in trials if t["status"] != "done"]
  return f"\nTrials that did not finish: {', '.join(failed)}.\n" if failed else ""


def render() -> str:
  lines = ["# Results", "",
           "Generated by `python -m experiments.report` from the runs' own "
           "outputs (copied to `experiments/results/`). CPU-only runs "
           "(2 shared cores), sized to finish in minutes each: small models, "
           "short schedules, one seed. `RUNS` below is any scratch directory.",
           ""]
  port = RESULTS / "minilm_port.json"
  if port.exists():
    p = json.loads(port.read_text())
    lines += [
        "## The MiniLM port", "",
        f"`python -m experiments.verify_minilm`: {p['num_texts']} real texts "
        f"(stdlib docstrings and code, up to {p['max_len']} tokens) embedded "
        "by sentence-transformers "
        f"{p['sentence_transformers']} (torch {p['torch']}) and by our Flax "
        f"encoder (jax {p['jax']}, dense attention): max |difference| "
        f"{p['max_abs_diff']:.2e}, min cosine {p['min_cosine']:.7f}.", ""]

  zero = load_trials("minilm_zero_shot")
  zero_by = _by_attention(zero)
  if zero:
    lines += ["## 1. Zero-shot fidelity on the pretrained MiniLM", "",
              "Every attention of all-MiniLM-L6-v2 replaced, no training. "
              "Texts: the docstring -> code retrieval test split (stdlib "
              "modules never trained on; docstrings up to 32 tokens, code up "
              "to 64). Cosine: each text's embedding against the dense "
              "model's (mean and worst over all queries and codes). "
              "Recall@1: each docstring retrieves its function among all "
              "test functions.", "",
              f"Command: `{_command('minilm_zero_shot')}`", "",
              "| attention | density (n/m) | mean cosine to dense | "
              "min cosine | recall@1 | MRR |", "|---|---|---|---|---|---|"]
    for label, trial in zero_by.items():
      m = trial["final"]["metrics"]["test"]
      config = json.loads((RESULTS / "minilm_zero_shot" / trial["name"] /
                           "config.json").read_text())
      att = config["attention"]
      kept = 1.0 if att["kind"] == "dense" else att["n"] / att["m"]
      lines.append(f"| {label} | {kept:.2f} | {m['cosine_to_dense']:.4f} | "
                   f"{m['min_cosine_to_dense']:.4f} | "
                   f"{100 * m['recall_at_1']:.1f} | {m['mrr']:.4f} |")
    lines += [_failed(zero)]
    if "2:4" in zero_by:
      cosine = zero_by["2:4"]["final"]["metrics"]["test"]["cosine_to_dense"]
      lines += [f"Target: 2:4 mean embedding cosine >= 0.99: {cosine:.4f}, "
                f"{_verdict(cosine >= 0.99)}.", ""]
    _plot(PLOTS / "zero_shot.png", [
        ("zero-shot: cosine to dense", "mean cosine",
         {k: t["final"]["metrics"]["test"]["cosine_to_dense"]
          for k, t in zero_by.items()}, "bar"),
        ("zero-shot: recall@1", "recall@1",
         {k: t["final"]["metrics"]["test"]["recall_at_1"]
          for k, t in zero_by.items()}, "bar")])
    lines += ["![zero-shot](results/zero_shot.png)", ""]

  long = load_trials("minilm_zero_shot_long")
  if long:
    lines += ["### Zero-shot fidelity against sequence length", "",
              "The same measurement with code up to 256 tokens, on 200 of "
              "the 500 test pairs (so recall@1 is not comparable across the "
              "two lengths). Cosine per side: docstrings (<= 32 tokens) and "
              "code.", "",
              f"Command: `{_command('minilm_zero_shot_long')}`", "",
              "| attention | code tokens | docstring cosine | code cosine | "
              "recall@1 |", "|---|---|---|---|---|"]
    for sweep, trials in (("minilm_zero_shot", zero), ("minilm_zero_shot_long",
                                                      long)):
      for label, trial in _by_attention(trials).items():
        m = trial["final"]["metrics"]["test"]
        if "query_cosine_to_dense" not in m or label not in ("2:4", "1:2"):
          continue
        config = json.loads((RESULTS / sweep / trial["name"] /
                             "config.json").read_text())
        lines.append(f"| {label} | <= {config['data']['code_len']} | "
                     f"{m['query_cosine_to_dense']:.4f} | "
                     f"{m['code_cosine_to_dense']:.4f} | "
                     f"{100 * m['recall_at_1']:.1f} |")
    lines += [_failed(long)]

  tuned = load_trials("retrieval_finetune")
  tuned_by = _by_attention(tuned)
  if tuned:
    config = json.loads((RESULTS / "retrieval_finetune" / tuned[0]["name"] /
                         "config.json").read_text())
    lines += ["## 2. Finetuning from the dense checkpoint", "",
              f"The pretrained (dense) MiniLM finetuned with each attention "
              f"for {config['num_steps']} steps of {config['batch_size']} "
              f"pairs ({config['num_steps'] * config['batch_size'] // config['data']['max_train_pairs']} "
              f"epochs of {config['data']['max_train_pairs']} training pairs), "
              "contrastive loss with in-batch negatives, AdamW "
              f"lr {config['optimizer']['learning_rate']}; evaluated on the "
              f"same test split as above ({config['data']['max_eval_pairs']} "
              "pairs).", "",
              f"Command: `{_command('retrieval_finetune')}`", "",
              "| attention | recall@1 zero-shot | recall@1 finetuned | "
              "MRR finetuned | cosine to dense (same weights) |",
              "|---|---|---|---|---|"]
    for label, trial in tuned_by.items():
      m = trial["final"]["metrics"]["test"]
      before = zero_by.get(label)
      before = (f"{100 * before['final']['metrics']['test']['recall_at_1']:.1f}"
                if before else "")
      lines.append(f"| {label} | {before} | {100 * m['recall_at_1']:.1f} | "
                   f"{m['mrr']:.4f} | {m['cosine_to_dense']:.4f} |")
    lines += [_failed(tuned)]
    if {"dense", "2:4"} <= tuned_by.keys():
      gap = 100 * (tuned_by["dense"]["final"]["metrics"]["test"]["recall_at_1"]
                   - tuned_by["2:4"]["final"]["metrics"]["test"]["recall_at_1"])
      lines += [f"Target: finetuned 2:4 within 0.5 recall points of dense: "
                f"dense - 2:4 = {gap:+.1f} points, {_verdict(gap <= 0.5)}.",
                ""]
    _plot(PLOTS / "finetune.png", [
        ("finetuning: train loss", "contrastive loss",
         {k: _series(t, "train", "loss") for k, t in tuned_by.items()},
         "line")])
    lines += ["![finetuning](results/finetune.png)", ""]

  for sweep, title, metric, unit, higher_better in (
      ("listops_from_scratch", "ListOps", "accuracy", "accuracy", True),
      ("bytelm_from_scratch", "Byte-level LM on the stdlib sources",
       "bits_per_byte", "bits per byte", False)):
    trials = load_trials(sweep)
    by = _by_attention(trials)
    if not trials:
      continue
    config = json.loads((RESULTS / sweep / trials[0]["name"] /
                         "config.json").read_text())
    model = config["model"]
    lines += [f"## 3. From scratch: {title}", "",
              f"{model['num_layers']} layers, hidden {model['hidden_size']}, "
              f"{model['num_heads']} heads, {config['num_steps']} steps of "
              f"{config['batch_size']} sequences; the same data order for "
              "every attention.", "",
              f"Command: `{_command(sweep)}`", "",
              f"| attention | test {unit} | valid {unit} | test loss | "
              "relative to dense |", "|---|---|---|---|---|"]
    dense = by.get("dense")
    for label, trial in by.items():
      m = trial["final"]["metrics"]
      relative = ""
      if dense:
        d = dense["final"]["metrics"]["test"][metric]
        relative = f"{100 * (m['test'][metric] - d) / d:+.2f}%"
      lines.append(f"| {label} | {m['test'][metric]:.4f} | "
                   f"{m['valid'][metric]:.4f} | {m['test']['loss']:.4f} | "
                   f"{relative} |")
    lines += [_failed(trials)]
    if dense and "2:4" in by:
      d = dense["final"]["metrics"]["test"][metric]
      s = by["2:4"]["final"]["metrics"]["test"][metric]
      worse = (d - s) / d if higher_better else (s - d) / d
      direction = "worse" if worse > 0 else "better"
      lines += [f"Target: 2:4 within 1% of dense ({unit}, relative): 2:4 is "
                f"{100 * abs(worse):.2f}% {direction} than dense, "
                f"{_verdict(worse <= 0.01)}.", ""]
    image = f"{sweep}.png"
    _plot(PLOTS / image, [
        ("train loss", "loss",
         {k: _series(t, "train", "loss") for k, t in by.items()}, "line"),
        (f"valid {unit}", unit,
         {k: _series(t, "valid", metric) for k, t in by.items()}, "line")])
    lines += [f"![{sweep}](results/{image})", ""]

  switched = load_trials("bytelm_dense_to_sparse")
  switched_by = _by_attention(switched)
  if switched:
    config = json.loads((RESULTS / "bytelm_dense_to_sparse" /
                         switched[0]["name"] / "config.json").read_text())
    lines += ["## 3b. Byte-level LM: dense first, then N:M (the DFSS recipe)",
              "",
              "The dense from-scratch byte LM above, continued for "
              f"{config['num_steps']} more steps (fresh AdamW, warm-up "
              f"{config['optimizer']['warmup_steps']}, the batches of steps "
              f"0-{config['num_steps'] - 1} again) with "
              "each attention (`--config.init_from=` the dense run).", "",
              f"Command: `{_command('bytelm_dense_to_sparse')}` (after the "
              "from-scratch sweep, with its dense run at "
              "`runs/sweeps/bytelm_from_scratch`)", "",
              "| attention | test bits per byte | valid bits per byte | "
              "relative to dense |", "|---|---|---|---|"]
    dense = switched_by.get("dense")
    for label, trial in switched_by.items():
      m = trial["final"]["metrics"]
      relative = ""
      if dense:
        d = dense["final"]["metrics"]["test"]["bits_per_byte"]
        relative = f"{100 * (m['test']['bits_per_byte'] - d) / d:+.2f}%"
      lines.append(f"| {label} | {m['test']['bits_per_byte']:.4f} | "
                   f"{m['valid']['bits_per_byte']:.4f} | {relative} |")
    lines += [_failed(switched)]

  lines += ["## More results", "",
            "Measured by their own scripts, each page with its device, date, "
            "command and JSON:", ""]
  lines += [f"- [`results/{name}`](results/{name}): {what}"
            for name, what in FURTHER if (PLOTS / name).exists()]
  lines.append("")
  notes = RESULTS / "NOTES.md"
  if notes.exists():
    lines += [notes.read_text().strip(), ""]
  return "\n".join(lines).replace("\n\n\n", "\n\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default=None,
                      help="directory holding the sweep work dirs")
  args = parser.parse_args(argv)
  if args.runs:
    collect(pathlib.Path(args.runs))
  DOC.write_text(render())
  print(f"wrote {DOC.relative_to(REPO)} and {PLOTS.relative_to(REPO)}/")


if __name__ == "__main__":
  main()
