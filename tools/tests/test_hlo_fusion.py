"""tools.hlo_fusion: a fusion's body and its callees, on a hand-written module
shaped like the encoder's embedding gradient and on a real compiled step."""

import jax
import jax.numpy as jnp
import pytest

from experiments.bench.profile import HLO_COMPUTATION, HLO_INSTRUCTION
from tools import hlo_fusion

# A scatter-add fused with the producer of its updates, as XLA:GPU emits an
# embedding lookup's gradient (`input_scatter_fusion`).
MODULE = """HloModule step, is_scheduled=true

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}

%fused_scatter (p0: f32[4,8], p1: s32[64,1], p2: f32[64,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = s32[64,1]{1,0} parameter(1)
  %p2 = f32[64,8]{1,0} parameter(2)
  %m = f32[64,8]{1,0} multiply(%p2, %p2)
  ROOT %scatter.1 = f32[4,8]{1,0} scatter(%p0, %p1, %m), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%region_add
}

%unused (x: f32[]) -> f32[] {
  ROOT %x = f32[] parameter(0)
}

ENTRY %main (t: f32[4,8], i: s32[64,1], u: f32[64,8]) -> f32[4,8] {
  %t = f32[4,8]{1,0} parameter(0)
  %i = s32[64,1]{1,0} parameter(1)
  %u = f32[64,8]{1,0} parameter(2)
  ROOT %input_scatter_fusion = f32[4,8]{1,0} fusion(%t, %i, %u), kind=kInput, calls=%fused_scatter, metadata={op_name="jit(step)/transpose(jvp(M))/word_embeddings/scatter-add"}
}
"""


def test_computations_split_the_module():
  bodies = hlo_fusion.computations(MODULE)
  assert list(bodies) == ["region_add", "fused_scatter", "unused", "main"]
  assert all(body[-1] == "}" for body in bodies.values())
  assert bodies["fused_scatter"][0].startswith("%fused_scatter (")


def test_describe_follows_the_fusion_into_the_combiner():
  described = hlo_fusion.describe(MODULE, "input_scatter_fusion").splitlines()
  assert described[0].startswith("ROOT %input_scatter_fusion = ")
  bodies = hlo_fusion.computations(MODULE)
  text = "\n".join(described)
  for name in ("fused_scatter", "region_add"):
    assert "\n".join(bodies[name]) in text
  assert "%unused" not in text
  # the fusion first, then what its body calls
  assert text.index("%fused_scatter (") < text.index("%region_add (")


def test_describe_of_a_plain_instruction_is_its_line():
  assert hlo_fusion.describe(MODULE, "m") == (
      "%m = f32[64,8]{1,0} multiply(%p2, %p2)")


def test_describe_reaches_every_callee_of_a_real_compiled_step():
  def loss(table, ids):
    return jnp.tanh(table[ids]).sum()
  table = jax.random.normal(jax.random.key(0), (16, 8))
  ids = jax.random.randint(jax.random.key(1), (64,), 0, 16)
  text = jax.jit(jax.grad(loss)).lower(table, ids).compile().as_text()
  bodies = hlo_fusion.computations(text)
  calling = [line for body in bodies.values() for line in body
             if hlo_fusion._callees(line)]
  assert calling  # the lookup's gradient calls a combiner or a fused body
  for line in calling:
    name = HLO_INSTRUCTION.match(line).group(2)
    described = hlo_fusion.describe(text, name)
    assert described.splitlines()[0] == line.strip()
    for callee in hlo_fusion._callees(line):
      assert "\n".join(bodies[callee]) in described


def test_unknown_name_is_a_value_error():
  with pytest.raises(ValueError, match="name: no instruction 'nope'"):
    hlo_fusion.describe(MODULE, "nope")


def test_main_prints_each_name(tmp_path, capsys):
  path = tmp_path / "step.hlo.txt"
  path.write_text(MODULE)
  hlo_fusion.main([str(path), "input_scatter_fusion", "m"])
  printed = capsys.readouterr().out
  for name in ("input_scatter_fusion", "m"):
    assert hlo_fusion.describe(MODULE, name) in printed
