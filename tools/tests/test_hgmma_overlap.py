"""`tools.hgmma_overlap`: the generated source, the parser, the arithmetic."""

import re
import shutil
from collections import Counter

import pytest

from tools import hgmma_overlap as hb

RESULT = ("RESULT name=SS+MINMAX roles=SS,MINMAX,MINMAX r=10 l=20 l2=0 total=1500 "
          "c0=1000 pa0=0 pb0=0 pi0=0 c1=1200 pa1=0 pb1=0 pi1=0 c2=1100 pa2=0 pb2=0 pi2=0 "
          "mhz=1755.500 sms=132")
DEVICE = "DEVICE name=NVIDIA_H200 sms=132 clock_khz=1980000"


def _instruction(src, opcode):
  (line,) = [l for l in src.splitlines() if f'"{opcode} ' in l]
  return line.split('"')[1]


def _operands(instr):
  groups = re.findall(r"\{([^}]*)\}", instr)
  tail = instr.rsplit("}", 1)[1].strip(" ,;").split(", ")
  return [g.split(", ") for g in groups], tail


@pytest.mark.parametrize("kind, opcode, a_regs, tail", [
    ("SS", "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16", 0,
     ["%64", "%65", "1", "1", "1", "0", "0"]),
    ("RS", "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16", 4,
     ["%68", "1", "1", "1", "0"]),
    ("SP", "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16", 4,
     ["%68", "%69", "0", "1", "1", "1", "0"]),
])
def test_wgmma_operands(kind, opcode, a_regs, tail):
  fn = hb.wgmma_function(kind)
  groups, rest = _operands(_instruction(fn, opcode))
  assert groups[0] == [f"%{i}" for i in range(64)]  # 64 f32 accumulators for n128
  assert len(groups) == 1 + bool(a_regs)
  if a_regs:
    assert groups[1] == [f"%{64 + i}" for i in range(4)]
  assert rest == tail
  assert fn.count('"+f"') == 64 and fn.count('"r"') == a_regs + (kind == "SP")
  assert hb.wgmma_function(kind) in hb.cuda_source()


@pytest.mark.parametrize("kind, ops", [
    ("MINMAX", {"max.f32": 16, "min.f32": 16}),
    ("SELECT", {"setp.gt.f32": 16, "selp.f32": 16}),
    ("FMA", {"fma.rn.f32": 32}),
])
def test_alu_asm_is_32_instructions_over_8_chains(kind, ops):
  text = hb.alu_asm(kind)
  instrs = [i.strip() for i in text.strip("{} ").split(";")]
  opcodes = [i.split()[0] for i in instrs if i and not i.startswith(".reg")]
  assert len(opcodes) == 32 and Counter(opcodes) == ops
  assert set(re.findall(r"%\d+", text)) == {f"%{i}" for i in range(10)}  # 8 chains, a, b


def test_source_has_one_kernel_per_tensor_kind_and_common_start():
  src = hb.cuda_source()
  assert "@" not in re.sub(r"\"[^\"]*\"|//.*", "", src)  # every marker replaced
  for name in ("bench_alu", "bench_ss", "bench_sp", "bench_rs", "bench_intra"):
    assert f"KERNEL({name}," in src
  assert "bar.sync 1, 384;" in src and "fence.proxy.async.shared::cta;" in src
  assert "0x44444444u" in src and f"kSmemBytes = {hb.SMEM_BYTES}" in src


def test_parse_result_and_device_lines():
  rec = hb.parse_line(RESULT)
  assert rec["name"] == "SS+MINMAX" and rec["roles"] == ("SS", "MINMAX", "MINMAX")
  assert (rec["r"], rec["l"], rec["total"], rec["c1"], rec["sms"]) == (10, 20, 1500, 1200, 132)
  assert rec["mhz"] == pytest.approx(1755.5)
  device, results = hb.parse_output(f"{DEVICE}\n\n{RESULT}\n")
  assert device["clock_khz"] == 1980000 and device["name"] == "NVIDIA_H200"
  assert list(results) == ["SS+MINMAX"]


@pytest.mark.parametrize("line", [
    "",
    "RESULTS name=x",
    RESULT.replace("total=1500", "total=15x0"),
    RESULT.replace(" sms=132", ""),
    RESULT.replace("c2=1100", "c2 1100"),
    RESULT.replace(" pi1=0", ""),
    RESULT + " extra=1",
    RESULT.replace("roles=SS,MINMAX,MINMAX", "roles=SS,BOGUS,NONE"),
    RESULT.replace("roles=SS,MINMAX,MINMAX", "roles=SS,NONE"),
    DEVICE.replace("clock_khz=1980000", "clock_khz=fast"),
])
def test_parse_rejects_malformed_lines(line):
  with pytest.raises(ValueError, match=re.escape(repr(line))):
    hb.parse_line(line)


def test_parse_output_needs_a_device_line():
  with pytest.raises(ValueError, match="DEVICE"):
    hb.parse_output(RESULT)


def _rec(**kw):
  base = {"r": 0, "l": 0, "l2": 0, "total": 0, "mhz": 1500.0, "sms": 132}
  base.update({f"{k}{w}": 0 for w in range(3) for k in ("c", "pa", "pb", "pi")})
  base.update(kw)
  return base


