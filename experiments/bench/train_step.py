"""End-to-end speed of the experiments' models: training step and prefill per attention kind.

  python -m experiments.bench.train_step [--sizes=2048,4096,8192,16384] \
      [--tokens=32768] [--kinds=cudnn,nm,dense,topk_blocks,none] \
      [--models=decoder,encoder] [--json=PATH] [--profile] [--trace=DIR]
  python -m experiments.bench.train_step --quick    # tiny sizes, runs on a CPU

For each model (the experiments' causal `Decoder`, and the `SequenceClassifier`
encoder), sequence length S and attention kind, in one process on the same
inputs: the training step (forward, backward, AdamW update of
`experiments.train.make_optimizer`) and the forward alone (prefill), each
compiled, warmed up and timed as the median of many synchronised calls
(`experiments.bench.timing.median_seconds`). The batch is `tokens // S`, so
every length processes the same number of tokens. Defaults: 4 layers,
hidden 2048, 16 heads, MLP 8192, bf16 compute with float32 parameters and
optimizer state (the parameters are cast inside the step).

Kinds: "cudnn" (`jax.nn.dot_product_attention`, cuDNN; GPU only, skipped
elsewhere with the reason in the output), "nm" 2:4 (`implementation=None`:
the fastest nmattn kernel for the device), "dense" (nmattn with n == m),
"topk_blocks", hierarchical: 2:4 inside a `nmattn.patterns.topk_blocks`
pattern of each layer's own q and k (blocks of `Sizes.pattern_block`,
`PATTERN_DENSITY` of the key blocks per query block, a dense band and sink;
for the decoder causal and chosen from earlier positions only, as the
long-context byte LM trains it), and
"none", the attention-free ablation: every attention layer replaced by the
identity (a Flax method interceptor returns the layer's input, so its
projections go too).

Where the step's time goes, two ways:
- by ablation, every row:
    attention   = step - step of kind "none" at the same model and S;
    optimizer   = step - gradient alone (forward + backward, no update);
    rest        = step - attention - optimizer (matmuls of the MLP and
                  projections, norms, embeddings, loss).
  XLA fuses each variant on its own, so these are differences of real
  timings, not a partition of one;
- from a profile, with `--profile`: a `jax.profiler` trace of a few steps of
  the same step compiled without CUDA graphs, each op's time filed by the
  model part and pass its name stack names (`experiments.bench.profile`).
  This one is a partition of one step: the parts sum to the summed op time,
  printed beside the traced copy's own step time. `--trace=DIR` keeps the
  traces for TensorBoard or Perfetto, and each traced step's HLO, which
  `tools.hlo_fusion` reads to show what an instruction the profile names
  holds.

The models are the experiments' own: the decoder's attention masks later keys
through `is_causal` (no mask array); the encoder's gets the materialised
padding mask `[batch, 1, S, S]` that `experiments.models.transformer` builds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from experiments import train
from experiments.bench import profile as bench_profile
from experiments.bench import timing
from experiments.configs import common
from experiments.models.attention import AttentionSpec
from experiments.models.transformer import (Decoder, SequenceClassifier,
                                            TransformerConfig)
from nmattn import patterns

KINDS = ("cudnn", "nm", "dense", "topk_blocks", "none")
PATTERN_DENSITY = 0.25  # key blocks kept per query block by "topk_blocks"
MODELS = ("decoder", "encoder")
NUM_CLASSES = 10  # the encoder's classification head


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Model and run sizes of one benchmark invocation."""
  hidden_size: int = 2048
  num_heads: int = 16
  mlp_size: int = 8192
  num_layers: int = 4
  vocab_size: int = 256
  pattern_block: int = 128  # "topk_blocks": the Triton and Hopper tile
  dtype: str = "bfloat16"
  warmup: int = 3
  iters: int = 20


QUICK = Sizes(hidden_size=64, num_heads=2, mlp_size=128, num_layers=1,
              pattern_block=16, warmup=1, iters=3)


def _identity_attention(next_fun, args, kwargs, context):
  """Flax interceptor: every attention layer returns its query input."""
  if (isinstance(context.module, nn.MultiHeadDotProductAttention)
      and context.method_name == "__call__"):
    return args[0] if args else kwargs["inputs_q"]
  return next_fun(*args, **kwargs)


def _attention_spec(kind: str, model_name: str, block: int) -> AttentionSpec:
  if kind == "topk_blocks":
    causal = model_name == "decoder"
    pattern = functools.partial(
        patterns.topk_blocks, block_q=block, block_k=block,
        density=PATTERN_DENSITY, is_causal=causal, autoregressive=causal)
    return AttentionSpec("pattern", 2, 4, block_pattern=pattern)
  return AttentionSpec("dense" if kind == "none" else kind, 2, 4)


