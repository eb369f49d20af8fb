"""SpAtten measurements: cascade token pruning on MiniLM, KV eviction on the byte LM.

  python -m experiments.spatten [--out=experiments/results/spatten] \
      [--plot=docs/results/spatten.png] [--workdir=runs/spatten] \
      [--pairs=500] [--latency_len=512] [--bytelm_steps=1500]

Three measurements, all on the CPU, each written as JSON to `--out`:

* `minilm.json`: the pretrained all-MiniLM-L6-v2 on the stdlib docstring ->
  code retrieval test split (`experiments.tasks.RetrievalTask`, zero-shot),
  with cascade token pruning (`TransformerConfig.token_keep`, [CLS] pinned,
  mean over the kept tokens) at several keep schedules, dense and 2:4: the
  embedding cosine to the unpruned dense model, recall@1 / MRR, the queries
  that flip against the unpruned dense model, and the analytic FLOPs.
* `latency.json`: median CPU wall time of the jitted sentence encoder at
  `--latency_len` tokens per schedule and attention kind, same process.
* `bytelm.json`: a small byte-level `Decoder` trained here
  (`experiments.train`, checkpoint in `--workdir`), then bits per byte on
  held-out windows under cached decoding with a KV budget, evicting by
  cumulative importance or the oldest entry (`decode_logits`).

A schedule is named by its shape and the fraction of the input's tokens the
last layer runs on (`keep_schedule`); the last layer itself prunes nothing,
so the pooled tokens are the ones it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib

import jax
import numpy as np
import optax

from experiments import tasks, train
from experiments.bench import timing
from experiments.configs import bytelm as bytelm_config
from experiments.configs import retrieval as retrieval_config
from experiments.data import minilm
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import (Decoder, SentenceEncoder,
                                            TransformerConfig, decode_logits)
from nmattn import pruning

SCHEDULE_SHAPES = ("linear", "early")
DENSE = AttentionSpec("dense")
NM24 = AttentionSpec("nm", 2, 4)


def keep_schedule(num_layers: int, final_keep: float,
                  shape: str = "linear") -> tuple[float, ...]:
  """A `TransformerConfig.token_keep` whose last layer runs on `final_keep` of the tokens.

  `"linear"`: after each of the first `num_layers - 1` layers the kept ratio
  falls by an equal step, from 1 (the first layer sees every token) to
  `final_keep` (the tokens the last layer runs on); `"early"`: all of the
  pruning right after the first layer. The last entry repeats the one
  before it, so the last layer prunes nothing and pooling averages the
  tokens it ran on.
  """
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or (
      num_layers < 2):
    raise ValueError(f"num_layers must be an int >= 2 (the first layer sees "
                     f"every token); got num_layers={num_layers!r}")
  if not 0.0 < final_keep <= 1.0:
    raise ValueError(f"final_keep must be in (0, 1]; got final_keep="
                     f"{final_keep!r}")
  if shape not in SCHEDULE_SHAPES:
    raise ValueError(f"shape must be one of {SCHEDULE_SHAPES}; got "
                     f"shape={shape!r}")
  steps = num_layers - 1
  if shape == "linear":
    ratios = [round(1.0 - (1.0 - final_keep) * (i + 1) / steps, 6)
              for i in range(steps)]
  else:
    ratios = [float(final_keep)] * steps
  return tuple(ratios) + (ratios[-1],)


def layer_lengths(num_layers: int, length: int,
                  schedule: tuple = ()) -> tuple[int, ...]:
  """Tokens each encoder layer runs on for an input of `length` (static) tokens."""
  if not schedule:
    return (length,) * num_layers
  counts = pruning.keep_counts(schedule, length)
  return ((length,) + counts)[:num_layers]


def encoder_flops(config: TransformerConfig, length: int,
                  schedule: tuple = ()) -> dict[str, float]:
  """FLOPs (2 per multiply-add) of one sequence through the encoder layers.

  Per layer at `s` tokens, hidden `d`, MLP `f`: the Q, K, V and output
  projections `8 s d^2`, scores and probabilities times values `4 s^2 d`,
  the MLP `4 s d f` (embeddings, norms and softmax left out). "forward" is
  the layers at the schedule's lengths (dense-equivalent: the xla backend
  computes every score of a 2:4 row too); "importance" is what the
  encoder's key importance adds as it runs here, recomputing Q, K and the
  scores of every layer up to the last one that prunes
  (`4 s d^2 + 2 s^2 d` each); a fused kernel output (the Triton forward's)
  would add almost none of it.
  """
  d, f = config.hidden_size, config.mlp_size
  sizes = layer_lengths(config.num_layers, length, schedule)
  forward = sum(8 * s * d * d + 4 * s * s * d + 4 * s * d * f for s in sizes)
  importance = 0.0
  if schedule:
    counts = pruning.keep_counts(schedule, length)
    pruned = [i for i in range(config.num_layers) if counts[i] < sizes[i]]
    importance = sum(4 * s * d * d + 2 * s * s * d
                     for s in sizes[:max(pruned, default=-1) + 1])
  return {"forward": float(forward), "importance": float(importance)}


def _spec_name(attention: AttentionSpec) -> str:
  return "dense" if attention.kind == "dense" else f"{attention.n}:{attention.m}"


def embed(apply, params, tokens: np.ndarray, mask: np.ndarray,
          batch_size: int) -> np.ndarray:
  """Sentence embeddings `[num, hidden]` from `apply`, a jitted `SentenceEncoder.apply`.

  Batches of `batch_size` rows; the last is filled up with copies of the
  first row (dropped after), so one shape is compiled.
  """
  num = len(tokens)
  fill = -num % batch_size
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], fill, 0)])
  mask = np.concatenate([mask, np.repeat(mask[:1], fill, 0)])
  out = [np.asarray(apply({"params": params}, tokens[i:i + batch_size],
                          mask[i:i + batch_size]))
         for i in range(0, len(tokens), batch_size)]
  return np.concatenate(out)[:num]


def _real_tokens_kept(mask: np.ndarray, last_layer_tokens: int) -> float:
  """Mean fraction of each input's real tokens that the last layer runs on.

  Padding is never kept over a real token, so an input of `v` real tokens
  keeps `min(v, last_layer_tokens)` of them.
  """
  valid = mask.sum(-1)
  return float(np.mean(np.minimum(valid, last_layer_tokens) / valid))


def encoder_fidelity(config: TransformerConfig, params, inputs: dict,
                     runs, batch_size: int = 100,
                     pooling: str = "kept") -> list[dict]:
  """Retrieval and embedding fidelity of pruned encoders against the unpruned dense one.

  Args:
    config: the encoder's `TransformerConfig` without pruning.
    params: `SentenceEncoder` params (`{"encoder": ...}`).
    inputs: `query_tokens`, `query_mask`, `code_tokens`, `code_mask` (the
      retrieval task's split: query `i`'s answer is code `i`).
    runs: `(name, attention, schedule)` triples; `schedule` is a
      `token_keep` (`()`: unpruned).
    batch_size: rows per jitted call.
    pooling: the pruned runs' `TransformerConfig.token_pooling`: "kept" (the
      mean over the tokens the last layer ran on) or "scattered" (over every
      valid token, in its state when removed).

  Returns:
    One dict per run: recall@k and MRR (`tasks.retrieval_metrics`), the mean
    and min embedding cosine to the unpruned dense model over queries and
    codes, `gained` / `lost` (queries right here but wrong there, and the
    reverse), per side the static layer lengths, the FLOPs
    (`encoder_flops`) and the fraction of real tokens the last layer ran on.
  """
  def embeddings(attention, schedule):
    pruned = dataclasses.replace(config, token_keep=tuple(schedule),
                                 token_pooling=pooling)
    apply = jax.jit(SentenceEncoder(pruned, attention).apply)
    return {side: embed(apply, params, inputs[f"{side}_tokens"],
                        inputs[f"{side}_mask"], batch_size)
            for side in ("query", "code")}

  def correct(similarity):
    return np.sum(similarity > np.diag(similarity)[:, None], axis=-1) == 0

  reference = embeddings(DENSE, ())
  reference_correct = correct(reference["query"] @ reference["code"].T)
  results = []
  for name, attention, schedule in runs:
    emb = embeddings(attention, schedule)
    similarity = emb["query"] @ emb["code"].T
    cosine = np.concatenate([np.sum(emb[s] * reference[s], -1)
                             for s in ("query", "code")])
    right = correct(similarity)
    sides = {}
    for side in ("query", "code"):
      length = inputs[f"{side}_tokens"].shape[-1]
      lengths = layer_lengths(config.num_layers, length, schedule)
      sides[side] = {
          "length": length, "layer_lengths": list(lengths),
          "flops": encoder_flops(config, length, schedule),
          "real_tokens_kept_by_last_layer": _real_tokens_kept(
              inputs[f"{side}_mask"], lengths[-1])}
    results.append({
        "name": name, "attention": _spec_name(attention),
        "schedule": list(schedule), "pooling": pooling,
        **tasks.retrieval_metrics(similarity),
        "queries": len(right),
        "cosine_to_dense": float(np.mean(cosine)),
        "min_cosine_to_dense": float(np.min(cosine)),
        "gained": int(np.sum(right & ~reference_correct)),
        "lost": int(np.sum(~right & reference_correct)), **sides})
  return results


def encoder_latency(config: TransformerConfig, params, tokens: np.ndarray,
                    mask: np.ndarray, runs, repeats: int = 5) -> list[dict]:
  """Median seconds of the jitted `SentenceEncoder` on one batch, per run.

  `runs` as in `encoder_fidelity`; every run is compiled and warmed up
  first, then timed `repeats` times in the same process.
  """
  results = []
  for name, attention, schedule in runs:
    pruned = dataclasses.replace(config, token_keep=tuple(schedule))
    apply = jax.jit(SentenceEncoder(pruned, attention).apply)
    seconds = timing.median_seconds(apply, {"params": params}, tokens, mask,
                                    warmup=2, iters=repeats)
    results.append({
        "name": name, "attention": _spec_name(attention),
        "schedule": list(schedule), "batch": int(tokens.shape[0]),
        "length": int(tokens.shape[1]), "seconds": seconds,
        "layer_lengths": list(layer_lengths(config.num_layers,
                                            tokens.shape[1], schedule)),
        "flops": encoder_flops(config, tokens.shape[1], schedule)})
  return results


def _bits(losses) -> float:
  return float(np.mean(losses) / math.log(2))


def kv_budget_bits_per_byte(params, config: TransformerConfig,
                            attention: AttentionSpec, windows: np.ndarray,
                            budgets, policies=pruning.EVICTION_POLICIES,
                            tolerance: float = 1e-4) -> dict:
  """Bits per byte of a `Decoder` under cached decoding with a KV budget.

  Args:
    params, config, attention: the `Decoder`'s.
    windows: int `[num, len + 1]` held-out bytes; each predicts its last
      `len` bytes from the ones before.
    budgets: KV cache sizes, each below `len`.
    policies: eviction policies (`nmattn.pruning.EVICTION_POLICIES`).
    tolerance: largest allowed difference in bits per byte between the
      `Decoder`'s forward pass and cached decoding with a budget of `len`
      (they compute the same thing); beyond it a RuntimeError, not a result.

  Returns:
    `full_bits_per_byte` (the forward pass), `cached_full_budget_bits_per_byte`
    and per (budget, policy) `bits_per_byte` over every position and
    `bits_per_byte_past_budget` over the positions at or after `budget`
    (the earlier ones see the whole prefix under every policy), beside
    `full_bits_per_byte_past_budget`, the forward pass's over the same ones.
  """
  inputs, targets = windows[:, :-1], windows[:, 1:]
  length = inputs.shape[-1]
  for budget in budgets:
    if not 1 <= budget < length:
      raise ValueError(f"budgets must be in [1, {length}) (below the window "
                       f"length); got budget={budget!r}")

  def losses(logits):
    return np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        logits, targets))

  full = losses(jax.jit(Decoder(config, attention).apply)(
      {"params": params}, inputs))
  cached = losses(decode_logits(params, inputs, config=config,
                                attention=attention, budget=length))
  if abs(_bits(full) - _bits(cached)) > tolerance:
    raise RuntimeError(
        f"cached decoding with budget {length} gives {_bits(cached)} bits per "
        f"byte against the forward pass's {_bits(full)}; they must agree "
        f"within tolerance={tolerance}")
  rows = []
  for budget in budgets:
    for policy in policies:
      evicted = losses(decode_logits(params, inputs, config=config,
                                     attention=attention, budget=budget,
                                     policy=policy))
      rows.append({"budget": int(budget), "policy": policy,
                   "bits_per_byte": _bits(evicted),
                   "bits_per_byte_past_budget": _bits(evicted[:, budget:]),
                   "full_bits_per_byte_past_budget": _bits(full[:, budget:])})
  return {"windows": int(len(windows)), "length": int(length),
          "attention": _spec_name(attention),
          "full_bits_per_byte": _bits(full),
          "cached_full_budget_bits_per_byte": _bits(cached), "rows": rows}


def minilm_runs(num_layers: int, final_keeps=(0.7, 0.5, 0.3),
                early_keeps=(0.5,), attentions=(DENSE, NM24)):
  """`(name, attention, schedule)` for each attention: unpruned, then each schedule."""
  schedules = [("unpruned", ())]
  schedules += [(f"linear {k:.0%}", keep_schedule(num_layers, k, "linear"))
                for k in final_keeps]
  schedules += [(f"early {k:.0%}", keep_schedule(num_layers, k, "early"))
                for k in early_keeps]
  return [(f"{_spec_name(a)} {name}", a, schedule)
          for a in attentions for name, schedule in schedules]


def measure_minilm(pairs: int, latency_len: int, latency_batch: int,
                   repeats: int) -> tuple[list[dict], list[dict]]:
  """The MiniLM fidelity (test split, `pairs` pairs) and latency measurements."""
  config = retrieval_config.get_config()
  config.num_steps = 0
  config.data.max_train_pairs = 1
  config.data.max_eval_pairs = pairs
  task = tasks.RetrievalTask(config)
  params = task.init_params(None)
  model_config = dataclasses.replace(task.model_config, dropout_rate=0.0)
  runs = minilm_runs(model_config.num_layers)
  fidelity = encoder_fidelity(model_config, params, task.inputs["test"], runs)
  scattered = [(f"{name} scattered", attention, schedule)
               for name, attention, schedule in minilm_runs(
                   model_config.num_layers, final_keeps=(0.5,), early_keeps=())
               if schedule]
  fidelity += encoder_fidelity(model_config, params, task.inputs["test"],
                               scattered, pooling="scattered")

  long_config = minilm.transformer_config(latency_len)
  long_params = {"encoder": minilm.encoder_params(long_config)}
  codes = [p.document for p in task.pairs["test"][:latency_batch]]
  tokens, mask = minilm.Tokenizer(latency_len)(codes)
  latency_runs = minilm_runs(model_config.num_layers, final_keeps=(0.5, 0.3),
                             early_keeps=())
  latency = encoder_latency(long_config, long_params, tokens, mask,
                            latency_runs, repeats)
  return fidelity, latency


def measure_bytelm(workdir: pathlib.Path, num_steps: int, windows: int,
                   budgets) -> dict:
  """Trains (or resumes) the small dense byte LM in `workdir`; its KV-budget bits per byte."""
  config = bytelm_config.get_config()
  config.model.update(hidden_size=128, num_heads=4, mlp_size=256, num_layers=2)
  config.data.update(seq_len=128, eval_windows=windows)
  config.batch_size = 16
  config.num_steps = num_steps
  config.optimizer.update(learning_rate=2e-3, warmup_steps=num_steps // 10)
  config.eval_every = 0
  config.checkpoint_every = 0
  config.final_eval_splits = ("valid",)
  summary = train.train_and_evaluate(config, workdir)
  task = tasks.build(config)
  held_out = task.eval_inputs("test")["bytes"]
  result = kv_budget_bits_per_byte(summary["state"]["params"],
                                   task.model.config, task.model.attention,
                                   held_out, budgets)
  return {"train_steps": num_steps, "model": config.model.to_dict(),
          "valid_bits_per_byte": summary["metrics"]["valid"]["bits_per_byte"],
          "train_seconds": summary["train_seconds_this_session"],
          "split": "test", **result}


def plot(fidelity: list[dict], bytelm: dict, path: pathlib.Path) -> None:
  """Recall@1 and cosine against tokens kept (MiniLM), bits per byte against budget."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for attention, marker in (("dense", "o"), ("2:4", "s")):
    for pooling, line in (("kept", "-"), ("scattered", "")):
      rows = [r for r in fidelity if r["attention"] == attention
              and r["pooling"] == pooling and "early" not in r["name"]]
      kept = [r["code"]["layer_lengths"][-1] / r["code"]["length"]
              for r in rows]
      label = f"{attention}, linear schedules, {pooling} pooling"
      axes[0].plot(kept, [100 * r["recall_at_1"] for r in rows], line,
                   marker=marker, label=label)
      axes[1].plot(kept, [r["cosine_to_dense"] for r in rows], line,
                   marker=marker, label=label)
  unpruned = next(r for r in fidelity if r["name"] == "dense unpruned")
  axes[0].axhspan(100 * unpruned["recall_at_1"] - 1,
                  100 * unpruned["recall_at_1"] + 1, color="0.9",
                  label="unpruned dense +- 1 point")
  axes[0].set(xlabel="fraction of tokens the last layer runs on",
              ylabel="recall@1 (%)",
              title=f"MiniLM retrieval, {unpruned['queries']} queries")
  axes[1].set(xlabel="fraction of tokens the last layer runs on",
              ylabel="mean cosine to unpruned dense",
              title="MiniLM embedding fidelity")
  for policy in pruning.EVICTION_POLICIES:
    rows = [r for r in bytelm["rows"] if r["policy"] == policy]
    axes[2].plot([r["budget"] for r in rows],
                 [r["bits_per_byte_past_budget"] for r in rows], marker="o",
                 label=f"evict by {policy}")
  axes[2].axhline(bytelm["full_bits_per_byte"], color="k", ls="--",
                  label="full cache")
  axes[2].set(xscale="log", xlabel="KV cache budget (entries)",
              ylabel="bits per byte (positions >= budget)",
              title=f"byte LM, {bytelm['windows']} x {bytelm['length']} bytes")
  budgets = sorted({r["budget"] for r in bytelm["rows"]})
  axes[2].set_xticks(budgets, [str(b) for b in budgets])
  axes[2].minorticks_off()
  for axis in axes:
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)


