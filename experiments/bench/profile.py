"""Where a compiled step's time goes, read from a `jax.profiler` trace.

The trace's op-level events (GPU kernels, CPU thunks) name the HLO
instruction that ran them; the compiled HLO gives every instruction the JAX
name stack it was traced under (its `op_name` metadata, for example
`jit(train_step)/transpose(jvp(Decoder))/layer_0/attention/query/dot_general`),
and that stack holds the Flax module path. So the time is grouped by names
the model gives itself, which stay put across XLA, cuDNN and Triton versions,
not by kernel names, which do not.

  part: "attention core" (everything inside an attention layer but its
        projections: the kernel, the N:M selection, a block pattern's
        choice), "attention projections" (query/key/value/out), "mlp",
        "norms", "embeddings", "optimizer" (the `optimizer` named scope),
        "other model" (residual adds, activations between modules, masks,
        the head and loss), "unattributed" (no name stack: copies and the
        like that XLA inserts);
  pass: "forward" (under `jvp`), "backward" (under `transpose`), "update"
        (neither), "unknown" (unattributed).

A fusion carries the name stack of the op XLA built it around, so an
instruction that fuses ops of two parts counts under that one's part.
"""

from __future__ import annotations

import collections
import pathlib
import re
import tempfile

import jax

PROJECTIONS = ("query", "key", "value", "out")
PARTS = ("attention core", "attention projections", "mlp", "norms",
         "embeddings", "optimizer", "other model", "unattributed")
PASSES = ("forward", "backward", "update", "unknown")
# XLA's GPU runtime replays runs of kernels as CUDA graphs by default; a
# trace then names the graph, not the instructions inside it.
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}

# HLO text lines: a computation's header (group 1: its name) and an
# instruction's definition (group 1: "ROOT " or None, group 2: its name).
HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s")
_OP_NAME = re.compile(r"\bmetadata=\{[^}]*\bop_name=\"([^\"]*)\"")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_ANNOTATED_OP = re.compile(r"hlo_op=([^,#\s]+)")


def instruction_scopes(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its `op_name` name stack, over every computation.

  A fusion XLA made without metadata takes its fused computation's: the
  root's, else the first found inside.
  """
  own, calls, computation_scope = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = HLO_COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    instruction = HLO_INSTRUCTION.match(line)
    if not instruction:
      continue
    name, op_name = instruction.group(2), _OP_NAME.search(line)
    callee = _CALLS.search(line)
    if callee:
      calls[name] = callee.group(1)
    if op_name:
      own[name] = op_name.group(1)
      if instruction.group(1) or computation not in computation_scope:
        computation_scope[computation] = op_name.group(1)
  scopes = dict(own)
  for name, callee in calls.items():
    if name not in scopes and callee in computation_scope:
      scopes[name] = computation_scope[callee]
  return scopes


def classify(op_name: str | None) -> tuple[str, str]:
  """The (part, pass) of one name stack; see the module docstring."""
  if not op_name or not op_name.startswith("jit("):
    return "unattributed", "unknown"
  op_name = op_name.split(";")[0]
  pass_ = ("backward" if "transpose(" in op_name else
           "forward" if "jvp(" in op_name else "update")
  scopes = op_name.split("/")
  for i, scope in enumerate(scopes):
    if scope == "attention":
      inner = scopes[i + 1] if i + 1 < len(scopes) else ""
      return ("attention projections" if inner in PROJECTIONS
              else "attention core"), pass_
    if scope in ("mlp_in", "mlp_out"):
      return "mlp", pass_
    if scope.endswith("_ln"):
      return "norms", pass_
    if scope.endswith("embeddings"):
      return "embeddings", pass_
    if scope == "optimizer":
      return "optimizer", pass_
  return "other model", pass_


def _hlo_op(event) -> str | None:
  for name, value in event.stats:
    if name == "hlo_op":
      return str(value)
    if isinstance(value, str):
      match = _ANNOTATED_OP.search(value)
      if match:
        return match.group(1)
  return None


def op_times_ns(xspace_path: str | pathlib.Path) -> dict[str, float]:
  """Summed duration (ns) per HLO instruction name of one trace file.

  Device planes win over the host's: on a GPU the host's thunk events are
  launches, and the kernels are what take the time. Within a device plane a
  line "XLA Ops" (one event per instruction) is used alone when present, so
  no kernel is counted twice.
  """
  data = jax.profiler.ProfileData.from_file(str(xspace_path))
  planes = list(data.planes)
  device = [p for p in planes if p.name.startswith("/device:")]
  times = collections.defaultdict(float)
  for plane in device or [p for p in planes if p.name == "/host:CPU"]:
    lines = list(plane.lines)
    ops_line = [line for line in lines if line.name == "XLA Ops"]
    for line in ops_line or lines:
      for event in line.events:
        op = event.name if ops_line else _hlo_op(event)
        if op is not None:
          times[op] += event.duration_ns
  return dict(times)


def summarize(times_ns: dict[str, float], scopes: dict[str, str],
              steps: int, top: int = 3) -> dict:
  """Milliseconds per step by part and pass, and each part's `top` largest
  instructions (their HLO names say what XLA made of the part: a fusion's
  kind, a custom call)."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1; got {steps}")
  parts = {part: dict.fromkeys(PASSES, 0.0) for part in PARTS}
  by_part = {part: collections.Counter() for part in PARTS}
  for op, ns in times_ns.items():
    part, pass_ = classify(scopes.get(op))
    ms = ns / 1e6 / steps
    parts[part][pass_] += ms
    by_part[part][op] += ms
  return {"steps": steps, "ops_ms": sum(times_ns.values()) / 1e6 / steps,
          "parts_ms": parts,
          "top_ops_ms": {part: dict(ops.most_common(top))
                         for part, ops in by_part.items() if ops}}


def profile_compiled(compiled, args, steps: int = 3,
                     trace_dir: str | pathlib.Path | None = None) -> dict:
  """Trace `steps` calls of a compiled function and summarize them; with a
  `trace_dir`, the trace and the compiled HLO (`step.hlo.txt`, which names the
  instructions the summary lists) stay there."""
  hlo_text = compiled.as_text()
  if trace_dir is not None:
    pathlib.Path(trace_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(trace_dir) / "step.hlo.txt").write_text(hlo_text)
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as scratch:
    root = pathlib.Path(trace_dir or scratch)
    before = set(root.glob("**/*.xplane.pb"))
    with jax.profiler.trace(str(root)):
      for _ in range(steps):
        jax.block_until_ready(compiled(*args))
    (path,) = set(root.glob("**/*.xplane.pb")) - before
    times = op_times_ns(path)
  if not times:
    raise RuntimeError(f"the trace {path} holds no HLO op events")
  return summarize(times, instruction_scopes(hlo_text), steps)
