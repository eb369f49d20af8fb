"""Does HGMMA work on one warpgroup slow the instruction stream of other warps?

A CUDA microbenchmark for Hopper (sm_90a), generated, compiled and run from
here. One CTA per SM (132 on an H200, 384 threads = 3 warpgroups, 120 KiB of
dynamic shared memory so no second CTA fits). Each warpgroup takes a role:

  SS      R rounds of {fence; 8 x wgmma m64n128k16 bf16, A and B from smem
          descriptors; commit; wait 0}: the Q K^T of a 128-key tile.
  SP      the same with 4 x sparse wgmma.sp m64n128k32, A in registers
          (metadata 0x44444444, selector 0): the P V.
  RS      8 x dense m64n128k16 with A in registers.
  MINMAX  L iterations of 32 max/min.f32 over 8 chains (SASS FMNMX, ALU pipe).
  SELECT  L iterations of 16 setp.gt.f32 + selp.f32 pairs (FSETP + FSEL).
  FMA     L iterations of 32 fma.rn.f32 (FFMA, FMA pipe).
  INTRA   per round: issue the 8 SS wgmmas, commit, run L2 SELECT iterations,
          then wait: FA3-style overlap inside one warpgroup.
  SERIAL  the INTRA baseline: issue, wait, then the L2 SELECT iterations.
  LATE    INTRA after one extra run of L2 SELECT iterations: beside an INTRA
          warpgroup it starts out of phase (issues while the other selects).

Every warpgroup reads %clock64 after a common `bar.sync 1, 384` and at its
end. Per variant the binary takes the median over CTAs of each warpgroup's
cycles and of the CTA's span (max end - min start), then the median of 5
launches after one warm-up. A first pass with base counts calibrates R and L
so that each role alone takes about --target-cycles; the second pass runs
every role alone and every tensor x ALU pair, and reports

  overlap = (T + A - together) / min(T, A)    1 = shorter one fully hidden,
                                              0 = the two serialise,

with the ALU and tensor slowdowns A_together / A and T_together / T.
INTRA, SERIAL and LATE on two warpgroups share one tensor pipe: there the
floor is both warpgroups' matmuls back to back (`tensor_floor`, from SS
alone), and `vs_tensor_floor` = together / tensor_floor says how close a
schedule comes to it (1 = tensor-bound, the ALU work fully hidden); their
`overlap` against one warpgroup's T and A says nothing about hiding.

Run on the GPU machine:  python3 -m tools.hgmma_overlap --out $OUT
(`--sass` also dumps cuobjdump's SASS; `--emit-only F.cu` writes the source.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

from tools import sass_schedule

ROLES = ("NONE", "SS", "SP", "RS", "MINMAX", "SELECT", "FMA", "INTRA", "SERIAL",
         "LATE")
TENSOR_KINDS = ("SS", "SP", "RS")
ALU_KINDS = ("MINMAX", "SELECT", "FMA")
N_ACC = 64  # f32 accumulators per thread of an m64n128 wgmma
NVCC_FLAGS = ("-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v")
SMEM_BYTES = 120 * 1024
REPS = 5
_DENSE_K16 = 2 * 64 * 128 * 16
FLOP_PER_ROUND = {"SS": 8 * _DENSE_K16, "RS": 8 * _DENSE_K16,
                  "SP": 4 * 2 * 64 * 128 * 32}  # sparse: dense-equivalent
KERNEL_OF_ROLE = {"SS": "bench_ss", "SP": "bench_sp", "RS": "bench_rs",
                  "INTRA": "bench_intra", "SERIAL": "bench_intra", "LATE": "bench_intra"}


def kernel_name(roles) -> str:
  """The kernel the binary launches for `roles` (its kernel_for)."""
  return next((KERNEL_OF_ROLE[r] for r in roles if r in KERNEL_OF_ROLE), "bench_alu")


# --------------------------------------------------------------------------
# Generated CUDA pieces.


def reg_list(first: int, count: int) -> str:
  return "{" + ", ".join(f"%{i}" for i in range(first, first + count)) + "}"


def wgmma_asm(kind: str) -> str:
  """The PTX of one wgmma of `kind`: operands %0-%63 are the accumulators."""
  acc, a_regs = reg_list(0, N_ACC), reg_list(N_ACC, 4)
  dense = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"
  if kind == "SS":  # d, a-desc, b-desc, scale-d, scale-a, scale-b, tnsp-a, tnsp-b
    return f"{dense} {acc}, %64, %65, 1, 1, 1, 0, 0;"
  if kind == "RS":  # d, a, b-desc, scale-d, scale-a, scale-b, tnsp-b
    return f"{dense} {acc}, {a_regs}, %68, 1, 1, 1, 0;"
  if kind == "SP":  # d, a, b-desc, meta, selector, scale-d, scale-a, scale-b, tnsp-b
    return ("wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 "
            f"{acc}, {a_regs}, %68, %69, 0, 1, 1, 1, 0;")
  raise ValueError(f"unknown wgmma kind {kind!r}")


def wgmma_function(kind: str) -> str:
  a4 = ", ".join(f'"r"(a[{i}])' for i in range(4))
  params, inputs = {
      "SS": ("uint64_t a, uint64_t b", '"l"(a), "l"(b)'),
      "RS": ("const uint32_t (&a)[4], uint64_t b", f'{a4}, "l"(b)'),
      "SP": ("const uint32_t (&a)[4], uint64_t b, uint32_t meta",
             f'{a4}, "l"(b), "r"(meta)'),
  }[kind]
  outs = ", ".join(f'"+f"(d[{i}])' for i in range(N_ACC))
  return (f"__device__ __forceinline__ void wgmma_{kind.lower()}"
          f"(float (&d)[{N_ACC}], {params}) {{\n"
          f'  asm volatile("{wgmma_asm(kind)}"\n    : {outs}\n'
          f'    : {inputs} : "memory");\n}}\n')


def alu_asm(kind: str) -> str:
  """32 instructions over chains %0-%7 with the constants %8, %9."""
  if kind == "MINMAX":
    ops = [f"{'max' if (i + j) % 2 == 0 else 'min'}.f32 %{i}, %{i}, %{8 + (i + j) % 2};"
           for j in range(4) for i in range(8)]
  elif kind == "SELECT":
    ops = [".reg .pred p<8>;"]
    for j in range(2):
      ops += [f"setp.gt.f32 p{i}, %{i}, %{8 + j};" for i in range(8)]
      ops += [f"selp.f32 %{i}, %{9 - j}, %{i}, p{i};" for i in range(8)]
  elif kind == "FMA":
    ops = [f"fma.rn.f32 %{i}, %{i}, %8, %9;" for _ in range(4) for i in range(8)]
  else:
    raise ValueError(f"unknown ALU kind {kind!r}")
  return "{ " + " ".join(ops) + " }"


def alu_function(kind: str) -> str:
  outs = ", ".join(f'"+f"(x[{i}])' for i in range(8))
  return (f"__device__ __forceinline__ void alu_{kind.lower()}"
          "(float (&x)[8], float a, float b) {\n"
          f'  asm volatile("{alu_asm(kind)}"\n    : {outs} : "f"(a), "f"(b));\n}}\n')


CUDA_TEMPLATE = r"""// Generated by tools/hgmma_overlap.py: see its docstring.
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  fprintf(stderr, "CUDA error %s at line %d\n", cudaGetErrorString(e_), __LINE__); \
  exit(1); } } while (0)

