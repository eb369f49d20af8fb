"""experiments.bench.profile: name stacks to parts, and a real CPU trace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from experiments.bench import profile

HLO = """\
%fused_computation.3 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %tanh.1 = f32[4]{0} tanh(%param_0), metadata={op_name="jit(step)/jvp(Decoder)/layer_0/mlp_in/tanh"}
}

ENTRY %main.9 (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0), metadata={op_name="x"}
  %loop_fusion = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.3
  ROOT %custom-call.2 = f32[4]{0} custom-call(%loop_fusion), metadata={op_name="jit(step)/transpose(jvp(Decoder))/layer_0/attention/pallas_call"}
}
"""


def test_instruction_scopes_read_metadata_and_fused_computations():
  scopes = profile.instruction_scopes(HLO)
  assert scopes["custom-call.2"].endswith("attention/pallas_call")
  # No metadata of its own: the fused computation's root gives it.
  assert scopes["loop_fusion"].endswith("mlp_in/tanh")
  assert scopes["x"] == "x"


@pytest.mark.parametrize("op_name, expected", [
    ("jit(s)/jvp(Decoder)/layer_1/attention/while/body/dot_general",
     ("attention core", "forward")),
    ("jit(s)/transpose(jvp(Decoder))/layer_0/attention/query/dot_general",
     ("attention projections", "backward")),
    ("jit(s)/jvp(SequenceClassifier)/encoder/layer_0/mlp_out/add",
     ("mlp", "forward")),
    ("jit(s)/transpose(jvp(Decoder))/final_ln/rsqrt", ("norms", "backward")),
    ("jit(s)/jvp(Decoder)/word_embeddings/jit(_take)/gather",
     ("embeddings", "forward")),
    ("jit(s)/optimizer/sqrt", ("optimizer", "update")),
    ("jit(s)/jvp()/log;jit(s)", ("other model", "forward")),
    ("params['layer_0']", ("unattributed", "unknown")),
    (None, ("unattributed", "unknown")),
])
def test_classify(op_name, expected):
  assert profile.classify(op_name) == expected


@pytest.mark.parametrize("stats, expected", [
    ((("hlo_op", "fusion.3"), ("hlo_module", "jit_step")), "fusion.3"),
    # a trace without the stat names the instruction in an annotation string
    ((("tf_op", "dot.7:jit_step#hlo_op=dot.7,hlo_module=jit_step#"),), "dot.7"),
    ((("long_name", "copy_kernel"), ("bytes", 4096)), None),
])
def test_hlo_op_from_an_event_s_stats(stats, expected):
  event = type("Event", (), {"stats": stats})()
  assert profile._hlo_op(event) == expected


def test_summarize_partitions_the_time():
  scopes = profile.instruction_scopes(HLO)
  times = {"custom-call.2": 6e6, "loop_fusion": 3e6, "copy.1": 1.5e6,
           "copy.2": 0.6e6, "copy.3": 0.3e6, "copy.4": 0.9e6}
  summary = profile.summarize(times, scopes, steps=3, top=2)
  assert summary["parts_ms"]["attention core"]["backward"] == pytest.approx(2)
  assert summary["parts_ms"]["mlp"]["forward"] == pytest.approx(1)
  assert summary["parts_ms"]["unattributed"]["unknown"] == pytest.approx(1.1)
  # each part's largest instructions, largest first, only parts that ran
  assert summary["top_ops_ms"] == {
      "attention core": {"custom-call.2": pytest.approx(2)},
      "mlp": {"loop_fusion": pytest.approx(1)},
      "unattributed": {"copy.1": pytest.approx(0.5), "copy.4": pytest.approx(0.3)}}
  assert list(summary["top_ops_ms"]["unattributed"]) == ["copy.1", "copy.4"]
  assert summary["ops_ms"] == pytest.approx(4.1)
  with pytest.raises(ValueError, match="steps must be >= 1; got 0"):
    profile.summarize({}, scopes, steps=0)


def test_profile_of_a_real_trace_names_the_scopes(tmp_path):
  def step(x, w):
    with jax.named_scope("attention"):
      y = jnp.tanh(x @ w)
    with jax.named_scope("optimizer"):
      return (y @ w.T).sum()

  x = jax.random.normal(jax.random.key(0), (256, 256))
  compiled = jax.jit(step).lower(x, x).compile()
  summary = profile.profile_compiled(compiled, (x, x), steps=2,
                                     trace_dir=tmp_path)
  assert list(tmp_path.glob("**/*.xplane.pb"))
  hlo_text = (tmp_path / "step.hlo.txt").read_text()
  assert hlo_text == compiled.as_text()
  for ops in summary["top_ops_ms"].values():
    assert all(f"%{op} = " in hlo_text or f" {op} = " in hlo_text for op in ops)
  parts = summary["parts_ms"]
  # XLA may fuse the two scopes' ops into one, filed under either name.
  named = parts["attention core"]["update"] + parts["optimizer"]["update"]
  assert named > 0
  assert named + parts["unattributed"]["unknown"] == pytest.approx(
      summary["ops_ms"])
  assert summary["ops_ms"] == pytest.approx(sum(
      sum(p.values()) for p in summary["parts_ms"].values()))
