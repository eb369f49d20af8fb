"""Writes docs/API.md from the docstrings of nmattn's public API.

  python docs/gen_api.py           # rewrite docs/API.md
  python docs/gen_api.py --check   # exit 1 if docs/API.md is out of date

Google-style sections (Args, Returns, Raises) become Markdown lists.
Signatures are printed without annotations, and layers show only the fields
and methods nmattn adds to Flax's, so the page does not depend on the
installed Flax or JAX version. tests/test_api_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import re
import sys

API_MD = pathlib.Path(__file__).resolve().parent / "API.md"
# Document this checkout's nmattn, not another one installed in the venv.
sys.path.insert(0, str(API_MD.parent.parent))

# (qualified name, what the page says about a constant, which has no docstring).
PUBLIC = (
    ("nmattn.nm_attention", None),
    ("nmattn.nm_dot_product_attention", None),
    ("nmattn.nm_attention_weights", None),
    ("nmattn.nm_mask", None),
    ("nmattn.reference.nm_attention_reference", None),
    ("nmattn.layers.NMMultiHeadDotProductAttention", None),
    ("nmattn.layers.NMSelfAttention", None),
    ("nmattn.nnx.NMMultiHeadAttention", None),
    ("nmattn.UnsupportedCallError", None),
    ("nmattn.BlockPattern", None),
    ("nmattn.patterns.canonical_modes", None),
    ("nmattn.patterns.causal", None),
    ("nmattn.patterns.local_band", None),
    ("nmattn.patterns.sinks", None),
    ("nmattn.patterns.dilated", None),
    ("nmattn.patterns.segments", None),
    ("nmattn.patterns.union", None),
    ("nmattn.patterns.intersect", None),
    ("nmattn.patterns.with_mode", None),
    ("nmattn.patterns.topk_blocks", None),
    ("nmattn.patterns.sample_attention", None),
    ("nmattn.key_importance", None),
    ("nmattn.nm_attention_with_importance", None),
    ("nmattn.backends.Xla", None),
    ("nmattn.backends.PallasTriton", None),
    ("nmattn.backends.PallasMosaic", None),
    ("nmattn.backends.Cudnn", None),
    ("nmattn.SKIP", "Block mode: every score of the block is masked."),
    ("nmattn.NM", "Block mode: N:M selection inside the block."),
    ("nmattn.DENSE", "Block mode: every valid score of the block is kept."),
    ("nmattn.SUPPORTED_M", "The group sizes `m` that every function accepts."),
    ("nmattn.IMPLEMENTATIONS",
     "The values of `implementation` besides a backend object "
     "(`nmattn.backends`): `None` picks the fastest backend that supports "
     "the call on the current device, else `\"xla\"`."),
)

SECTION = re.compile(r"^(Args|Arguments|Attributes|Returns|Raises|Yields):\s*$")
ITEM = re.compile(r"^([*\w][\w, .*]*?):\s+(.*)$")
LIST_SECTIONS = ("Args", "Arguments", "Attributes", "Raises")
WIDTH = 80


def resolve(qualified_name: str):
  module_name, _, attribute = qualified_name.rpartition(".")
  return getattr(importlib.import_module(module_name), attribute)


def signature(name: str, function) -> str:
  """`name(param=default, ...)` without annotations, wrapped one per line when long."""
  parameters = [
      p.replace(annotation=inspect.Parameter.empty)
      for p in inspect.signature(function).parameters.values()
      if p.name != "self"]
  text = str(inspect.Signature(parameters))
  if len(name) + len(text) <= WIDTH:
    return name + text
  # Re-split the rendered signature at its top-level commas.
  inner = text[1:-1]
  parts, depth, start = [], 0, 0
  for i, char in enumerate(inner):
    depth += char in "([{"
    depth -= char in ")]}"
    if char == "," and depth == 0:
      parts.append(inner[start:i].strip())
      start = i + 1
  parts.append(inner[start:].strip())
  return name + "(\n" + "".join(f"    {part},\n" for part in parts) + ")"


def docstring_markdown(doc: str) -> str:
  """A Google-style docstring as Markdown: sections become bold-titled lists."""
  lines = inspect.cleandoc(doc).splitlines()
  out, i = [], 0
  while i < len(lines):
    match = SECTION.match(lines[i])
    if not match:
      out.append(lines[i])
      i += 1
      continue
    title = match.group(1)
    body = []
    i += 1
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
      body.append(lines[i])
      i += 1
    while body and not body[-1].strip():
      body.pop()
    out.append(f"**{title}:**")
    out.append("")
    out.extend(section_markdown(title, body))
    out.append("")
  return "\n".join(out).strip() + "\n"


def section_markdown(title: str, body: list[str]) -> list[str]:
  text = [line.strip() for line in body]
  if title not in LIST_SECTIONS:
    return [" ".join(t for t in text if t)]
  indent = min(len(l) - len(l.lstrip()) for l in body if l.strip())
  items = []
  for line in body:
    item = ITEM.match(line.strip())
    if item and len(line) - len(line.lstrip()) == indent:
      names = ", ".join(f"`{n.strip()}`" for n in item.group(1).split(","))
      items.append(f"- {names}: {item.group(2)}")
    elif line.strip():
      items[-1] += " " + line.strip()
  return items


def public_name(cls) -> str:
  """`flax.linen.X` rather than the version-dependent module that defines X."""
  for module_name in ("nmattn.layers", "nmattn.nnx", "flax.linen", "flax.nnx"):
    if getattr(importlib.import_module(module_name), cls.__name__, None) is cls:
      return f"{module_name}.{cls.__name__}"
  return f"{cls.__module__}.{cls.__qualname__}"


def written_in(cls, function) -> bool:
  """False for methods generated at run time (a linen dataclass's __init__)."""
  return inspect.unwrap(function).__code__.co_filename == inspect.getfile(cls)


def class_markdown(name: str, cls) -> list[str]:
  """A class: its docstring, then the fields and methods it defines itself."""
  out = [docstring_markdown(cls.__doc__)]
  # Flax re-declares `parent` and `name` on every linen subclass.
  own_fields = [f for f in inspect.get_annotations(cls)
                if f not in ("parent", "name")]
  if own_fields:
    defaults = ", ".join(f"`{f}={getattr(cls, f)!r}`" if hasattr(cls, f)
                         else f"`{f}`" for f in own_fields)
    out.append(f"Fields added to the parent's: {defaults}.\n")
  for method_name in ("__init__", "__call__"):
    method = cls.__dict__.get(method_name)
    if method is None or not written_in(cls, method):
      continue
    shown = name if method_name == "__init__" else f"{name}(...).__call__"
    out.append(f"```python\n{signature(shown, method)}\n```\n")
    if method.__doc__ and method_name == "__call__":
      out.append(docstring_markdown(method.__doc__))
  return out


def anchor(qualified_name: str) -> str:
  return re.sub(r"[^a-z0-9_-]", "", qualified_name.lower())


def render() -> str:
  header = [
      "# nmattn API reference",
      "",
      "Generated from the docstrings by `python docs/gen_api.py`; "
      "`tests/test_api_docs.py` fails when this page is out of date. "
      "Layouts follow Flax and `jax.nn`: `[batch, seq, heads, head_dim]`.",
      "",
  ]
  header += [f"- [`{name}`](#{anchor(name)})" for name, _ in PUBLIC]
  sections = []
  for name, description in PUBLIC:
    obj = resolve(name)
    parts = [f"## `{name}`", ""]
    if description is not None:
      parts += [f"```python\n{name} = {obj!r}\n```", "", description]
    elif inspect.isclass(obj) and issubclass(obj, BaseException):
      bases = ", ".join(b.__name__ for b in obj.__bases__)
      parts += [f"```python\nclass {name}({bases})\n```", "",
                docstring_markdown(obj.__doc__)]
    elif inspect.isclass(obj):
      bases = ", ".join(public_name(b) for b in obj.__bases__)
      parts += [f"```python\nclass {name}({bases})\n```", ""]
      parts += class_markdown(name, obj)
    else:
      parts += [f"```python\n{signature(name, obj)}\n```", "",
                docstring_markdown(obj.__doc__)]
    sections.append("\n".join(parts).strip())
  return "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="exit 1 if docs/API.md differs from the docstrings")
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    if API_MD.read_text() != text:
      print(f"{API_MD} is out of date: run python docs/gen_api.py",
            file=sys.stderr)
      return 1
    return 0
  API_MD.write_text(text)
  print(f"wrote {API_MD}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
