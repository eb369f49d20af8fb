"""The static schedule of a kernel's loops, read from the SASS control bits.

ptxas writes its schedule into every Volta-to-Hopper instruction: the high
64-bit word carries, from bit 41, the stall count (cycles before the warp
may issue its next instruction, 4 bits), a yield bit, the scoreboard the
instruction sets when its result is ready (write barrier, 3 bits, 7 =
none), the scoreboard it sets when its operands have been read (read
barrier), the scoreboards it waits on (6-bit mask) and operand-reuse flags.

Per loop (a backward branch and its target) this module reports:

* `stall_cycles`: the sum of the stall counts, i.e. how long one warp takes
  for one iteration when no scoreboard wait blocks it (the fixed-latency
  dependency chains as ptxas scheduled them);
* `waits`: instructions that wait on a scoreboard, by the opcode that set
  it (MUFU, SHFL, loads, ...): the variable-latency part, not in the sum;
* the opcode counts, and the instruction count (a warp's issue slots).

A loop whose `stall_cycles` is far above its instruction count is latency
bound for a single warp: other warps of the scheduler can fill the stalls,
the same warp cannot.

  python -m tools.sass_schedule KERNEL.cubin [--json OUT.json]
  python -m tools.sass_schedule KERNEL.sass   # cuobjdump -sass text
  python -m tools.sass_schedule KERNEL.ptx    # assembled by ptxas

The Hopper kernel's probe has a `sass` section that does this for its
variants (PTX from Mosaic GPU's `MOSAIC_GPU_DUMP_TO`).

`--cuobjdump` (or $CUOBJDUMP) names the tool when it is not on PATH.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
from typing import NamedTuple

NO_BARRIER = 7
_INSTR = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\*\s*0x([0-9a-f]{16})\s*\*/")
_HIGH = re.compile(r"^\s*/\*\s*0x([0-9a-f]{16})\s*\*/\s*$")
_FUNCTION = re.compile(r"Function\s*:\s*(\S+)")
_BRANCH = re.compile(r"\bBRA\b(?:\.\w+)*\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


class Control(NamedTuple):
  """The scheduling fields of one instruction."""
  stall: int
  yield_flag: int
  write_barrier: int
  read_barrier: int
  wait_mask: int
  reuse: int


def decode_control(high_word: int) -> Control:
  """The control fields of an instruction's high 64-bit word."""
  bits = high_word >> 41
  return Control(stall=bits & 0xF, yield_flag=(bits >> 4) & 1,
                 write_barrier=(bits >> 5) & 7, read_barrier=(bits >> 8) & 7,
                 wait_mask=(bits >> 11) & 0x3F, reuse=(bits >> 17) & 0xF)


class Instruction(NamedTuple):
  address: int
  text: str          # predicate, opcode and operands as cuobjdump prints them
  control: Control

  @property
  def opcode(self) -> str:
    """The mnemonic without its predicate and modifiers (`FMNMX`, `HGMMA`)."""
    words = self.text.split()
    if words and words[0].startswith("@"):  # the predicate
      words = words[1:]
    return words[0].split(".")[0] if words else ""

  def branch_target(self) -> int | None:
    m = _BRANCH.search(self.text)
    return int(m.group(1), 16) if m and m.group(1) else None


def parse_sass(text: str) -> dict[str, list[Instruction]]:
  """`cuobjdump -sass` output -> instructions per function."""
  functions: dict[str, list[Instruction]] = {}
  current: list[Instruction] | None = None
  pending = None
  for line in text.splitlines():
    if m := _FUNCTION.search(line):
      current = functions.setdefault(m.group(1), [])
      pending = None
      continue
    if m := _INSTR.search(line):
      pending = (int(m.group(1), 16), m.group(2).strip())
      continue
    if pending is not None and (m := _HIGH.match(line)):
      if current is None:
        raise ValueError("SASS instruction outside a 'Function :' block")
      current.append(Instruction(pending[0], pending[1],
                                 decode_control(int(m.group(1), 16))))
      pending = None
  return functions


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
  """`(first, last)` list indices of each loop body (target of a backward branch).

  The branch-to-itself that ends every kernel is no loop.
  """
  index = {ins.address: i for i, ins in enumerate(instructions)}
  found = []
  for i, ins in enumerate(instructions):
    target = ins.branch_target()
    if target is not None and target < ins.address and target in index:
      found.append((index[target], i))
  return found


