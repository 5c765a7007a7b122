// Error reporting, thread-count policy and instruction-set selection of the CPU back end.
#include <omp.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "fk_cpu_internal.h"

namespace fkcpu {

namespace {
thread_local std::string g_last_error;

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2")) return ISA_AVX2;
#endif
  return ISA_BASE;
}

Isa initial_isa() {
  Isa level = detect();
  // FEDRAC_CPU_ISA=base|avx2|avx512 caps the level (debugging, benchmarks of the variants).
  if (const char* env = std::getenv("FEDRAC_CPU_ISA")) {
    for (int l = ISA_BASE; l <= ISA_AVX512; ++l)
      if (std::string(env) == isa_name(l) && l < level) level = (Isa)l;
  }
  return level;
}

std::atomic<int> g_isa{-1};
}  // namespace

int fail(int code, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  g_last_error = buf;
  return code;
}

void clear_error() { g_last_error.clear(); }

const char* last_error() { return g_last_error.c_str(); }

int pick_threads(int nthreads, int64_t work, int64_t min_work) {
  int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
  if (nt < 1) nt = 1;
  int64_t cap = min_work > 0 ? work / min_work : nt;
  if (cap < 1) cap = 1;
  if (cap < nt) nt = (int)cap;
  return nt;
}

Isa detected_isa() {
  static const Isa d = detect();
  return d;
}

Isa active_isa() {
  int l = g_isa.load(std::memory_order_relaxed);
  if (l < 0) {
    l = initial_isa();
    g_isa.store(l, std::memory_order_relaxed);
  }
  return (Isa)l;
}

int set_isa(int level) {
  if (level < ISA_BASE || level > detected_isa()) return -1;
  int prev = active_isa();
  g_isa.store(level, std::memory_order_relaxed);
  return prev;
}

const char* isa_name(int level) {
  switch (level) {
    case ISA_BASE: return "base";
    case ISA_AVX2: return "avx2";
    case ISA_AVX512: return "avx512";
    default: return "unknown";
  }
}

const SpanKernels& span_kernels() { return span_kernels_for(active_isa()); }

}  // namespace fkcpu

// a*b+c with an FMA-capable target: contracted into one rounding unless -ffp-contract=off holds.
__attribute__((target("fma"), noinline)) static float fk_probe_mul_add(float a, float b, float c) {
  return a * b + c;
}

extern "C" {

const char* fk_last_error(void) { return fkcpu::last_error(); }

int fk_cpu_set_isa(int level) { return fkcpu::set_isa(level); }
int fk_cpu_get_isa(void) { return fkcpu::active_isa(); }
int fk_cpu_detected_isa(void) { return fkcpu::detected_isa(); }
const char* fk_cpu_isa_name(int level) { return fkcpu::isa_name(level); }

int fk_cpu_fp_contract_off(void) {
  // x = 1 + 2^-23: x*x = 1 + 2^-22 + 2^-46 exactly; rounded first, minus 1 gives 2^-22 exactly.
  volatile float x = 1.0f + 0x1p-23f, m1 = -1.0f;
  float r;
#if defined(__x86_64__) || defined(__i386__)
  if (__builtin_cpu_supports("fma"))
    r = fk_probe_mul_add(x, x, m1);
  else
#endif
    r = x * x + m1;
  return r == 0x1p-22f ? 1 : 0;
}

}  // extern "C"