class Bench:
  """The jitted training step, gradient and forward of one (model, kind, S)."""

  def __init__(self, model_name: str, kind: str, seq_len: int, batch: int,
               sizes: Sizes, seed: int = 0):
    config = TransformerConfig(
        vocab_size=sizes.vocab_size, max_len=seq_len,
        hidden_size=sizes.hidden_size, num_heads=sizes.num_heads,
        mlp_size=sizes.mlp_size, num_layers=sizes.num_layers)
    spec = _attention_spec(kind, model_name, sizes.pattern_block)
    self.model_name, self.kind = model_name, kind
    build = (functools.partial(Decoder, config) if model_name == "decoder" else
             functools.partial(SequenceClassifier, config,
                               num_classes=NUM_CLASSES))
    self.model = build(spec)
    # Every kind has the same parameter tree; initialised in float32 through
    # the dense kind, since "cudnn" takes 16-bit activations only.
    self.init_model = build(AttentionSpec("dense", 2, 4))
    self.dtype = jnp.dtype(sizes.dtype)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, sizes.vocab_size, (batch, seq_len + 1)),
                         jnp.int32)
    self.batch = {"tokens": tokens,
                  "labels": jnp.asarray(rng.integers(0, NUM_CLASSES, batch),
                                        jnp.int32)}
    with self._attention_context():
      self.params = jax.jit(self._init)(jax.random.key(seed), self.batch)
    optimizer_config = common.base_config("bench", "bench")
    self.tx, _ = train.make_optimizer(optimizer_config)
    self.opt_state = jax.jit(self.tx.init)(self.params)

  def _attention_context(self):
    if self.kind == "none":
      return nn.intercept_methods(_identity_attention)
    return contextlib.nullcontext()

  def _apply(self, params, batch):
    """Logits in float32 from parameters cast to the compute dtype."""
    params = jax.tree.map(lambda p: p.astype(self.dtype), params)
    if self.model_name == "decoder":
      logits = self.model.apply({"params": params}, batch["tokens"][:, :-1])
    else:
      tokens = batch["tokens"][:, :-1]
      logits = self.model.apply({"params": params}, tokens,
                                jnp.ones(tokens.shape, bool))
    return logits.astype(jnp.float32)

  def _init(self, rng, batch):
    tokens = batch["tokens"][:1, :-1]
    if self.model_name == "decoder":
      return self.init_model.init(rng, tokens)["params"]
    return self.init_model.init(rng, tokens,
                                jnp.ones(tokens.shape, bool))["params"]

  def loss(self, params, batch):
    logits = self._apply(params, batch)
    if self.model_name == "decoder":
      labels = batch["tokens"][:, 1:]
    else:
      labels = batch["labels"]
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()

  def train_step(self, params, opt_state, batch):
    loss, grads = jax.value_and_grad(self.loss)(params, batch)
    with jax.named_scope("optimizer"):  # a part of its own in a profile
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  def compile_train_step(self, compiler_options=None):
    with self._attention_context():
      return jax.jit(self.train_step).lower(
          self.params, self.opt_state, self.batch).compile(compiler_options)

  def functions(self):
    """Compiled (train_step, gradient, forward), traced with this kind's attention."""

    def gradient(params, batch):
      return jax.value_and_grad(self.loss)(params, batch)

    def forward(params, batch):
      return self._apply(params, batch)

    with self._attention_context():
      # Lowered here so the interceptor is active while tracing.
      others = tuple(jax.jit(f).lower(self.params, self.batch).compile()
                     for f in (gradient, forward))
    return (self.compile_train_step(),) + others