enum Role { @ROLE_ENUM@, NUM_ROLES };
static const char* kRoleNames[NUM_ROLES] = {@ROLE_NAMES@};
constexpr int kThreads = 384, kRec = 7;  // rec: clk start, end, phase a, b, gtimer start, end, issue
constexpr int kSmemBytes = @SMEM_BYTES@, kReps = @REPS@;
constexpr uint32_t kBOffset = 16384;  // A tiles: [0, 16K), B tiles: [16K, 48K)

struct Params { int role[3]; int r, l, l2, store; float a, b; };

__device__ __forceinline__ long long clock_now() {
  long long t; asm volatile("mov.u64 %0, %%clock64;" : "=l"(t) :: "memory"); return t; }
__device__ __forceinline__ long long gtimer_now() {
  long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) :: "memory"); return t; }
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// No-swizzle (layout type 0) descriptor: start, leading and stride byte offsets, all >> 4.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32);
}

@WGMMA_FUNCS@
@ALU_FUNCS@
template <int KIND> __device__ __forceinline__ void alu_step(float (&x)[8], float a, float b) {
  if (KIND == MINMAX) alu_minmax(x, a, b);
  else if (KIND == SELECT) alu_select(x, a, b);
  else alu_fma(x, a, b);
}
template <int KIND> __device__ __forceinline__ void alu_iters(float (&x)[8], int n, float a, float b) {
#pragma unroll 4
  for (int i = 0; i < n; ++i) alu_step<KIND>(x, a, b);
}
__device__ __forceinline__ void init_alu(float (&x)[8]) {
  for (int i = 0; i < 8; ++i) x[i] = 0.01f * (threadIdx.x & 31) + 0.1f * i;
}
template <int N> __device__ __forceinline__ float sum(const float (&v)[N]) {
  float s = 0.f;
  for (int i = 0; i < N; ++i) s += v[i];
  return s;
}
template <int KIND> __device__ float run_alu(int n, float a, float b) {
  float x[8]; init_alu(x); alu_iters<KIND>(x, n, a, b); return sum(x);
}
__device__ __forceinline__ void a_regs(uint32_t (&a)[4]) {
  for (int i = 0; i < 4; ++i) a[i] = 0x3C003C00u + ((threadIdx.x + i) & 15);  // small bf16 pairs
}
__device__ __forceinline__ void issue_ss(float (&d)[64], uint32_t base) {
  const uint64_t da = smem_desc(base, 128, 256), db = smem_desc(base + kBOffset, 128, 256);
  wg_fence();
#pragma unroll
  for (int k = 0; k < 8; ++k) wgmma_ss(d, da + k * (2048 >> 4), db + k * (4096 >> 4));
  wg_commit();
}
__device__ float run_ss(int rounds, uint32_t base) {
  float d[64] = {};
#pragma unroll 1
  for (int it = 0; it < rounds; ++it) { issue_ss(d, base); wg_wait0(); }
  return sum(d);
}
// A from registers: RS = 8 dense k16 steps over 4 KB of B each, SP = 4 sparse
// k32 steps over 8 KB each (metadata: every 4-chunk keeps positions 0 and 1).
template <int KIND> __device__ float run_register_a(int rounds, uint32_t base) {
  constexpr int kSteps = KIND == SP ? 4 : 8;
  constexpr uint32_t kStepBytes = KIND == SP ? 8192 : 4096;
  float d[64] = {}; uint32_t a[4]; a_regs(a);
  const uint64_t db = smem_desc(base + kBOffset, 128, kStepBytes / 16);
#pragma unroll 1
  for (int it = 0; it < rounds; ++it) {
    wg_fence();
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      if (KIND == SP) wgmma_sp(d, a, db + k * (kStepBytes >> 4), 0x44444444u);
      else wgmma_rs(d, a, db + k * (kStepBytes >> 4));
    }
    wg_commit(); wg_wait0();
  }
  return sum(d);
}
// INTRA: phase a = issue + ALU, phase b = the wait left over. SERIAL: a = issue + wait, b = ALU.
// pi: the cycles a warp spends getting its 8 wgmmas issued (until the commit returns).
template <bool OVERLAP>
__device__ float run_intra(const Params& p, uint32_t base, long long& pa, long long& pb,
                           long long& pi, bool late = false) {
  float d[64] = {}, x[8]; init_alu(x);
  if (late) alu_iters<SELECT>(x, p.l2, p.a, p.b);
#pragma unroll 1
  for (int it = 0; it < p.r; ++it) {
    const long long t0 = clock_now();
    issue_ss(d, base);
    pi += clock_now() - t0;
    long long t1;
    if (OVERLAP) { alu_iters<SELECT>(x, p.l2, p.a, p.b); t1 = clock_now(); wg_wait0(); }
    else { wg_wait0(); t1 = clock_now(); alu_iters<SELECT>(x, p.l2, p.a, p.b); }
    const long long t2 = clock_now();
    pa += t1 - t0; pb += t2 - t1;
  }
  return sum(d) + sum(x);
}

