// CPU entry points: run the widest instruction-set build of the kernels
// (vocab_stats_impl.h, compiled once per ISA) that this processor supports.
// The default build stays portable: no -march=native anywhere.
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#ifdef __linux__
#include <sys/mman.h>
#endif

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

Isa widest_supported() {
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

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// The widest path by default; PYOPD_CPU_ISA=avx512|avx2|baseline picks one
// (read at every call, so a process can compare paths). An unknown value, or
// a path this CPU or build lacks, is an error rather than a silent fallback.
Isa selected() {
  static const Isa widest = widest_supported();
  const char* env = std::getenv("PYOPD_CPU_ISA");
  if (env == nullptr || *env == '\0') return widest;
  const std::string want(env);
  Isa isa;
  if (want == "avx512") {
    isa = Isa::kAvx512;
  } else if (want == "avx2") {
    isa = Isa::kAvx2;
  } else if (want == "baseline") {
    isa = Isa::kBaseline;
  } else {
    throw std::invalid_argument("PYOPD_CPU_ISA=" + want +
                                " is not one of avx512, avx2, baseline (or unset for the widest)");
  }
  if (static_cast<int>(isa) > static_cast<int>(widest)) {
    throw std::invalid_argument(std::string("PYOPD_CPU_ISA=") + want + ": this CPU (or build) " +
                                "supports at most " + isa_name(widest) +
                                " (compiled paths: " + cpu_isa_compiled() + ")");
  }
  return isa;
}

#ifdef __linux__
// Asks for transparent huge pages on a large, freshly allocated output (the
// gradient is as big as the logits): first-touch faults on 4 KiB pages cost
// about as much as the kernel itself. Advice only, limited to the whole 2 MiB
// pages inside [p, p + bytes); ignored where THP is off.
void advise_huge_pages(void* p, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
}
#else
void advise_huge_pages(void*, size_t) {}
#endif

size_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

}  // namespace

const char* cpu_isa_compiled() {
#ifdef PYOPD_CPU_X86_DISPATCH
  return "avx512,avx2,baseline";
#else
  return "baseline";
#endif
}

const char* cpu_isa_in_use() { return isa_name(selected()); }

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
  const Isa isa = selected();
  if (p.grad_student != nullptr) {
    advise_huge_pages(p.grad_student,
                      static_cast<size_t>(p.n_rows * p.vocab) * dtype_size(p.grad_dtype));
  }
  switch (isa) {
#ifdef PYOPD_CPU_X86_DISPATCH
    case Isa::kAvx512: return cpu_avx512::vocab_stats_bwd(p);
    case Isa::kAvx2: return cpu_avx2::vocab_stats_bwd(p);
#endif
    default: return cpu_baseline::vocab_stats_bwd(p);
  }
}

}  // namespace pyopd
