"""Shared fixtures: fresh random data every run, GPU-test skipping, x64 on
demand; one persistent compilation cache per test session, unoptimised
machine code on a CPU-only machine."""

import os
import secrets
import shutil
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
  _unoptimised_cpu_code()


def _unoptimised_cpu_code():
  """LLVM's codegen at -O0 on a machine without a GPU.

  The suite is compile-bound on a CPU (small arrays, many programs), and
  LLVM's optimisation of XLA's CPU code is a large part of it: test_reference
  + test_flax take 114 s of CPU instead of 169 s without the cache. The level
  changes how fast the machine code runs, not the program: XLA's HLO passes
  (fusion, layouts, buffer assignment) are the same, and without fast-math
  LLVM may not reassociate floating-point operations; a multiply and an add
  that -O2 would contract into one FMA (XLA allows it) can round differently
  in the last bit. Set before any backend starts and inherited by every
  subprocess that keeps `XLA_FLAGS`; a level the caller put in `XLA_FLAGS`
  is kept. Not on a GPU machine, whose kernels are also timed.
  """
  if shutil.which("nvidia-smi") and os.environ.get("JAX_PLATFORMS") != "cpu":
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


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