template <int K>
__device__ __forceinline__ void bench_body(const Params& p, long long* rec, int* smid, float* sink) {
  extern __shared__ __align__(1024) uint16_t smem[];
  const int tid = threadIdx.x, wg = tid >> 7;
  for (int i = tid; i < kSmemBytes / 2; i += kThreads) {
    const uint32_t h = (uint32_t(i) + 977u * blockIdx.x) * 2654435761u;
    smem[i] = uint16_t(((h >> 31) << 15) | ((123u + ((h >> 20) & 3u)) << 7) | ((h >> 8) & 0x7Fu));
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  asm volatile("bar.sync 1, 384;" ::: "memory");
  const int role = wg == 0 ? p.role[0] : (wg == 1 ? p.role[1] : p.role[2]);
  const uint32_t base = uint32_t(__cvta_generic_to_shared(smem));
  long long pa = 0, pb = 0, pi = 0;
  const long long g0 = gtimer_now(), t0 = clock_now();
  float out = 0.f;
  if (K == SS && role == SS) out = run_ss(p.r, base);
  else if (K == SP && role == SP) out = run_register_a<SP>(p.r, base);
  else if (K == RS && role == RS) out = run_register_a<RS>(p.r, base);
  else if (K == INTRA && role == INTRA) out = run_intra<true>(p, base, pa, pb, pi);
  else if (K == INTRA && role == SERIAL) out = run_intra<false>(p, base, pa, pb, pi);
  else if (K == INTRA && role == LATE) out = run_intra<true>(p, base, pa, pb, pi, true);
  else if (role == MINMAX) out = run_alu<MINMAX>(p.l, p.a, p.b);
  else if (role == SELECT) out = run_alu<SELECT>(p.l, p.a, p.b);
  else if (role == FMA) out = run_alu<FMA>(p.l, p.a, p.b);
  const long long t1 = clock_now(), g1 = gtimer_now();
  if ((tid & 127) == 0) {
    long long* r = rec + (blockIdx.x * 3 + wg) * kRec;
    r[0] = t0; r[1] = t1; r[2] = pa; r[3] = pb; r[4] = g0; r[5] = g1; r[6] = pi;
  }
  if (tid == 0) { int s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); smid[blockIdx.x] = s; }
  if (p.store) sink[blockIdx.x * kThreads + tid] = out;  // never true: keeps results live
}

