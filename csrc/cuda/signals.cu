// CUDA kernels for trajectory_scores, fire_token_weights and group_advantages
// (see pyopd/signals.h). One thread block per row: threads stride over the
// row with coalesced loads, reduce in double through warp shuffles, and a
// second sweep (when there is one) re-reads the row from L2. Launches are
// asynchronous on the caller's stream; only launch errors are reported.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "pyopd/signals.h"
#include "device_guard.cuh"
#include "pyopd/dispatch.h"

#include <type_traits>

namespace pyopd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ const T* row_of(const void* base, int64_t row_stride, int64_t i) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + i * row_stride;
}

__device__ __forceinline__ bool valid_at(const bool* m, int64_t t) { return m == nullptr || m[t]; }

template <typename C>
__device__ __forceinline__ C clamp_to(C x, C lo, C hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

struct SumOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
// Max that ignores NaN (fmax semantics); NaN is tracked by a separate count.
struct MaxOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return b > a ? b : a; }
};

template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct MinOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return b < a ? b : a; }
};

// Block-wide reduction; every thread gets the result. `smem` holds kWarps + 1 values.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V identity, V* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V w = lane < kWarps ? smem[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) smem[kWarps] = w;
  }
  __syncthreads();
  return smem[kWarps];
}

template <typename T>
__device__ __forceinline__ T quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// ---- trajectory_stats ------------------------------------------------------------

struct TrajectoryArgs {
  const void* in[4];
  int64_t in_stride[4];
  void* mean_out[4];
  void* max_out[4];
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    trajectory_stats_kernel(TrajectoryStatsParams p, TrajectoryArgs a) {
  __shared__ double dsmem[kWarps + 1];
  __shared__ long long ismem[kWarps + 1];
  __shared__ T tsmem[kWarps + 1];
  const int64_t i = blockIdx.x;
  const int64_t n_cols = p.cols;
  const bool* m = p.mask == nullptr ? nullptr : p.mask + i * p.mask_row_stride;

  long long n = 0;
  for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) n += valid_at(m, t) ? 1 : 0;
  n = block_reduce(n, SumOp{}, 0LL, ismem);
  if (threadIdx.x == 0) p.length[i] = n;

  for (int c = 0; c < 4; ++c) {
    if (a.mean_out[c] == nullptr && a.max_out[c] == nullptr) continue;  // uniform over the block
    const T* x = row_of<T>(a.in[c], a.in_stride[c], i);
    double sum = 0.0;
    T mx = T(0);
    long long nans = 0;
    for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) {
      const T v = valid_at(m, t) ? x[t] : T(0);
      sum += double(v);
      mx = v > mx ? v : mx;
      nans += (v != v) ? 1 : 0;
    }
    sum = block_reduce(sum, SumOp{}, 0.0, dsmem);
    if (a.max_out[c] != nullptr) {
      mx = block_reduce(mx, MaxOp{}, T(0), tsmem);
      nans = block_reduce(nans, SumOp{}, 0LL, ismem);
    }
    if (threadIdx.x == 0) {
      if (a.mean_out[c] != nullptr) {
        static_cast<T*>(a.mean_out[c])[i] = n > 0 ? T(sum / double(n)) : T(0);
      }
      if (a.max_out[c] != nullptr) static_cast<T*>(a.max_out[c])[i] = nans > 0 ? quiet_nan<T>() : mx;
    }
  }
}

