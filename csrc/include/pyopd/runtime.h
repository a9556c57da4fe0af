// What the build and the machine provide: CPU instruction-set path, CUDA devices.
#pragma once

namespace pyopd {

// The widest x86 path compiled into the CPU kernels ("avx512", "avx2", "baseline").
const char* cpu_isa_compiled();
// The path the CPU kernels take on this machine (function multiversioning).
const char* cpu_isa_in_use();

#ifdef PYOPD_WITH_CUDA
// Number of CUDA devices the (statically linked) runtime sees; 0 without a driver.
int cuda_device_count();
#endif

}  // namespace pyopd
