"""The Mosaic GPU IR of kernels lowered in a block, through a private hook.

Lowering (e.g. `jax.export` for "cuda") builds a Mosaic GPU kernel's IR on
any machine, CPU included. Mosaic GPU exposes no public way to read that IR,
so `captured_mosaic_gpu_modules` wraps its serialisation step
(`jax.experimental.mosaic.gpu.core._run_serde_pass`, private): a diagnostic
only, kept out of the library for that reason.
"""

from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def captured_mosaic_gpu_modules():
  """Collects the text of every Mosaic GPU kernel module lowered inside the block."""
  from jax.experimental.mosaic.gpu import core  # pylint: disable=g-import-not-at-top
  original = getattr(core, "_run_serde_pass", None)
  if original is None:
    raise NotImplementedError(
        f"jax {jax.__version__}: Mosaic GPU has no _run_serde_pass to hook")
  texts = []

  def spy(module, **kwargs):
    texts.append(str(module))
    return original(module, **kwargs)

  core._run_serde_pass = spy  # pylint: disable=protected-access
  try:
    yield texts
  finally:
    core._run_serde_pass = original  # pylint: disable=protected-access
