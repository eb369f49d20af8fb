"""docs/RESULTS.md, its tables and plots, from the sweeps' own outputs.

  python -m experiments.report --runs=RUNS_DIR

copies each sweep's small outputs from `RUNS_DIR/<sweep>/` (results.csv and,
per trial, final_metrics.json, metrics.csv, config.json, status.json; never
checkpoints) into `experiments/results/<sweep>/`, then renders
docs/RESULTS.md and the plots in docs/results/ from those copies only.
Without `--runs` it re-renders from the committed copies. Hand-written notes
in experiments/results/NOTES.md are included verbatim. The GPU byte-LM
section renders the summary JSONs that experiments/sweep_gpu.sh writes for
the bytelm_gpu sweeps (`GPU_SWEEPS`), which `--runs` copies to
`experiments/results/bytelm_gpu/`; without the seeds one it is left out.
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
# experiments/sweep_summary.py's JSONs of the GPU byte-LM sweeps, under
# experiments/results/bytelm_gpu/.
GPU_SWEEPS = {"seeds": "bytelm_gpu_seeds.json",
              "recipe": "bytelm_gpu_recipe.json"}

SWEEPS = {
    "minilm_zero_shot": "experiments/sweeps/minilm_zero_shot.py",
    "minilm_zero_shot_long": "experiments/sweeps/minilm_zero_shot_long.py",
    "retrieval_finetune": "experiments/sweeps/retrieval_finetune.py",
    "listops_from_scratch": "experiments/sweeps/listops_from_scratch.py",
    "bytelm_from_scratch": "experiments/sweeps/bytelm_from_scratch.py",
    "bytelm_dense_to_sparse": "experiments/sweeps/bytelm_dense_to_sparse.py",
}


def collect(runs: pathlib.Path, results: pathlib.Path = RESULTS) -> None:
  """Copies the small per-trial outputs of every sweep found under `runs`
  to `results`, and the GPU sweeps' summary JSONs (`runs/NAME/NAME.json`, as
  experiments/sweep_gpu.sh leaves them in its work dir and in `$OUT`)."""
  for name in GPU_SWEEPS.values():
    source = runs / pathlib.Path(name).stem / name
    if source.is_file():
      (results / "bytelm_gpu").mkdir(parents=True, exist_ok=True)
      shutil.copy(source, results / "bytelm_gpu" / name)
  for sweep in SWEEPS:
    source = runs / sweep
    if not (source / "results.csv").is_file():
      continue  # absent or still running
    target = results / sweep
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
    elif kind == "points":
      # Each label's values side by side, their mean as a bar across them.
      for i, (label, values) in enumerate(data.items()):
        ax.plot([i] * len(values), values, "o", color="tab:blue",
                markersize=4)
        if values:
          mean = sum(values) / len(values)
          ax.plot([i - 0.25, i + 0.25], [mean, mean], color="tab:red")
          ax.text(i + 0.28, mean, f"{mean:.4f}", va="center", fontsize=8)
      ax.set_xticks(range(len(data)), list(data))
      ax.set_xlim(-0.5, len(data) - 0.2)
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
  path.parent.mkdir(parents=True, exist_ok=True)
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


def _percent(value) -> str:
  return "" if value is None else f"{100 * value:+.2f}%"


def _mean_std(stats) -> str:
  if stats["mean"] is None:
    return ""
  std = "" if stats["std"] is None else f" ± {stats['std']:.4f}"
  return f"{stats['mean']:.4f}{std}"


def _min_max(stats) -> str:
  if stats["min"] is None:
    return ""
  return f"{stats['min']:.4f}-{stats['max']:.4f}"


def _gpu_command(summary) -> str:
  """The experiments/sweep_gpu.sh command that runs `summary`'s trials."""
  parts = ["experiments/sweep_gpu.sh", f"--sweep={summary['sweep']}"]
  if summary["parallel"] != 1:
    parts.append(f"--parallel={summary['parallel']}")
  parts += [f"--only {k}={','.join(v)}" for k, v in summary["only"].items()]
  parts += [f"--set {k}={v}" for k, v in summary["overrides"].items()]
  return " ".join(parts)


def _not_done(summary) -> str:
  lines = _failed([{"name": t["trial"], "status": t["status"]}
                   for t in summary["trials"]])
  if summary["stopped_by"]:
    lines += f"\nThe sweep was stopped by {summary['stopped_by']}.\n"
  return lines


def _test_values(summary, group) -> list[float]:
  """The done trials' test bits per byte of one of `summary`'s groups."""
  rows = {t["trial"]: t for t in summary["trials"]}
  return [rows[name]["test_bits_per_byte"] for name in group["trials"]
          if rows[name]["status"] == "done"
          and rows[name]["test_bits_per_byte"] is not None]