// ---- fire_weights ----------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) fire_weights_kernel(FireWeightsParams p) {
  __shared__ double dsmem[kWarps + 1];
  __shared__ long long ismem[kWarps + 1];
  const int64_t i = blockIdx.x;
  const int64_t n_cols = p.cols;
  T* w = static_cast<T*>(p.weight) + i * n_cols;
  const bool kept = p.keep == nullptr || p.keep[i];
  if (!kept) {  // uniform over the block: no barrier is skipped by part of it
    for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) w[t] = T(0);
    if (threadIdx.x == 0) {
      if (p.row_sum) p.row_sum[i] = 0.0;
      if (p.row_count) p.row_count[i] = 0;
    }
    return;
  }
  const bool* m = p.mask == nullptr ? nullptr : p.mask + i * p.mask_row_stride;
  const T* ht = row_of<T>(p.teacher_entropy, p.teacher_entropy_row_stride, i);
  const T* hs = row_of<T>(p.student_entropy, p.student_entropy_row_stride, i);
  const T mt = static_cast<const T*>(p.teacher_entropy_max)[i];
  const T ms = static_cast<const T*>(p.student_entropy_max)[i];
  const bool use_t = !(mt <= T(0)), use_s = !(ms <= T(0));
  const T dt = use_t ? mt : T(1), ds = use_s ? ms : T(1);
  const T alpha = T(p.alpha), beta = T(p.beta);

  double sum = 0.0;
  long long n = 0;
  for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) {
    const bool v = valid_at(m, t);
    T wt = T(0);
    if (v) {
      const T rt = use_t ? ht[t] / dt : T(0);
      const T rs = use_s ? hs[t] / ds : T(0);
      wt = (T(1) + alpha * clamp_to(T(1) - rt, T(0), T(1))) * (T(1) + beta * clamp_to(rs, T(0), T(1)));
    }
    w[t] = wt;
    sum += double(wt);
    n += v ? 1 : 0;
  }
  sum = block_reduce(sum, SumOp{}, 0.0, dsmem);
  n = block_reduce(n, SumOp{}, 0LL, ismem);
  if (threadIdx.x == 0) {
    if (p.row_sum) p.row_sum[i] = sum;
    if (p.row_count) p.row_count[i] = n;
  }
  if (p.normalize_rows && n > 0) {
    const T scale = T(double(n) / sum);
    // each thread rescales the elements it wrote itself: no barrier needed
    for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) w[t] *= scale;
  }
}

// ---- group advantages ------------------------------------------------------------

template <typename T>
__device__ __forceinline__ double reward(T lq, T lp, double lo, double hi, double bonus) {
  return clamp_to(double(lq) - double(lp), lo, hi) + bonus;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) group_reward_moments_kernel(GroupAdvParams p) {
  __shared__ double dsmem[kWarps + 1];
  __shared__ long long ismem[kWarps + 1];
  const int64_t i = blockIdx.x;
  const int64_t n_cols = p.cols;
  const bool* m = p.mask == nullptr ? nullptr : p.mask + i * p.mask_row_stride;
  const T* lq = row_of<T>(p.teacher_logprob, p.teacher_logprob_row_stride, i);
  const T* lp = row_of<T>(p.student_logprob, p.student_logprob_row_stride, i);

  // Shift by the first valid reward: an all-equal row then has mean exactly
  // that reward and M2 exactly 0 (so a constant group gets A = 0, not 1e-11).
  long long first = n_cols;
  for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) {
    if (valid_at(m, t)) {
      first = t;
      break;
    }
  }
  first = block_reduce(first, MinOp{}, static_cast<long long>(n_cols), ismem);
  if (first >= n_cols) {  // uniform over the block
    if (threadIdx.x == 0) {
      p.row_count[i] = 0;
      p.row_mean[i] = 0.0;
      p.row_m2[i] = 0.0;
    }
    return;
  }
  const double shift = reward(lq[first], lp[first], p.clip_low, p.clip_high, p.bonus);
  double sum = 0.0;
  long long n = 0;
  for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) {
    if (valid_at(m, t)) {
      sum += reward(lq[t], lp[t], p.clip_low, p.clip_high, p.bonus) - shift;
      ++n;
    }
  }
  sum = block_reduce(sum, SumOp{}, 0.0, dsmem);
  n = block_reduce(n, SumOp{}, 0LL, ismem);
  const double mean = shift + sum / double(n);
  double m2 = 0.0;
  for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) {
    if (valid_at(m, t)) {
      const double d = reward(lq[t], lp[t], p.clip_low, p.clip_high, p.bonus) - mean;
      m2 += d * d;
    }
  }
  m2 = block_reduce(m2, SumOp{}, 0.0, dsmem);
  if (threadIdx.x == 0) {
    p.row_count[i] = n;
    p.row_mean[i] = mean;
    p.row_m2[i] = m2;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) group_advantages_apply_kernel(GroupAdvParams p) {
  const int64_t i = blockIdx.x;
  const int64_t n_cols = p.cols;
  const bool* m = p.mask == nullptr ? nullptr : p.mask + i * p.mask_row_stride;
  const T* lq = row_of<T>(p.teacher_logprob, p.teacher_logprob_row_stride, i);
  const T* lp = row_of<T>(p.student_logprob, p.student_logprob_row_stride, i);
  T* a = static_cast<T*>(p.advantage) + i * n_cols;
  const double mean = p.group_mean[i];
  const double denom = p.group_std[i] + p.eps;
  for (int64_t t = threadIdx.x; t < n_cols; t += kThreads) {
    a[t] = valid_at(m, t) ? T((reward(lq[t], lp[t], p.clip_low, p.clip_high, p.bonus) - mean) / denom)
                          : T(0);
  }
}

