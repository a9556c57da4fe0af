// CPU entry points: run the widest instruction-set build of the kernels
// (vocab_stats_impl.h, compiled once per ISA) that this processor supports.
// The default build stays portable: no -march=native anywhere.
#include "pyopd/runtime.h"
#include "pyopd/vocab_stats.h"

namespace pyopd {

#define PYOPD_DECLARE_ISA(ns)                                  \
  namespace ns {                                               \
  const char* vocab_stats_fwd(const VocabStatsFwdParams& p);   \
  const char* vocab_stats_bwd(const VocabStatsBwdParams& p);   \
  }
PYOPD_DECLARE_ISA(cpu_baseline)
#ifdef PYOPD_CPU_X86_DISPATCH
PYOPD_DECLARE_ISA(cpu_avx2)
PYOPD_DECLARE_ISA(cpu_avx512)
#endif
#undef PYOPD_DECLARE_ISA

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa detect() {
#ifdef PYOPD_CPU_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa selected() {
  static const Isa isa = detect();
  return isa;
}

}  // namespace

const char* cpu_isa_compiled() {
#ifdef PYOPD_CPU_X86_DISPATCH
  return "avx512,avx2,baseline";
#else
  return "baseline";
#endif
}

const char* cpu_isa_in_use() {
  switch (selected()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

const char* vocab_stats_fwd_cpu(const VocabStatsFwdParams& p) {
  switch (selected()) {
#ifdef PYOPD_CPU_X86_DISPATCH
    case Isa::kAvx512: return cpu_avx512::vocab_stats_fwd(p);
    case Isa::kAvx2: return cpu_avx2::vocab_stats_fwd(p);
#endif
    default: return cpu_baseline::vocab_stats_fwd(p);
  }
}

const char* vocab_stats_bwd_cpu(const VocabStatsBwdParams& p) {
  switch (selected()) {
#ifdef PYOPD_CPU_X86_DISPATCH
    case Isa::kAvx512: return cpu_avx512::vocab_stats_bwd(p);
    case Isa::kAvx2: return cpu_avx2::vocab_stats_bwd(p);
#endif
    default: return cpu_baseline::vocab_stats_bwd(p);
  }
}

}  // namespace pyopd
