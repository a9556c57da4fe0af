// CUDA kernels for token_stats / reverse_kl.
#include <cuda_runtime.h>

#include "pyopd/runtime.h"
#include "pyopd/vocab_stats.h"

namespace pyopd {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

const char* vocab_stats_fwd_cuda(const VocabStatsFwdParams&, int, void*) { return "not implemented"; }
const char* vocab_stats_bwd_cuda(const VocabStatsBwdParams&, int, void*) { return "not implemented"; }

}  // namespace pyopd