def _write(out: pathlib.Path, name: str, data) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / name).write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path("experiments/results/spatten"))
  parser.add_argument("--plot", type=pathlib.Path,
                      default=pathlib.Path("docs/results/spatten.png"))
  parser.add_argument("--workdir", type=pathlib.Path,
                      default=pathlib.Path("runs/spatten/bytelm"))
  parser.add_argument("--pairs", type=int, default=500)
  parser.add_argument("--latency_len", type=int, default=512)
  parser.add_argument("--latency_batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--bytelm_steps", type=int, default=1500)
  parser.add_argument("--windows", type=int, default=64)
  parser.add_argument("--budgets", type=lambda s: [int(b) for b in s.split(",")],
                      default=[8, 16, 32, 64])
  args = parser.parse_args(argv)
  fidelity, latency = measure_minilm(args.pairs, args.latency_len,
                                     args.latency_batch, args.repeats)
  _write(args.out, "minilm.json", fidelity)
  _write(args.out, "latency.json",
         {"device": jax.devices()[0].device_kind, "runs": latency})
  bytelm = measure_bytelm(args.workdir, args.bytelm_steps, args.windows,
                          args.budgets)
  _write(args.out, "bytelm.json", bytelm)
  plot(fidelity, bytelm, args.plot)


if __name__ == "__main__":
  main()
