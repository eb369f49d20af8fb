"""Print HLO instructions with the computations they call, from a text dump.

  python -m tools.hlo_fusion TRACE_DIR/step.hlo.txt input_scatter_fusion [NAME ...]

A profile (`experiments.bench.train_step --profile --trace DIR`) names the
instructions that take the time, and a fusion's name says little of what
is in it. This prints each named instruction's own line, then every
computation it reaches through `calls=`, `to_apply=`, `body=` or
`condition=` (a fusion's body, a scatter's combiner, a loop's), each once, so
the ops XLA fused together can be read.
"""

from __future__ import annotations

import argparse
import pathlib
import re

from experiments.bench.profile import HLO_COMPUTATION, HLO_INSTRUCTION

_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


def computations(hlo_text: str) -> dict[str, list[str]]:
  """Computation name -> its lines, header and closing brace included."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    header = HLO_COMPUTATION.match(line)
    if header:
      current = bodies.setdefault(header.group(1), [])
    if current is not None:
      current.append(line)
      if line.strip() == "}":
        current = None
  return bodies


def _callees(line: str) -> list[str]:
  return _CALLEES.findall(line)


def describe(hlo_text: str, name: str) -> str:
  """The instruction `name`'s line, then each computation it reaches."""
  bodies = computations(hlo_text)
  own = [line for body in bodies.values() for line in body
         if (m := HLO_INSTRUCTION.match(line)) and m.group(2) == name]
  if not own:
    raise ValueError(f"name: no instruction {name!r} in the HLO text")
  out, seen, pending = [own[0].strip()], set(), _callees(own[0])
  while pending:
    callee = pending.pop(0)
    if callee in seen or callee not in bodies:
      continue
    seen.add(callee)
    out.append("")
    out.extend(bodies[callee])
    pending.extend(c for line in bodies[callee] for c in _callees(line))
  return "\n".join(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("hlo", type=pathlib.Path, help="an HLO text dump")
  parser.add_argument("names", nargs="+", help="instruction names")
  args = parser.parse_args(argv)
  text = args.hlo.read_text()
  for name in args.names:
    print(describe(text, name), end="\n\n")


if __name__ == "__main__":
  main()
