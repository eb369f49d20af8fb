"""Shared fixtures: fresh random data every run, GPU-test skipping, x64 on
demand; one persistent compilation cache per test session, cheaper XLA:CPU
compiles on a CPU-only machine."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


# The cache directory this process made (and removes at the end), if any.
_OWN_CACHE_DIR = None


def pytest_configure(config):
  """Shares XLA compilations across the session's processes.

  The many `python -m experiments.train` / launcher / notebook-kernel
  subprocesses and both xdist workers compile the same small programs (each
  eager op of a Flax init alone takes ~0.15 s to compile on the CPU), so a
  compilation cache in a fresh directory, made here before xdist starts its
  workers and inherited through the environment, turns the repeats into disk
  reads. Only compilations that succeed are stored, keyed by a hash of the
  program, compile options, devices and versions, so a test still runs the
  same executable. A `JAX_COMPILATION_CACHE_DIR` set by the caller is used as
  it is; `JAX_ENABLE_COMPILATION_CACHE=false` turns caching off.
  """
  del config
  global _OWN_CACHE_DIR
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="nmattn-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
  # Every compilation, however quick: the eager ops are the common repeats.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  # jax was imported above, before the environment said so.
  jax.config.update("jax_compilation_cache_dir",
                    os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update(
      "jax_persistent_cache_min_compile_time_secs",
      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  _cheap_cpu_compiles()


def _cheap_cpu_compiles():
  """XLA:CPU flags that make compiling cheaper, on a machine without a GPU.

  The suite is compile-bound on a CPU (small arrays, many programs):
  * LLVM's codegen at -O0 (`--xla_backend_optimization_level=0`): LLVM's
    optimisation of XLA's CPU code is a large part of compiling (test_reference
    + test_flax take 114 s of CPU instead of 169 s without the cache). It
    changes how fast the machine code runs, not the program: XLA's HLO passes
    (fusion, layouts, buffer assignment) are the same, and without fast-math
    LLVM may not reassociate floating-point operations; a multiply and an add
    that -O2 would contract into one FMA (XLA allows it) can round
    differently in the last bit.
  * XLA's LLVM IR fusion emitters instead of its MLIR ones
    (`--xla_cpu_use_fusion_emitters=false`): the MLIR emitters make a context,
    load its dialects and run a pass pipeline for every fusion, most of the
    compile time of a program of many fusions such as a Pallas kernel in
    interpret mode (TestPallasTriton's float32 gradient tests: 21 s of CPU
    instead of 33 s; small programs compile as fast either way). The fused
    HLO is the same; the two emitters may expand elementwise functions (exp,
    tanh, ...) differently, which can round differently in the last bits.
  Set before any backend starts and inherited by every subprocess that keeps
  `XLA_FLAGS`; a flag the caller put in `XLA_FLAGS` is kept. The emitter flag
  only where this jaxlib's XLA knows it (an unknown flag aborts every JAX
  process). Not on a GPU machine, whose kernels are also timed.
  """
  if shutil.which("nvidia-smi") and os.environ.get("JAX_PLATFORMS") != "cpu":
    return
  flags = os.environ.get("XLA_FLAGS", "").split()
  unset = lambda name: not any(f.startswith(f"--{name}=") for f in flags)
  if unset("xla_backend_optimization_level"):
    flags.append("--xla_backend_optimization_level=0")
  emitters = "--xla_cpu_use_fusion_emitters=false"
  if unset("xla_cpu_use_fusion_emitters") and _xla_accepts(emitters):
    flags.append(emitters)
  os.environ["XLA_FLAGS"] = " ".join(flags)


def _xla_accepts(flag: str) -> bool:
  """Whether a JAX process starts its CPU backend with `flag` in XLA_FLAGS
  (~1 s, once a session: xdist workers inherit the flags)."""
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                        env=env, capture_output=True).returncode == 0


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE_DIR is not None:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  del config
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def seed(request):
  """A fresh seed per test, reported in the test's properties and on failure."""
  value = secrets.randbits(31)
  request.node.user_properties.append(("seed", value))
  return value


@pytest.fixture
def rng(seed):
  return np.random.default_rng(seed)


@pytest.fixture
def enable_x64():
  with jax.enable_x64(True):
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del call
  outcome = yield
  report = outcome.get_result()
  if report.failed:
    for name, value in item.user_properties:
      if name == "seed":
        report.sections.append(("random seed", f"seed={value}"))