def schedule(body: list[Instruction]) -> dict:
  """Static cycles, scoreboard waits by producer, and opcode counts of a body.

  A wait is charged to the instruction that last set that scoreboard before
  it in program order, going around the loop once (the producer may sit in
  the previous iteration).
  """
  waits: collections.Counter = collections.Counter()
  setter: dict[int, str] = {}
  for ins in body:  # the scoreboards as the loop's last iteration left them
    _record_setters(ins, setter)
  for ins in body:
    mask = ins.control.wait_mask
    for sb in range(6):
      if mask >> sb & 1:
        waits[setter.get(sb, "outside the loop")] += 1
    _record_setters(ins, setter)
  return {"instructions": len(body),
          "stall_cycles": sum(ins.control.stall for ins in body),
          "waits": dict(waits.most_common()),
          "opcodes": dict(collections.Counter(i.opcode for i in body).most_common())}


def _record_setters(ins: Instruction, setter: dict[int, str]) -> None:
  for sb in (ins.control.write_barrier, ins.control.read_barrier):
    if sb != NO_BARRIER:
      setter[sb] = ins.opcode


def report(functions: dict[str, list[Instruction]]) -> list[dict]:
  """One record per loop of every function, innermost (shortest) first."""
  records = []
  for name, instructions in functions.items():
    for first, last in loops(instructions):
      body = instructions[first:last + 1]
      records.append(dict(function=name, start=hex(body[0].address),
                          end=hex(body[-1].address), **schedule(body)))
  return sorted(records, key=lambda r: (r["function"], r["instructions"]))


_RESOURCES = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_resources(log: str) -> dict:
  """Registers, spills and stack of `ptxas -v` output (the last function's)."""
  found = {}
  for name, pattern in _RESOURCES.items():
    values = pattern.findall(log)
    if values:
      found[name] = int(values[-1])
  found["serialized_wgmma"] = "C75" in log  # ptxas's C75xx wgmma notes
  return found


def assemble(ptx_path: str, arch: str = "sm_90a") -> tuple[str, str]:
  """`ptxas -v` on a PTX file: `(cubin path, ptxas log)`."""
  tool = shutil.which("ptxas")
  if tool is None:
    raise ValueError(f"cannot assemble {ptx_path}: no ptxas on PATH")
  cubin = os.path.splitext(ptx_path)[0] + ".cubin"
  done = subprocess.run([tool, f"-arch={arch}", "-v", ptx_path, "-o", cubin],
                        capture_output=True, text=True)
  if done.returncode:
    raise ValueError(f"ptxas failed on {ptx_path}: {done.stderr[-2000:]}")
  return cubin, done.stderr + done.stdout


def read_sass(path: str, cuobjdump: str | None = None) -> str:
  """SASS text of a cubin (through cuobjdump) or of a saved `cuobjdump -sass` dump."""
  with open(path, "rb") as f:
    head = f.read(4)
  if head != b"\x7fELF":
    with open(path) as f:
      return f.read()
  tool = cuobjdump or os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
  if tool is None:
    raise ValueError(f"{path} is a cubin and no cuobjdump was found: pass "
                     "--cuobjdump or set CUOBJDUMP")
  return subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                        check=True).stdout


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("path", help="a cubin, a .ptx, or the text of `cuobjdump -sass`")
  ap.add_argument("--cuobjdump", default=None)
  ap.add_argument("--json", default=None, help="write the records here")
  args = ap.parse_args(argv)
  path = args.path
  if path.endswith(".ptx"):
    path, log = assemble(path)
    print(ptxas_resources(log))
  records = report(parse_sass(read_sass(path, args.cuobjdump)))
  if not records:
    raise SystemExit(f"no loops found in {args.path}")
  for r in records:
    waits = ", ".join(f"{k} {v}" for k, v in r["waits"].items())
    top = ", ".join(f"{k} {v}" for k, v in list(r["opcodes"].items())[:8])
    print(f"{r['function'][:40]:<40} {r['start']}-{r['end']}: "
          f"{r['instructions']} instructions, {r['stall_cycles']} stall cycles; "
          f"waits on: {waits or 'none'}; {top}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  main()
