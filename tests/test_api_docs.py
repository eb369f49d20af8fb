"""docs/API.md matches the docstrings and covers the public API; the README's
example runs; the docs' links and the code's ARCHITECTURE.md citations resolve."""

import importlib.util
import inspect
import pathlib
import re

import pytest

import nmattn

ROOT = pathlib.Path(__file__).resolve().parent.parent
GEN_API = ROOT / "docs" / "gen_api.py"
ARCHITECTURE_MD = ROOT / "docs" / "ARCHITECTURE.md"
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where code cites docs/ARCHITECTURE.md.
CITING_PACKAGES = ("nmattn", "pallas_kernels", "experiments", "tools", "tests")


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
    public += [obj for name, obj in inspect.getmembers(module, inspect.isclass)
               if obj.__module__ == module.__name__ and not name.startswith("_")]
  public.append(nmattn.reference.nm_attention_reference)
  missing = [obj for obj in public if not any(obj is d for d in documented)]
  assert not missing, f"public but not in docs/gen_api.py PUBLIC: {missing}"


def test_functions_and_layers_document_shapes(gen_api):
  """Every attention function and layer says the shapes it takes."""
  for name, description in gen_api.PUBLIC:
    obj = gen_api.resolve(name)
    if description is not None or (
        inspect.isclass(obj) and issubclass(obj, BaseException)):
      continue  # constants and the error have no shapes to document
    if name.startswith(("nmattn.patterns.", "nmattn.backends.",
                        "nmattn.BlockPattern")):
      continue  # block modes and backend objects, not attention calls
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


def test_markdown_links_and_docs_paths_resolve():
  """Every relative Markdown link, and every `docs/...` file named in
  backticks, of the README and docs/*.md names a file that exists."""
  broken = []
  for page in MARKDOWN:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)", text):
      if "://" not in target and not (page.parent / target).exists():
        broken.append(f"{page.name}: ]({target})")
    for path in re.findall(r"`(docs/[\w./-]+\.(?:md|json|png|py))`", text):
      if not (ROOT / path).exists():
        broken.append(f"{page.name}: `{path}`")
  assert not broken, broken


def _architecture_citations():
  """(file, cited section names, cited rule numbers) of every Python file
  that cites ARCHITECTURE.md."""
  for package in CITING_PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      text = path.read_text()
      if "ARCHITECTURE.md" not in text:
        continue
      # A citation may break across a line: match any whitespace.
      sections = [" ".join(cited.split()) for cited in
                  re.findall(r'ARCHITECTURE\.md,\s+"([^"]+)"', text)]
      rules = [int(n) for cited in re.findall(
          r"ARCHITECTURE\.md\s+rules?\s+(\d+(?:(?:,\s*|\s+and\s+)\d+)*)",
          text) for n in re.findall(r"\d+", cited)]
      yield path.relative_to(ROOT), sections, rules


def test_architecture_citations_resolve():
  """Section names and rule numbers that the code cites exist in
  docs/ARCHITECTURE.md."""
  text = ARCHITECTURE_MD.read_text()
  headings = set(re.findall(r"^#+ (.+)$", text, re.MULTILINE))
  rules = {int(n) for n in re.findall(r"^(\d+)\. \*\*", text, re.MULTILINE)}
  citations = list(_architecture_citations())
  assert citations, "no file cites ARCHITECTURE.md"
  unresolved = [(str(path), section) for path, sections, _ in citations
                for section in sections if section not in headings]
  unresolved += [(str(path), f"rule {rule}") for path, _, cited in citations
                 for rule in cited if rule not in rules]
  assert not unresolved, f"not in docs/ARCHITECTURE.md: {unresolved}"