def test_overlap_arithmetic():
  assert hb.overlap(100, 100, 100) == 1.0
  assert hb.overlap(100, 100, 200) == 0.0
  assert hb.overlap(100, 50, 120) == pytest.approx(0.6)
  res = {"SS": _rec(c0=1000), "MINMAX": _rec(c1=900, c2=800),
         "SS+MINMAX": _rec(c0=1100, c1=1350, c2=1300, total=1400)}
  p = hb.pair_record(res, "SS", "MINMAX")
  assert (p["T"], p["A"], p["A_together"], p["total"]) == (1000, 900, 1350, 1400)
  assert p["overlap"] == pytest.approx(500 / 900)
  assert p["alu_slowdown"] == pytest.approx(1.5)
  assert p["tensor_slowdown"] == pytest.approx(1.1)
  res = {"SERIAL@1": _rec(c1=2000, pa1=1000, pb1=1000, pi1=40, r=4),
         "INTRA@1": _rec(c1=1250, pa1=1150, pb1=100, pi1=600, pi2=200, r=4),
         "SS": _rec(c0=2500, r=10)}  # 250 cycles a round
  q = hb.intra_record(res, "@1")
  assert (q["serial"], q["wait_left"]) == (2000, 100)
  assert q["overlap"] == pytest.approx(0.75)
  assert q["tensor_floor"] == 1000 and q["vs_tensor_floor"] == pytest.approx(1.25)
  assert q["issue_per_round"] == [150, 50] and q["serial_issue_per_round"] == [10, 0]
  res["SERIAL"], res["LATE"] = (_rec(c1=2400, pa1=1200, pb1=1200),
                                _rec(c1=1500, c2=1800, r=4))
  late = hb.intra_record(res, "", "LATE")
  assert (late["pair"], late["together"]) == ("LATE", 1800)  # the later warpgroup
  assert late["overlap"] == pytest.approx(0.5)
  # Two issuing warpgroups: both rounds' matmuls are the floor.
  assert late["tensor_floor"] == 2000 and late["vs_tensor_floor"] == pytest.approx(0.9)


def test_tensor_throughput_uses_dense_equivalent_flops():
  device = {"sms": 132, "clock_khz": 2_000_000}
  t = hb.tensor_throughput(_rec(r=100, c0=100 * 512, mhz=1000.0), "SP", device)
  assert t["flop_per_clk_per_sm"] == pytest.approx(4 * 2 * 64 * 128 * 32 / 512)
  assert t["tflops_at_nominal_clock"] == pytest.approx(2 * t["tflops_at_measured_clock"])


def test_calibrate_scales_counts_to_the_target():
  res = {k: _rec(c0=1_000_000) for k in hb.TENSOR_KINDS}
  for a in hb.ALU_KINDS:
    res[a], res[f"{a}@1"] = _rec(c1=500_000, c2=400_000), _rec(c1=250_000)
  res["SERIAL@1"] = _rec(pa1=400_000, pb1=200_000)
  res["SERIAL"] = _rec(pa1=800_000, pb1=800_000)
  base = {"r": 500, "l": 2000, "l2": 8, "intra_r": 500}
  r, l, intra = hb.calibrate(res, base, 3e6)
  assert r == {"SS": 1500, "SP": 1500, "RS": 1500}
  assert l["MINMAX"] == 12000 and l["FMA@1"] == 24000
  assert intra == {"@1": (1875, 16), "": (938, 8)}


def test_variant_specs_cover_every_pair_and_pick_kernels():
  specs = hb.variant_specs({k: 1 for k in hb.TENSOR_KINDS},
                           {n: 2 for a in hb.ALU_KINDS for n in (a, f"{a}@1")},
                           {"@1": (3, 4), "": (5, 6)})
  by_name = {s.name: s for s in specs}
  assert len(by_name) == len(specs) == 3 + 6 + 9 + 3 + 4 + 1
  assert by_name["SP+SELECT"].roles == ("SP", "SELECT", "SELECT")
  assert by_name["SS+FMA@1"].roles == ("SS", "FMA", "NONE")
  assert by_name["INTRA"].line() == "INTRA NONE INTRA INTRA 5 0 6"
  assert by_name["LATE"].line() == "LATE NONE INTRA LATE 5 0 6"
  assert hb.kernel_name(("NONE", "INTRA", "LATE")) == "bench_intra"
  assert hb.kernel_name(("NONE", "SERIAL", "NONE")) == "bench_intra"
  assert hb.kernel_name(("NONE", "FMA", "FMA")) == "bench_alu"


def test_serialized_kernels_reads_c75_warnings():
  log = ("ptxas info    : Used 90 registers\n"
         "ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async "
         "instructions are serialized ... in the function 'bench_sp'\n"
         "ptxas warning : (C7520) wgmma serialized\n")
  assert hb.serialized_kernels(log) == {"bench_sp", "*"}
  assert hb.serialized_kernels("ptxas info : Used 90 registers\n") == set()


def test_nvcc_compiles_without_wgmma_serialization(tmp_path):
  if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not on the PATH")
  src = tmp_path / "h.cu"
  src.write_text(hb.cuda_source())
  log = hb.compile_source(str(src), str(tmp_path / "h"))
  assert "C75" not in log
  spills = re.findall(r"(\d+) bytes spill stores", log)
  assert len(spills) == 5 and set(spills) == {"0"}
