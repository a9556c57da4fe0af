// Whether the CUDA kernels of this build can run here, and if not, why
// (no driver, a driver older than the statically linked runtime, no device).
// Only compiled with PYOPD_WITH_CUDA.
#pragma once

#include <string>

namespace pyopd {

struct CudaStatus {
  bool available = false;
  std::string reason;      // empty when available
  int driver_version = 0;  // CUDA version the driver supports (e.g. 13000), 0 without a driver
  int runtime_version = 0; // CUDA runtime this module links (e.g. 13000)
  int device_count = 0;
};

CudaStatus cuda_status();

}  // namespace pyopd