def measure(model_name, kind, seq_len, batch, sizes, profile=False,
            trace_dir=None) -> dict:
  """One row: step, gradient and forward times of (model, kind, S); with
  `profile`, also the step's time by part and pass from a trace
  (`experiments.bench.profile`), whose files stay in `trace_dir` if given."""
  bench = Bench(model_name, kind, seq_len, batch, sizes)
  train_step, gradient, forward = bench.functions()
  args = {"step": (bench.params, bench.opt_state, bench.batch),
          "gradient": (bench.params, bench.batch),
          "forward": (bench.params, bench.batch)}
  _, _, loss = train_step(*args["step"])
  loss = float(loss)
  if not np.isfinite(loss):
    raise FloatingPointError(f"{model_name} {kind} S={seq_len}: training loss "
                             f"is {loss}; no timing to report")
  seconds = {}
  for name, fn in (("step", train_step), ("gradient", gradient),
                   ("forward", forward)):
    seconds[name] = timing.median_seconds(fn, *args[name], warmup=sizes.warmup,
                                          iters=sizes.iters)
  profiled = {}
  if profile:
    # A copy without CUDA graphs, so the trace names every instruction; its
    # own step time says what that costs.
    traced = bench.compile_train_step(bench_profile.NO_COMMAND_BUFFERS)
    profiled["profile"] = bench_profile.profile_compiled(
        traced, args["step"], trace_dir=(
            None if trace_dir is None else
            pathlib.Path(trace_dir) / f"{model_name}_{kind}_{seq_len}"))
    profiled["profile"]["step_ms"] = 1e3 * timing.median_seconds(
        traced, *args["step"], warmup=sizes.warmup, iters=sizes.iters)
  tokens = batch * seq_len
  return profiled | {"model": model_name, "kind": kind, "seq_len": seq_len,
          "batch": batch, "loss": loss,
          "step_ms": 1e3 * seconds["step"],
          "gradient_ms": 1e3 * seconds["gradient"],
          "forward_ms": 1e3 * seconds["forward"],
          "train_tokens_per_s": tokens / seconds["step"],
          "prefill_tokens_per_s": tokens / seconds["forward"],
          "optimizer_ms": 1e3 * (seconds["step"] - seconds["gradient"])}


def add_breakdown(rows: list[dict]) -> None:
  """Attention and rest per row, against kind "none" at the same model and S;
  and each kind's speed against cudnn's."""
  by_key = {(r["model"], r["seq_len"], r["kind"]): r for r in rows
            if "step_ms" in r}
  for row in rows:
    if "step_ms" not in row:
      continue
    none = by_key.get((row["model"], row["seq_len"], "none"))
    if none is not None and row["kind"] != "none":
      row["attention_ms"] = row["step_ms"] - none["step_ms"]
      row["rest_ms"] = row["step_ms"] - row["attention_ms"] - row["optimizer_ms"]
    cudnn = by_key.get((row["model"], row["seq_len"], "cudnn"))
    if cudnn is not None:
      row["train_x_cudnn"] = cudnn["step_ms"] / row["step_ms"]
      row["prefill_x_cudnn"] = cudnn["forward_ms"] / row["forward_ms"]


def table(rows: list[dict]) -> str:
  """The rows as a fixed-width text table."""
  width = max(len(kind) for kind in KINDS)
  header = (f"{'model':8} {'kind':{width}} {'S':>6} {'B':>3} {'step ms':>9} "
            f"{'train tok/s':>12} {'prefill ms':>10} {'prefill tok/s':>13} "
            f"{'attn ms':>8} {'optim ms':>8} {'rest ms':>8} {'x cudnn':>7}")
  lines = [header]
  fmt = lambda row, key, spec: (format(row[key], spec) if key in row
                                else format("-", f">{spec.split('.')[0]}"))
  for row in rows:
    if "skipped" in row:
      lines.append(f"{row['model']:8} {row['kind']:{width}} {row['seq_len']:>6} "
                   f"{row['batch']:>3} skipped: {row['skipped']}")
      continue
    lines.append(
        f"{row['model']:8} {row['kind']:{width}} {row['seq_len']:>6} "
        f"{row['batch']:>3} {row['step_ms']:9.2f} "
        f"{row['train_tokens_per_s']:12.4g} {row['forward_ms']:10.2f} "
        f"{row['prefill_tokens_per_s']:13.4g} {fmt(row, 'attention_ms', '8.2f')} "
        f"{row['optimizer_ms']:8.2f} {fmt(row, 'rest_ms', '8.2f')} "
        f"{fmt(row, 'train_x_cudnn', '7.2f')}")
  return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
  """Per profiled row: ms per step of each part, forward + backward + update,
  then the traced copy's summed op time against its step time; below, the
  largest instruction of each part that takes over a tenth of the op time."""
  width = max(len(kind) for kind in KINDS)
  names = [part.replace("attention ", "attn ") for part in
           bench_profile.PARTS]
  lines = [f"{'model':8} {'kind':{width}} {'S':>6} "
           + " ".join(f"{name:>12}" for name in names)
           + f" {'ops ms':>8} {'step ms':>8}"]
  largest = ["largest instruction of each part over a tenth of the ops time:"]
  for row in rows:
    if "profile" not in row:
      continue
    prof = row["profile"]
    part_ms = {part: sum(prof["parts_ms"][part].values())
               for part in bench_profile.PARTS}
    lines.append(
        f"{row['model']:8} {row['kind']:{width}} {row['seq_len']:>6} "
        + " ".join(f"{part_ms[part]:12.2f}" for part in bench_profile.PARTS)
        + f" {prof['ops_ms']:8.2f} {prof['step_ms']:8.2f}")
    for part, ops in prof["top_ops_ms"].items():
      if part_ms[part] > 0.1 * prof["ops_ms"]:
        op, ms = next(iter(ops.items()))
        largest.append(f"  {row['model']} {row['kind']} {row['seq_len']} "
                       f"{part} ({part_ms[part]:.2f} ms): {op} {ms:.2f} ms")
  return "\n".join(lines + largest)