// ---- launch helpers ----------------------------------------------------------------


const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

constexpr int64_t kMaxGrid = 2147483647LL;  // gridDim.x limit

template <typename P, typename LaunchF, typename LaunchD>
const char* launch_rows(const P& p, int device, void* stream, LaunchF&& launch_f, LaunchD&& launch_d) {
  if (p.rows == 0) return nullptr;
  if (p.rows > kMaxGrid) return "signals: too many rows for one CUDA launch";
  DeviceScope guard(device);
  if (guard.error != nullptr) return guard.error;
  const dim3 grid(static_cast<unsigned>(p.rows));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const char* err = with_float_dtype(p.dtype, [&](auto t) -> const char* {
    if constexpr (std::is_same_v<typename decltype(t)::type, float>) launch_f(grid, s);
    else launch_d(grid, s);
    return nullptr;
  });
  return err != nullptr ? err : launch_status();
}

}  // namespace

const char* trajectory_stats_cuda(const TrajectoryStatsParams& p, int device, void* stream) {
  const TrajectoryArgs a{{p.teacher_logprob, p.kl, p.teacher_entropy, p.student_entropy},
                         {p.teacher_logprob_row_stride, p.kl_row_stride,
                          p.teacher_entropy_row_stride, p.student_entropy_row_stride},
                         {p.score, p.mean_kl, p.mean_teacher_entropy, p.mean_student_entropy},
                         {nullptr, nullptr, p.max_teacher_entropy, p.max_student_entropy}};
  return launch_rows(
      p, device, stream,
      [&](dim3 g, cudaStream_t s) { trajectory_stats_kernel<float><<<g, kThreads, 0, s>>>(p, a); },
      [&](dim3 g, cudaStream_t s) { trajectory_stats_kernel<double><<<g, kThreads, 0, s>>>(p, a); });
}

const char* fire_weights_cuda(const FireWeightsParams& p, int device, void* stream) {
  return launch_rows(
      p, device, stream,
      [&](dim3 g, cudaStream_t s) { fire_weights_kernel<float><<<g, kThreads, 0, s>>>(p); },
      [&](dim3 g, cudaStream_t s) { fire_weights_kernel<double><<<g, kThreads, 0, s>>>(p); });
}

const char* group_reward_moments_cuda(const GroupAdvParams& p, int device, void* stream) {
  return launch_rows(
      p, device, stream,
      [&](dim3 g, cudaStream_t s) { group_reward_moments_kernel<float><<<g, kThreads, 0, s>>>(p); },
      [&](dim3 g, cudaStream_t s) { group_reward_moments_kernel<double><<<g, kThreads, 0, s>>>(p); });
}

const char* group_advantages_apply_cuda(const GroupAdvParams& p, int device, void* stream) {
  return launch_rows(
      p, device, stream,
      [&](dim3 g, cudaStream_t s) { group_advantages_apply_kernel<float><<<g, kThreads, 0, s>>>(p); },
      [&](dim3 g, cudaStream_t s) {
        group_advantages_apply_kernel<double><<<g, kThreads, 0, s>>>(p);
      });
}

}  // namespace pyopd