def gpu_byte_lm_section(results: pathlib.Path, plots: pathlib.Path) -> list[str]:
  """Section 3c from the `GPU_SWEEPS` JSONs in `results`/bytelm_gpu/, with
  its plot in `plots`; [] without the seeds JSON."""
  directory = results / "bytelm_gpu"
  seeds_path = directory / GPU_SWEEPS["seeds"]
  if not seeds_path.exists():
    return []
  seeds = json.loads(seeds_path.read_text())
  config = seeds["trial_config"]
  model = config["model"]
  groups = seeds["groups"]
  seed_list = sorted({s for g in groups for s in g["seeds"]})
  at_once = ("one trial at a time" if seeds["parallel"] == 1 else
             f"{seeds['parallel']} trials at a time on the one device")
  lines = [
      "## 3c. Byte-level LM at S = 1024 on a GPU: seeds, and dense then N:M",
      "",
      f"The byte LM from scratch on {seeds['device'] or 'an unnamed device'} "
      f"({seeds['written'][:10]}, {at_once}): {model['num_layers']} layers, "
      f"hidden {model['hidden_size']}, {model['num_heads']} heads, "
      f"{model.get('dtype', 'float32')} activations (float32 parameters and "
      f"loss), {config['num_steps']} steps of {config['batch_size']} x "
      f"{config['data']['seq_len']} bytes; seeds "
      f"{', '.join(str(s) for s in seed_list)}, each seed the same "
      "initialisation and batches for every attention. Bits per byte: the "
      "mean ± the sample standard deviation over the seeds, and their range; "
      "per seed, the difference to that seed's dense run.", "",
      f"Command: `{_gpu_command(seeds)}`", "",
      "| attention | seeds | test bits/byte | test min-max | valid bits/byte "
      "| valid min-max | test vs dense | test vs dense, per seed |",
      "|---|---|---|---|---|---|---|---|"]
  for group in groups:
    per_seed = ", ".join(f"{seed}: {_percent(value)}" for seed, value in
                         group["test_relative_by_seed"].items())
    lines.append(
        f"| {group['attention']} | {len(group['seeds'])} | "
        f"{_mean_std(group['test'])} | {_min_max(group['test'])} | "
        f"{_mean_std(group['valid'])} | {_min_max(group['valid'])} | "
        f"{_percent(group['relative_to_dense']['test'])} | {per_seed} |")
  lines += [_not_done(seeds)]
  by_label = {g["attention"]: g for g in groups}
  if ({"dense", "2:4"} <= by_label.keys()
      and by_label["2:4"]["relative_to_dense"]["test"] is not None):
    worse = by_label["2:4"]["relative_to_dense"]["test"]
    dense = by_label["dense"]["test"]
    direction = "worse" if worse > 0 else "better"
    spread = ("" if dense["std"] is None else
              f" Dense's own spread over its seeds: std {dense['std']:.4f} "
              f"({100 * dense['std'] / dense['mean']:.2f}% of its mean), "
              f"range {dense['max'] - dense['min']:.4f}.")
    lines += [f"Target: 2:4 within 1% of dense (test bits per byte, mean "
              f"over {dense['n']} seeds): 2:4 is {100 * abs(worse):.2f}% "
              f"{direction} than dense, {_verdict(worse <= 0.01)}.{spread}",
              ""]
  panels = [("from scratch: test bits per byte, each seed", "bits per byte",
             {g["attention"]: _test_values(seeds, g) for g in groups},
             "points")]

  recipe_path = directory / GPU_SWEEPS["recipe"]
  if recipe_path.exists():
    recipe = json.loads(recipe_path.read_text())
    rconfig = recipe["trial_config"]
    seed = rconfig["seed"]
    scratch = {t["attention"]: t["test_bits_per_byte"] for t in seeds["trials"]
               if t["seed"] == seed and t["status"] == "done"}
    lines += [
        "### Dense first, then N:M (the DFSS recipe)", "",
        f"The dense run `{pathlib.PurePosixPath(rconfig['init_from']).name}` "
        f"above continued for {rconfig['num_steps']} more steps with each "
        "attention (its parameters, a fresh AdamW with "
        f"{rconfig['optimizer']['warmup_steps']} warm-up steps). The dense "
        "continuation is the control.", "",
        f"Command: `{_gpu_command(recipe)}` (after the seeds sweep)", "",
        "| attention | test bits/byte | valid bits/byte | vs the dense "
        f"continuation | from scratch, seed {seed}: test bits/byte |",
        "|---|---|---|---|---|"]
    for group in recipe["groups"]:
      from_scratch = scratch.get(group["attention"])
      lines.append(
          f"| {group['attention']} | {_mean_std(group['test'])} | "
          f"{_mean_std(group['valid'])} | "
          f"{_percent(group['relative_to_dense']['test'])} | "
          f"{'' if from_scratch is None else f'{from_scratch:.4f}'} |")
    lines += [_not_done(recipe)]
    panels.append(("dense, then each attention: test bits per byte",
                   "bits per byte",
                   {g["attention"]: _test_values(recipe, g)
                    for g in recipe["groups"]}, "points"))
  _plot(plots / "bytelm_gpu.png", panels)
  return lines + ["![bytelm_gpu](results/bytelm_gpu.png)", ""]


def render() -> str:
  gpu = gpu_byte_lm_section(RESULTS, PLOTS)
  lines = ["# Results", "",
           "Generated by `python -m experiments.report` from the runs' own "
           "outputs (copied to `experiments/results/`). CPU-only runs "
           "(2 shared cores), sized to finish in minutes each: small models, "
           "short schedules, one seed. `RUNS` below is any scratch directory."
           + (" Section 3c ran on a GPU, with several seeds; it says where."
              if gpu else ""),
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

  lines += gpu
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
