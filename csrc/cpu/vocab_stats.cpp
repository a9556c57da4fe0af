// CPU entry points: pick the widest instruction-set build of the kernels
// (vocab_stats_impl.h compiled per ISA) that this processor supports.
#include "pyopd/runtime.h"
#include "pyopd/vocab_stats.h"

namespace pyopd {

const char* vocab_stats_fwd_cpu(const VocabStatsFwdParams&) { return "not implemented"; }
const char* vocab_stats_bwd_cpu(const VocabStatsBwdParams&) { return "not implemented"; }
const char* cpu_isa_compiled() { return "baseline"; }
const char* cpu_isa_in_use() { return "baseline"; }

}  // namespace pyopd
