// See cuda_status.h. The runtime is linked statically, so the module imports
// without a driver; this turns the runtime's later "driver version is
// insufficient" into a reason the user can act on.
#include "cuda_status.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

namespace pyopd {
namespace {

std::string version_str(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// Minimum Linux driver branch of each CUDA major version the runtime may be.
int min_driver_branch(int runtime_version) {
  switch (runtime_version / 1000) {
    case 11: return 450;
    case 12: return 525;
    case 13: return 580;
    default: return 0;
  }
}

}  // namespace

CudaStatus cuda_status() {
  CudaStatus st;
  cudaRuntimeGetVersion(&st.runtime_version);
  // 0 (and cudaSuccess) when no driver is installed: libcuda.so.1 not found.
  if (cudaDriverGetVersion(&st.driver_version) != cudaSuccess) st.driver_version = 0;
  cudaGetLastError();
  const std::string need =
      "this pyopd build links the CUDA " + version_str(st.runtime_version) + " runtime, which needs " +
      (min_driver_branch(st.runtime_version) > 0
           ? "an NVIDIA driver >= " + std::to_string(min_driver_branch(st.runtime_version))
           : std::string("a matching NVIDIA driver"));
  if (st.driver_version == 0) {
    st.reason = "no NVIDIA driver found (libcuda.so.1 could not be loaded); " + need;
    return st;
  }
  // Within a major version the runtime runs on older drivers of that major
  // (minor version compatibility); across majors it does not.
  if (st.driver_version / 1000 < st.runtime_version / 1000) {
    st.reason = "the NVIDIA driver supports CUDA up to " + version_str(st.driver_version) + ", but " +
                need + "; update the driver or build pyopd with an older CUDA toolkit";
    return st;
  }
  const cudaError_t e = cudaGetDeviceCount(&st.device_count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    st.device_count = 0;
    st.reason = std::string("the CUDA runtime found no usable device: ") + cudaGetErrorString(e) +
                " (driver supports CUDA " + version_str(st.driver_version) + ", runtime " +
                version_str(st.runtime_version) + ")";
    return st;
  }
  if (st.device_count == 0) {
    const char* vis = std::getenv("CUDA_VISIBLE_DEVICES");
    st.reason = std::string("no CUDA device is visible") +
                (vis != nullptr ? std::string(" (CUDA_VISIBLE_DEVICES=") + vis + ")" : std::string());
    return st;
  }
  st.available = true;
  return st;
}

}  // namespace pyopd
