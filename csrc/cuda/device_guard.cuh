// The one device guard of the CUDA launches: makes `device` current and gives the
// caller's device back on scope exit (only when it had to change it).
#pragma once

#include <cuda_runtime.h>

namespace pyopd {

struct DeviceScope {
  int restore = -1;            // the caller's device, when it had to be changed
  const char* error = nullptr;  // why `device` could not be made current
  explicit DeviceScope(int device) {
    int prev = -1;
    cudaError_t e = cudaGetDevice(&prev);
    if (e == cudaSuccess && prev != device) {
      e = cudaSetDevice(device);
      if (e == cudaSuccess) restore = prev;
    }
    if (e != cudaSuccess) {
      error = cudaGetErrorString(e);
      cudaGetLastError();  // do not leave the error for an unrelated later check
    }
  }
  ~DeviceScope() {
    if (restore >= 0) cudaSetDevice(restore);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
};

}  // namespace pyopd
