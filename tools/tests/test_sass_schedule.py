"""tools.sass_schedule: control-bit decoding, loops, static schedule."""

import shutil
import subprocess

import pytest

from tools import sass_schedule as ss

# cuobjdump -sass (CUDA 13.0, sm_90a) of a loop body this test's author
# compiled: a = exp2(fma(a, b, 1)); b = max(a, b); a = shfl_xor(a, 1).
LOOP = """\
\t\tFunction : _Z1kPfi
        /*0300*/                   FFMA R6, R5, R0, 1 ;                    /* 0x3f80000005067423 */
                                                                           /* 0x02cfe20000000000 */
        /*0310*/                   IADD3 R4, R4, -0x1, RZ ;                /* 0xffffffff04047810 */
                                                                           /* 0x000fc80007ffe0ff */
        /*0320*/                   FSETP.GEU.AND P0, PT, R6, -126, PT ;    /* 0xc2fc00000600780b */
                                                                           /* 0x000fda0003f0e000 */
        /*0330*/              @!P0 FMUL R6, R6, 0.5 ;                      /* 0x3f00000006068820 */
                                                                           /* 0x000fc80000400000 */
        /*0340*/                   MUFU.EX2 R8, R6 ;                       /* 0x0000000600087308 */
                                                                           /* 0x000e640000000800 */
        /*0350*/              @!P0 FMUL R8, R8, R8 ;                       /* 0x0000000808088220 */
                                                                           /* 0x002fe20000400000 */
        /*0360*/                   ISETP.NE.AND P0, PT, R4, RZ, PT ;       /* 0x000000ff0400720c */
                                                                           /* 0x000fc80003f05270 */
        /*0370*/                   SHFL.BFLY PT, R0, R8, 0x1, 0x1f ;       /* 0x0c201f0008007f89 */
                                                                           /* 0x0002e200000e0000 */
        /*0380*/                   FMNMX R5, R8, R5, !PT ;                 /* 0x0000000508057209 */
                                                                           /* 0x000fd00007800000 */
        /*0390*/               @P0 BRA 0x300 ;                             /* 0xfffffffc00d80947 */
                                                                           /* 0x002fea000383ffff */
"""


@pytest.mark.parametrize("high, stall, write, read, wait", [
    (0x000FDA0003F0E000, 13, 7, 7, 0),      # FSETP: predicate ready after 13
    (0x000E640000000800, 2, 1, 7, 0),       # MUFU.EX2 sets scoreboard 1
    (0x002FE20000400000, 1, 7, 7, 0b10),    # its consumer waits on 1
    (0x000168000C1E1900, 4, 5, 0, 0),       # LDG: result on 5, operands on 0
])
def test_decode_control(high, stall, write, read, wait):
  c = ss.decode_control(high)
  assert (c.stall, c.write_barrier, c.read_barrier, c.wait_mask) == (
      stall, write, read, wait)


def test_parse_and_schedule_of_a_loop():
  functions = ss.parse_sass(LOOP)
  body = functions["_Z1kPfi"]
  assert len(body) == 10 and body[0].address == 0x300
  assert [i.opcode for i in body[:5]] == ["FFMA", "IADD3", "FSETP", "FMUL", "MUFU"]
  assert body[-1].branch_target() == 0x300 and body[0].branch_target() is None
  assert ss.loops(body) == [(0, 9)]
  sched = ss.schedule(body)
  assert sched["instructions"] == 10
  assert sched["stall_cycles"] == sum(i.control.stall for i in body) == 43
  # The FMUL after MUFU and the branch after SHFL wait on scoreboard 1.
  assert sched["waits"]["MUFU"] == 1 and sched["waits"]["SHFL"] == 2
  assert sched["opcodes"]["FMUL"] == 2
  [record] = ss.report(functions)
  assert (record["start"], record["end"]) == ("0x300", "0x390")


def test_branch_to_itself_is_no_loop():
  text = LOOP.replace("@P0 BRA 0x300", "BRA 0x390")
  assert ss.loops(ss.parse_sass(text)["_Z1kPfi"]) == []
  with pytest.raises(SystemExit, match="no loops"):
    ss.main(["/dev/null"])


def test_instruction_outside_a_function_is_an_error():
  with pytest.raises(ValueError, match="outside"):
    ss.parse_sass(LOOP.split("\n", 1)[1])


def test_cubin_without_cuobjdump_names_the_path(tmp_path, monkeypatch):
  cubin = tmp_path / "k.cubin"
  cubin.write_bytes(b"\x7fELF" + bytes(60))
  monkeypatch.delenv("CUOBJDUMP", raising=False)
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(ValueError, match="k.cubin is a cubin"):
    ss.read_sass(str(cubin))


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cuobjdump")),
                    reason="needs nvcc and cuobjdump")
def test_compiled_loop_waits_on_mufu(tmp_path):
  src = tmp_path / "k.cu"
  src.write_text(
      "__global__ void k(float* x, int n) { float a = x[threadIdx.x];"
      " for (int i = 0; i < n; ++i) a = exp2f(a) * 0.5f; x[threadIdx.x] = a; }")
  cubin = tmp_path / "k.cubin"
  subprocess.run(["nvcc", "-cubin", "-arch=sm_90a", "-O3", "-o", str(cubin),
                  str(src)], check=True)
  records = ss.report(ss.parse_sass(ss.read_sass(str(cubin))))
  assert records and all(r["stall_cycles"] > 0 for r in records)
  assert any(r["waits"].get("MUFU", 0) > 0 for r in records)


def test_ptxas_resources():
  log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
         "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
         "ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem\n")
  assert ss.ptxas_resources(log) == dict(registers=168, spill_stores=8,
                                         spill_loads=4, stack_frame=0,
                                         serialized_wgmma=False)
  assert ss.ptxas_resources("warning : C7514 wgmma serialized")["serialized_wgmma"]


def test_assemble_without_ptxas_is_an_error(monkeypatch):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(ValueError, match="k.ptx: no ptxas"):
    ss.assemble("k.ptx")


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("ptxas")
                         and shutil.which("cuobjdump")),
                    reason="needs nvcc, ptxas and cuobjdump")
def test_assemble_ptx_and_schedule(tmp_path):
  src = tmp_path / "k.cu"
  src.write_text("__global__ void k(float* x, int n) { float a = x[threadIdx.x];"
                 " for (int i = 0; i < n; ++i) a = fmaxf(a * a, 1.0f);"
                 " x[threadIdx.x] = a; }")
  ptx = tmp_path / "k.ptx"
  subprocess.run(["nvcc", "-ptx", "-arch=sm_90a", "-o", str(ptx), str(src)],
                 check=True)
  cubin, log = ss.assemble(str(ptx))
  assert ss.ptxas_resources(log)["registers"] > 0
  assert ss.report(ss.parse_sass(ss.read_sass(cubin)))
  bad = tmp_path / "bad.ptx"
  bad.write_text("not ptx")
  with pytest.raises(ValueError, match="ptxas failed"):
    ss.assemble(str(bad))