def _int_list(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x)


def _name_list(allowed):
  def parse(text):
    names = tuple(x for x in text.split(",") if x)
    for name in names:
      if name not in allowed:
        raise argparse.ArgumentTypeError(f"must be among {allowed}; got {name!r}")
    return names
  return parse


def run(sizes_s, tokens, kinds, models, sizes: Sizes, profile=False,
        trace_dir=None, on_row=None):
  """Every (model, S, kind) row, with the breakdown; `on_row(rows)` after
  each row (the breakdown of the rows so far), so a run cut short keeps
  what it measured."""
  rows = []
  for seq_len in sizes_s:
    if seq_len < 1 or tokens % seq_len:
      raise ValueError(f"tokens must be a positive multiple of every S; got "
                       f"tokens={tokens}, S={seq_len}")
    batch = tokens // seq_len
    for model_name in models:
      for kind in kinds:
        if kind == "cudnn" and jax.default_backend() != "gpu":
          rows.append({"model": model_name, "kind": kind, "seq_len": seq_len,
                       "batch": batch, "skipped": "cuDNN attention needs a "
                       f"CUDA GPU; backend is {jax.default_backend()!r}"})
        else:
          rows.append(measure(model_name, kind, seq_len, batch, sizes,
                              profile, trace_dir))
          add_breakdown(rows)
        if on_row is not None:
          on_row(rows)
  return rows


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny model and lengths (a CPU check)")
  parser.add_argument("--sizes", type=_int_list, default=None,
                      help="sequence lengths S (default 2048,4096,8192,16384; "
                      "--quick: 64,128)")
  parser.add_argument("--tokens", type=int, default=None,
                      help="batch * S (default 32768; --quick: 256)")
  parser.add_argument("--kinds", type=_name_list(KINDS), default=KINDS)
  parser.add_argument("--models", type=_name_list(MODELS), default=MODELS)
  parser.add_argument("--hidden_size", type=int, default=None)
  parser.add_argument("--num_heads", type=int, default=None)
  parser.add_argument("--mlp_size", type=int, default=None)
  parser.add_argument("--num_layers", type=int, default=None)
  parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                      default=None)
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="report file, rewritten after every row "
                      "(default $OUT/train_step.json when $OUT is set)")
  parser.add_argument("--profile", action="store_true",
                      help="also break each step down by part from a trace")
  parser.add_argument("--trace", type=pathlib.Path, default=None,
                      help="keep the --profile traces here, with each traced "
                      "step's compiled HLO (step.hlo.txt; implies --profile)")
  args = parser.parse_args(argv)
  sizes = QUICK if args.quick else Sizes()
  overrides = {name: getattr(args, name) for name in (
      "hidden_size", "num_heads", "mlp_size", "num_layers", "dtype", "iters")
               if getattr(args, name) is not None}
  sizes = dataclasses.replace(sizes, **overrides)
  seq_lens = args.sizes or ((64, 128) if args.quick else (2048, 4096, 8192,
                                                         16384))
  tokens = args.tokens or (256 if args.quick else 32768)
  report = {"device": str(jax.devices()[0].device_kind),
            "backend": jax.default_backend(), "jax": jax.__version__,
            "tokens": tokens, "sizes": dataclasses.asdict(sizes), "rows": []}
  out = args.json or (pathlib.Path(os.environ["OUT"]) / "train_step.json"
                      if os.environ.get("OUT") else None)
  print(f"{report['device']} ({report['backend']}), jax {report['jax']}, "
        f"{tokens} tokens a step, {sizes}")

  def write(rows):
    report["rows"] = rows
    if out is not None:
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(report, indent=2))

  def save(rows):
    # Each row is printed and the JSON rewritten as soon as it is measured.
    print(table(rows[-1:]).splitlines()[-1], flush=True)
    write(rows)

  write([])
  rows = run(seq_lens, tokens, args.kinds, args.models, sizes,
             args.profile or args.trace is not None, args.trace, on_row=save)
  print(table(rows))
  if any("profile" in row for row in rows):
    print(profile_table(rows))
  return report


if __name__ == "__main__":
  main()