#define KERNEL(name, K) extern "C" __global__ void __launch_bounds__(kThreads, 1) \
  name(Params p, long long* rec, int* smid, float* sink) { bench_body<K>(p, rec, smid, sink); }
KERNEL(bench_alu, NONE)
KERNEL(bench_ss, SS)
KERNEL(bench_sp, SP)
KERNEL(bench_rs, RS)
KERNEL(bench_intra, INTRA)
typedef void (*KernelFn)(Params, long long*, int*, float*);

static KernelFn kernel_for(const int* roles) {
  for (int w = 0; w < 3; ++w) switch (roles[w]) {
    case SS: return bench_ss; case SP: return bench_sp; case RS: return bench_rs;
    case INTRA: case SERIAL: case LATE: return bench_intra; default: break;
  }
  return bench_alu;
}
static long long median(std::vector<long long> v) {
  std::sort(v.begin(), v.end()); return v[v.size() / 2];
}
struct Stats { long long total, c[3], pa[3], pb[3], pi[3], mhz_x1000; int sms; };

static Stats launch_once(const Params& p, int grid, long long* d_rec, int* d_smid, float* d_sink) {
  kernel_for(p.role)<<<grid, kThreads, kSmemBytes>>>(p, d_rec, d_smid, d_sink);
  CHECK(cudaGetLastError()); CHECK(cudaDeviceSynchronize());
  std::vector<long long> rec(size_t(grid) * 3 * kRec); std::vector<int> smid(grid);
  CHECK(cudaMemcpy(rec.data(), d_rec, rec.size() * sizeof(long long), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(smid.data(), d_smid, grid * sizeof(int), cudaMemcpyDeviceToHost));
  Stats s{};
  std::vector<long long> total, mhz, c[3], pa[3], pb[3], pi[3];
  for (int b = 0; b < grid; ++b) {
    long long lo = 0, hi = 0, glo = 0, ghi = 0; bool any = false;
    for (int w = 0; w < 3; ++w) {
      const long long* r = &rec[(size_t(b) * 3 + w) * kRec];
      c[w].push_back(r[1] - r[0]); pa[w].push_back(r[2]); pb[w].push_back(r[3]);
      pi[w].push_back(r[6]);
      if (p.role[w] == NONE) continue;
      lo = any ? std::min(lo, r[0]) : r[0]; hi = any ? std::max(hi, r[1]) : r[1];
      glo = any ? std::min(glo, r[4]) : r[4]; ghi = any ? std::max(ghi, r[5]) : r[5]; any = true;
    }
    total.push_back(hi - lo);
    mhz.push_back(ghi > glo ? (hi - lo) * 1000000 / (ghi - glo) : 0);  // MHz x 1000
  }
  s.total = median(total); s.mhz_x1000 = median(mhz);
  for (int w = 0; w < 3; ++w) {
    s.c[w] = median(c[w]); s.pa[w] = median(pa[w]); s.pb[w] = median(pb[w]); s.pi[w] = median(pi[w]);
  }
  std::sort(smid.begin(), smid.end());
  s.sms = int(std::unique(smid.begin(), smid.end()) - smid.begin());
  return s;
}

static int role_index(const char* name) {
  for (int i = 0; i < NUM_ROLES; ++i) if (!strcmp(name, kRoleNames[i])) return i;
  fprintf(stderr, "unknown role %s\n", name); exit(2);
}

int main() {
  int dev = 0, sms = 0, khz = 0; cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev));
  for (char* c = prop.name; *c; ++c) if (*c == ' ' || *c == '=') *c = '_';
  printf("DEVICE name=%s sms=%d clock_khz=%d\n", prop.name, sms, khz);
  KernelFn all[] = {bench_alu, bench_ss, bench_sp, bench_rs, bench_intra};
  for (KernelFn k : all)
    CHECK(cudaFuncSetAttribute((const void*)k, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  long long* d_rec; int* d_smid; float* d_sink;
  CHECK(cudaMalloc(&d_rec, size_t(sms) * 3 * kRec * sizeof(long long)));
  CHECK(cudaMalloc(&d_smid, sms * sizeof(int)));
  CHECK(cudaMalloc(&d_sink, size_t(sms) * kThreads * sizeof(float)));
  char name[128], r0[16], r1[16], r2[16];
  Params p{};
  p.store = getenv("HGMMA_OVERLAP_NEVER_SET") != nullptr; p.a = 0.75f; p.b = 0.25f;
  while (scanf("%127s %15s %15s %15s %d %d %d", name, r0, r1, r2, &p.r, &p.l, &p.l2) == 7) {
    p.role[0] = role_index(r0); p.role[1] = role_index(r1); p.role[2] = role_index(r2);
    launch_once(p, sms, d_rec, d_smid, d_sink);  // warm-up
    std::vector<Stats> runs;
    for (int i = 0; i < kReps; ++i)
      runs.push_back(launch_once(p, sms, d_rec, d_smid, d_sink));
    auto med = [&runs](auto get) {
      std::vector<long long> v;
      for (const Stats& s : runs) v.push_back(get(s));
      return median(v);
    };
    printf("RESULT name=%s roles=%s,%s,%s r=%d l=%d l2=%d total=%lld", name, r0, r1, r2,
           p.r, p.l, p.l2, med([](const Stats& s) { return s.total; }));
    for (int w = 0; w < 3; ++w)
      printf(" c%d=%lld pa%d=%lld pb%d=%lld pi%d=%lld", w, med([w](const Stats& s) { return s.c[w]; }),
             w, med([w](const Stats& s) { return s.pa[w]; }),
             w, med([w](const Stats& s) { return s.pb[w]; }),
             w, med([w](const Stats& s) { return s.pi[w]; }));
    printf(" mhz=%.3f sms=%d\n", med([](const Stats& s) { return s.mhz_x1000; }) / 1000.0,
           runs[0].sms);
    fflush(stdout);
  }
  return 0;
}
"""


def cuda_source() -> str:
  pieces = {
      "@ROLE_ENUM@": ", ".join(ROLES),
      "@ROLE_NAMES@": ", ".join(f'"{r}"' for r in ROLES),
      "@SMEM_BYTES@": str(SMEM_BYTES),
      "@REPS@": str(REPS),
      "@WGMMA_FUNCS@": "".join(wgmma_function(k) for k in TENSOR_KINDS),
      "@ALU_FUNCS@": "".join(alu_function(k) for k in ALU_KINDS),
  }
  src = CUDA_TEMPLATE
  for key, value in pieces.items():
    src = src.replace(key, value)
  return src


# --------------------------------------------------------------------------
# Build, run, parse.


def compile_source(src_path: str, binary: str) -> str:
  """nvcc for sm_90a; returns (and prints) the ptxas log."""
  cmd = ["nvcc", *NVCC_FLAGS, "-o", binary, src_path]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  log = proc.stdout + proc.stderr
  print(log, end="")
  if proc.returncode:
    raise RuntimeError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}")
  return log


def serialized_kernels(log: str) -> set[str]:
  """Kernels named in a ptxas C75xx (wgmma serialized) warning; '*' if unnamed."""
  found = set()
  for line in log.splitlines():
    if "C75" in line:
      names = re.findall(r"'(bench_\w+)'", line)
      found.update(names or ["*"])
  return found


class Spec(NamedTuple):
  name: str
  roles: tuple[str, str, str]
  r: int = 0
  l: int = 0
  l2: int = 0

  def line(self) -> str:
    return f"{self.name} {' '.join(self.roles)} {self.r} {self.l} {self.l2}"


_RESULT_INTS = ("r", "l", "l2", "total", "sms") + tuple(
    f"{k}{w}" for w in range(3) for k in ("c", "pa", "pb", "pi"))
_KEYS = {"RESULT": {"name", "roles", "mhz", *_RESULT_INTS},
         "DEVICE": {"name", "sms", "clock_khz"}}


def parse_line(line: str) -> dict:
  """One 'RESULT k=v ...' or 'DEVICE k=v ...' line of the binary, as a dict."""
  def bad(why):
    return ValueError(f"malformed line {line!r}: {why}")
  kind, *tokens = line.split() or [""]
  if kind not in _KEYS:
    raise bad(f"starts with {kind!r}, not RESULT or DEVICE")
  fields = dict(t.split("=", 1) for t in tokens if "=" in t)
  if len(fields) != len(tokens) or set(fields) != _KEYS[kind]:
    raise bad(f"expected the keys {sorted(_KEYS[kind])}")
  rec = {"kind": kind, "name": fields["name"]}
  try:
    for key in _KEYS[kind] - {"name", "roles", "mhz"}:
      rec[key] = int(fields[key])
    if kind == "RESULT":
      rec["mhz"] = float(fields["mhz"])
  except ValueError as e:
    raise bad(str(e)) from None
  if kind == "RESULT":
    rec["roles"] = tuple(fields["roles"].split(","))
    if len(rec["roles"]) != 3 or not set(rec["roles"]) <= set(ROLES):
      raise bad(f"roles {fields['roles']!r}")
  return rec


def parse_output(text: str) -> tuple[dict, dict[str, dict]]:
  device, results = None, {}
  for line in filter(str.strip, text.splitlines()):
    rec = parse_line(line)
    if rec["kind"] == "DEVICE":
      device = rec
    else:
      results[rec["name"]] = rec
  if device is None:
    raise ValueError("no DEVICE line in the output")
  return device, results


def run_specs(binary: str, specs: list[Spec]) -> tuple[dict, dict[str, dict]]:
  stdin = "".join(s.line() + "\n" for s in specs)
  proc = subprocess.run([binary], input=stdin, capture_output=True, text=True,
                        check=False)
  sys.stderr.write(proc.stderr)
  if proc.returncode:
    raise RuntimeError(f"{binary} exited {proc.returncode}: {proc.stderr.strip()}")
  return parse_output(proc.stdout)


# --------------------------------------------------------------------------
# Variants, calibration and the overlap arithmetic.


def variant_specs(r: dict, l: dict, intra: dict) -> list[Spec]:
  """Every role alone, every tensor x ALU pair, INTRA and SERIAL on 1 and 2 WGs,
  and INTRA beside LATE.

  `r[tensor]`: rounds; `l['MINMAX']` (WG1+WG2), `l['MINMAX@1']` (WG1 only):
  ALU iterations; `intra['@1' or '']`: (rounds, L2).
  """
  specs = [Spec(k, (k, "NONE", "NONE"), r=r[k]) for k in TENSOR_KINDS]
  for a in ALU_KINDS:
    specs += [Spec(a, ("NONE", a, a), l=l[a]),
              Spec(f"{a}@1", ("NONE", a, "NONE"), l=l[f"{a}@1"])]
  specs += [Spec(f"{k}+{a}", (k, a, a), r=r[k], l=l[a])
            for k in TENSOR_KINDS for a in ALU_KINDS]
  specs += [Spec(f"SS+{a}@1", ("SS", a, "NONE"), r=r["SS"], l=l[f"{a}@1"])
            for a in ALU_KINDS]
  for suffix, wg2 in (("@1", "NONE"), ("", None)):
    for role in ("INTRA", "SERIAL"):
      rounds, l2 = intra[suffix]
      specs.append(Spec(role + suffix, ("NONE", role, wg2 or role), r=rounds, l2=l2))
  rounds, l2 = intra[""]
  specs.append(Spec("LATE", ("NONE", "INTRA", "LATE"), r=rounds, l2=l2))
  return specs


def alu_cycles(rec: dict) -> int:
  return max(rec["c1"], rec["c2"])


def scaled(base: int, cycles: float, target: float) -> int:
  return max(1, round(base * target / max(cycles, 1)))


def calibrate(res: dict, base: dict, target: float) -> tuple[dict, dict, dict]:
  """Counts that make each role alone take about `target` cycles."""
  r = {k: scaled(base["r"], res[k]["c0"], target) for k in TENSOR_KINDS}
  l = {n: scaled(base["l"], alu_cycles(res[n]), target)
       for a in ALU_KINDS for n in (a, f"{a}@1")}
  intra = {}
  for suffix in ("@1", ""):
    serial = res["SERIAL" + suffix]
    t_phase, a_phase = serial["pa1"], max(serial["pb1"], 1)
    l2 = max(1, round(base["l2"] * t_phase / a_phase))  # ALU time ~ tensor time
    intra[suffix] = (scaled(base["intra_r"], 2 * t_phase, target), l2)
  return r, l, intra


def overlap(t: float, a: float, together: float) -> float:
  """(T + A - together) / min(T, A): 1 = the shorter fully hidden, 0 = serial."""
  return (t + a - together) / min(t, a)


def pair_record(res: dict, tensor: str, alu: str) -> dict:
  t, a, both = res[tensor]["c0"], alu_cycles(res[alu]), res[f"{tensor}+{alu}"]
  return {"pair": f"{tensor}+{alu}", "T": t, "A": a, "T_together": both["c0"],
          "A_together": alu_cycles(both), "total": both["total"],
          "overlap": overlap(t, a, both["total"]),
          "alu_slowdown": alu_cycles(both) / a, "tensor_slowdown": both["c0"] / t}


def intra_record(res: dict, suffix: str, name: str = "INTRA") -> dict:
  """`name + suffix` (INTRA, or LATE with suffix "") against SERIAL + suffix."""
  serial, intra = res["SERIAL" + suffix], res[name + suffix]
  t, a, together = serial["pa1"], serial["pb1"], alu_cycles(intra)
  rounds = max(intra["r"], 1)
  issuing = 1 if suffix == "@1" else 2
  ss = res["SS"]
  tensor_floor = issuing * rounds * ss["c0"] / max(ss["r"], 1)
  return {"pair": name + suffix, "T": t, "A": a, "serial": alu_cycles(serial),
          "together": together, "wait_left": intra["pb1"],
          "overlap": overlap(t, a, together),
          "tensor_floor": tensor_floor, "vs_tensor_floor": together / tensor_floor,
          # Cycles a round's 8 wgmmas take to issue, per issuing warpgroup:
          # near 0 if issue never waits for the tensor core.
          "issue_per_round": [intra[f"pi{w}"] / rounds for w in (1, 2)],
          "serial_issue_per_round": [serial[f"pi{w}"] / rounds for w in (1, 2)]}


def tensor_throughput(rec: dict, kind: str, device: dict) -> dict:
  per_clk = rec["r"] * FLOP_PER_ROUND[kind] / rec["c0"]
  scale = device["sms"] / 1e12
  return {"kind": kind, "flop_per_clk_per_sm": per_clk,
          "tflops_at_nominal_clock": per_clk * scale * device["clock_khz"] * 1e3,
          "tflops_at_measured_clock": per_clk * scale * rec["mhz"] * 1e6,
          "measured_mhz": rec["mhz"], "nominal_mhz": device["clock_khz"] / 1e3}


def print_table(pairs: list[dict], intra: list[dict], tput: list[dict]) -> None:
  print(f"{'pair':<16}{'T':>10}{'A':>10}{'T_tog':>10}{'A_tog':>10}"
        f"{'total':>10}{'overlap':>9}{'A_slow':>8}{'T_slow':>8}")
  for p in pairs:
    print(f"{p['pair']:<16}{p['T']:>10}{p['A']:>10}{p['T_together']:>10}"
          f"{p['A_together']:>10}{p['total']:>10}{p['overlap']:>9.3f}"
          f"{p['alu_slowdown']:>8.3f}{p['tensor_slowdown']:>8.3f}")
  print(f"{'intra':<16}{'T':>10}{'A':>10}{'serial':>10}{'together':>10}"
        f"{'wait_left':>10}{'overlap':>9}{'/floor':>8}  issue/round (WG1, WG2; serial)")
  for p in intra:
    print(f"{p['pair']:<16}{p['T']:>10}{p['A']:>10}{p['serial']:>10}"
          f"{p['together']:>10}{p['wait_left']:>10}{p['overlap']:>9.3f}"
          f"{p['vs_tensor_floor']:>8.3f}  "
          f"{p['issue_per_round'][0]:.0f}, {p['issue_per_round'][1]:.0f}; "
          f"{p['serial_issue_per_round'][0]:.0f}, {p['serial_issue_per_round'][1]:.0f}")
  for t in tput:
    print(f"{t['kind']} alone: {t['flop_per_clk_per_sm']:.0f} FLOP/clk/SM, "
          f"{t['tflops_at_measured_clock']:.0f} TFLOP/s at {t['measured_mhz']:.0f} MHz "
          f"(measured), {t['tflops_at_nominal_clock']:.0f} at {t['nominal_mhz']:.0f} "
          "MHz (nominal, cudaDevAttrClockRate)")


def dump_sass(binary: str, path: str) -> None:
  try:
    sass = sass_schedule.read_sass(binary)
  except ValueError as e:
    print(f"{e}: no SASS dump", file=sys.stderr)
    return
  with open(path, "w") as f:
    f.write(sass)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", help="directory for hgmma_overlap.json")
  ap.add_argument("--emit-only", metavar="PATH", help="write the .cu and exit")
  ap.add_argument("--sass", action="store_true", help="dump SASS into --out")
  ap.add_argument("--target-cycles", type=float, default=3e6)
  args = ap.parse_args(argv)
  if args.emit_only:
    with open(args.emit_only, "w") as f:
      f.write(cuda_source())
    return
  if not args.out:
    ap.error("--out is required unless --emit-only")
  os.makedirs(args.out, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    src, binary = os.path.join(tmp, "hgmma_overlap.cu"), os.path.join(tmp, "hgmma_overlap")
    with open(src, "w") as f:
      f.write(cuda_source())
    log = compile_source(src, binary)
    shutil.copy(src, args.out)
    if args.sass:
      dump_sass(binary, os.path.join(args.out, "hgmma_overlap.sass"))
    base = {"r": 500, "l": 2000, "l2": 8, "intra_r": 500}
    base_specs = variant_specs({k: base["r"] for k in TENSOR_KINDS},
                               {n: base["l"] for a in ALU_KINDS for n in (a, f"{a}@1")},
                               {s: (base["intra_r"], base["l2"]) for s in ("@1", "")})
    _, first = run_specs(binary, [s for s in base_specs if "+" not in s.name
                                  and not s.name.startswith(("INTRA", "LATE"))])
    r, l, intra_counts = calibrate(first, base, args.target_cycles)
    device, res = run_specs(binary, variant_specs(r, l, intra_counts))
  bad = serialized_kernels(log)
  for rec in res.values():
    rec["serialized_warning"] = bool(bad & {kernel_name(rec["roles"]), "*"})
    if rec["serialized_warning"] or rec["sms"] != device["sms"]:
      print(f"WARNING {rec['name']}: serialized wgmma or CTAs on {rec['sms']} SMs")
  pairs = [pair_record(res, k, a) for k in TENSOR_KINDS for a in ALU_KINDS]
  pairs += [pair_record(res, "SS", f"{a}@1") for a in ALU_KINDS]
  intra = [intra_record(res, s) for s in ("@1", "")] + [intra_record(res, "", "LATE")]
  tput = [tensor_throughput(res[k], k, device) for k in TENSOR_KINDS]
  print_table(pairs, intra, tput)
  path = os.path.join(args.out, "hgmma_overlap.json")
  with open(path, "w") as f:
    json.dump({"device": device, "ptxas_log": log, "serialized_kernels": sorted(bad),
               "counts": {"r": r, "l": l, "intra": intra_counts}, "results": res,
               "pairs": pairs, "intra": intra, "tensor_alone": tput}, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
