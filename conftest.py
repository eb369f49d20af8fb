"""Shared fixtures: fresh random data every run, GPU-test skipping, x64 on demand."""

import secrets

import jax
import numpy as np
import pytest


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


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
