"""`nm_attention`: `jax.nn.dot_product_attention` with N:M sparse scores."""

from __future__ import annotations

from nmattn import backends
from nmattn._validation import canonicalize

IMPLEMENTATIONS = (None,) + tuple(backends.BACKENDS)


def resolve_implementation(implementation) -> backends.Backend | None:
  """The backend object `implementation` names (None stays None).

  Raises ValueError unless it is None, a name of `backends.BACKENDS` or a
  `backends.Backend` object.
  """
  if implementation is None or isinstance(implementation, backends.Backend):
    return implementation
  if isinstance(implementation, str) and implementation in backends.BACKENDS:
    return backends.BACKENDS[implementation]
  raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or an "
                   "nmattn.backends.Backend object; got "
                   f"implementation={implementation!r}")


def select_backend(spec, implementation=None) -> backends.Backend:
  """The backend that runs a call with this spec.

  `None` picks the first of `backends.AUTO_ORDER` that supports the call on
  the current default device (falling back to "xla"); an explicit name or
  `backends.Backend` object raises `UnsupportedCallError` (a ValueError)
  when that backend cannot run the call.
  """
  backend = resolve_implementation(implementation)
  if backend is None:
    for name in backends.AUTO_ORDER:
      backend = backends.BACKENDS[name]
      if backend.auto_eligible(spec) and backend.unsupported_reason(spec) is None:
        return backend
    raise AssertionError("the xla backend supports every call")
  reason = backend.unsupported_reason(spec)
  if reason is not None:
    raise backends.UnsupportedCallError(
        f"implementation={backend.name!r} cannot run this call: {reason}")
  return backend


def _run(backend: backends.Backend, call):
  try:
    return backend.run(call)
  except TypeError as e:
    # Every backend's gradient is a `jax.custom_vjp`, which has no forward
    # mode; JAX's own message names neither the function nor a way out.
    if "forward-mode" not in str(e) and "jvp" not in str(e):
      raise
    raise NotImplementedError(
        "nm_attention supports reverse-mode differentiation (jax.grad, "
        "jax.vjp) only: each backend's gradient is a custom VJP, so "
        "jax.jvp and jax.jacfwd cannot run through it "
        f"(implementation={backend.name!r}). Use jax.vjp or jax.jacrev, or "
        "differentiate nmattn.reference.nm_attention_reference, which "
        "materialises the scores.") from e


def nm_attention(query, key, value, bias=None, mask=None, *, scale=None,
                 is_causal=False, query_seq_lengths=None,
                 key_value_seq_lengths=None, local_window_size=None, n=2, m=4,
                 block_pattern=None, implementation=None):
  """Scaled dot-product attention keeping `n` of every `m` consecutive scores.

  The signature of `jax.nn.dot_product_attention` plus `n` and `m`. Scores
  `scale * q.k + bias` are masked (`mask`, `is_causal`, `local_window_size`,
  sequence lengths) and then, in each group of `m` consecutive key positions,
  only the `n` largest survive; softmax (float32) and `p @ v` run on the
  survivors. `n == m` is dense attention. A query row with no valid key gives
  zeros. Gradients flow through the kept scores; the selection is a constant.

  Args:
    query: `[batch, q_len, heads, head_dim]` (or `[q_len, heads, head_dim]`),
      bfloat16, float16, float32 or float64.
    key: `[batch, kv_len, kv_heads, head_dim]` with `heads % kv_heads == 0`
      (GQA / MQA); the dtype of `query`.
    value: the shape and dtype of `key`.
    bias: optional float array broadcastable to `[batch, heads, q_len, kv_len]`,
      added to the scaled scores.
    mask: optional bool array broadcastable like `bias`; False masks a pair.
    scale: score scale; default `head_dim ** -0.5`.
    is_causal: mask keys after the query (top-left aligned, as jax.nn).
    query_seq_lengths: optional int `[batch]`: queries at or past the length
      are padding (their output is zero).
    key_value_seq_lengths: optional int `[batch]`: keys at or past the length
      are padding.
    local_window_size: int or `(left, right)`: query `i` sees keys
      `i - left ... i + right`.
    n: scores kept per group, `1 <= n <= m`.
    m: group size, one of `nmattn.SUPPORTED_M`.
    block_pattern: optional `nmattn.BlockPattern`: per (batch, head, query
      block, key block) a mode, `SKIP` (masked), `NM` (pruned N:M) or
      `DENSE` (kept whole); docs/ARCHITECTURE.md, "The semantics", rule 7.
      Runs on "xla" (and "pallas_triton" where it says so); may be computed
      under `jit` (`nmattn.patterns`).
    implementation: None (the fastest backend that supports the call on the
      current device, else "xla"; dense calls, `n == m`, go to cuDNN on a
      GPU where it supports them), a name ("xla", "pallas_triton",
      "pallas_mosaic", "cudnn"), or a backend object carrying its tuning,
      e.g. `nmattn.backends.PallasTriton(config=...)`.

  Returns:
    `[batch, q_len, heads, head_dim]` in the dtype of `query`.

  Raises:
    ValueError: bad arguments (the message names the argument and value), or
      an explicitly requested implementation that cannot run the call
      (`nmattn.UnsupportedCallError`, also a NotImplementedError).
    NotImplementedError: forward-mode differentiation (`jax.jvp`).
  """
  call, added_batch = canonicalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, n=n, m=m,
      block_pattern=block_pattern)
  out = _run(select_backend(call.spec, implementation), call)
  return out[0] if added_batch else out
