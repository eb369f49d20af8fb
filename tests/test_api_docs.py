"""docs/API.md matches the docstrings and covers the public API; the README's example runs."""

import importlib.util
import inspect
import pathlib
import re

import pytest

import nmattn

ROOT = pathlib.Path(__file__).resolve().parent.parent
GEN_API = ROOT / "docs" / "gen_api.py"


@pytest.fixture(scope="module")
def gen_api():
  spec = importlib.util.spec_from_file_location("gen_api", GEN_API)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_md_is_up_to_date(gen_api):
  assert gen_api.API_MD.read_text() == gen_api.render(), (
      "docs/API.md is out of date with the docstrings: run "
      "python docs/gen_api.py")


def test_every_public_name_is_documented(gen_api):
  documented = {gen_api.resolve(name) for name, _ in gen_api.PUBLIC}
  public = [getattr(nmattn, name) for name in nmattn.__all__
            if not inspect.ismodule(getattr(nmattn, name))]
  for module in (nmattn.layers, nmattn.nnx):
    public += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
               if obj.__module__ == module.__name__]
  public.append(nmattn.reference.nm_attention_reference)
  missing = [obj for obj in public if not any(obj is d for d in documented)]
  assert not missing, f"public but not in docs/gen_api.py PUBLIC: {missing}"


def test_functions_and_layers_document_shapes(gen_api):
  for name, description in gen_api.PUBLIC:
    obj = gen_api.resolve(name)
    if description is not None or (
        inspect.isclass(obj) and issubclass(obj, BaseException)):
      continue  # constants and the error have no shapes to document
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and "__call__" in obj.__dict__:
      doc += inspect.getdoc(obj.__dict__["__call__"]) or ""
    assert "[batch" in doc or "[..." in doc, f"{name}: no shapes in docstring"


def test_readme_example_runs():
  readme = (ROOT / "README.md").read_text()
  example = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
  assert len(example.strip().splitlines()) <= 10, example
  namespace = {}
  exec(example, namespace)  # pylint: disable=exec-used
  assert namespace["out"].shape == namespace["q"].shape
  assert namespace["grad"].shape == namespace["q"].shape
