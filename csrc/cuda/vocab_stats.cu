// CUDA kernels for token_stats / reverse_kl (forward and backward).
//
// Memory-bound by design: the forward reads each row once (online max and
// sum-exp, vocab_stats_core.cuh), the backward reads it once more and writes
// the gradient. Launch shapes:
//   - rows longer than kWarpRowMax ids: one 256-thread block per row; the
//     per-thread states are merged by warp shuffles, then across the 8 warps
//     through shared memory;
//   - shorter rows: one warp per row, 8 rows per block, shuffles only;
//   - few long rows (rows x 1 block < 2x the SM count): each row is split into
//     slices of its ids, one block per (row, slice). The forward writes each
//     slice's partial state (max, sums, cross term) to a workspace and a merge
//     kernel combines them with the same merge() as the threads' states, then
//     writes the outputs; the backward needs only the saved per-row stats, so
//     its slices are independent.
// Rows are walked in 16-byte chunks after a scalar head that aligns the lead
// pointer (student in the forward, gradient in the backward); the other
// streams are read in chunks too, at whatever offset they have
// (load_chunk_at), so a vocabulary of 32001 or slices at different offsets
// still use vector loads. Masked rows write zeros and read no logits.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "pyopd/runtime.h"
#include "pyopd/vocab_stats.h"
#include "device_guard.cuh"
#include "pyopd/dispatch.h"
#include "vocab_stats_core.cuh"

namespace pyopd {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

namespace vs_cuda {
namespace {

constexpr int kBlock = 256;
// Resident blocks per SM the register budget must allow: 4 x 256 threads with
// <= 64 registers each. Stating it also makes ptxas issue a step's loads
// together (without it, it trades them for fewer registers and serialises
// them with the compute); float64 needs more registers.
template <typename Acc> constexpr int kMinBlocks = sizeof(Acc) == 8 ? 2 : 4;
constexpr int kWarpRowMax = 4096;   // longest row given to a single warp
constexpr int64_t kMaxRow = 1 << 30;  // ids are int inside a row
// Split rows: at most kMaxSlices slices of at least kMinSlice ids (a block
// should stream several 16-byte words per thread), slice starts a multiple of
// kSliceAlign ids (16-byte aligned when the row is).
constexpr int kMaxSlices = 128;
constexpr int64_t kMinSlice = 4096;
constexpr int64_t kSliceAlign = 256;

// ---- reductions of RowState ---------------------------------------------------

template <typename Acc> __device__ __forceinline__ Acc shfl_xor(Acc v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// Butterfly over groups of kLanes lanes: every lane of a group ends with the
// merge of the group's states. All 32 lanes must call it.
template <int kLanes, bool kTeacher, typename Acc>
__device__ __forceinline__ void warp_reduce(RowState<Acc>& st) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) {
    RowState<Acc> o;
    o.s.m = shfl_xor(st.s.m, off);
    o.s.Z = shfl_xor(st.s.Z, off);
    o.s.A = shfl_xor(st.s.A, off);
    if constexpr (kTeacher) {
      o.t.m = shfl_xor(st.t.m, off);
      o.t.Z = shfl_xor(st.t.Z, off);
      o.t.A = shfl_xor(st.t.A, off);
      o.D = shfl_xor(st.D, off);
      o.H = shfl_xor(st.H, off);
    } else {
      o.t = st.t;
      o.D = st.D;
      o.H = st.H;
    }
    merge<kTeacher>(st, o);
  }
}

// Merges the TPR states of a row into thread 0 of the row. For TPR == kBlock
// every thread of the block must call it (it synchronises).
template <int TPR, bool kTeacher, typename Acc>
__device__ __forceinline__ void row_reduce(RowState<Acc>& st, RowState<Acc>* red) {
  warp_reduce<32, kTeacher>(st);
  if constexpr (TPR > 32) {
    static_assert(TPR == kBlock, "a multi-warp row spans the whole block");
    constexpr int kWarps = TPR / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarps ? red[lane] : empty_state<Acc>();
      warp_reduce<kWarps, kTeacher>(st);
    }
  } else {
    (void)red;
  }
}

// ---- kernels ---------------------------------------------------------------------
// Rows are assigned TPR threads each (kBlock / TPR rows per block); the row
// loop only matters for grids beyond 2^31 - 1 blocks.

template <typename S, typename T, int TPR>
__global__ void __launch_bounds__(kBlock, kMinBlocks<acc_t<S>>)
    vocab_stats_fwd_kernel(const VocabStatsFwdParams p) {
  using Acc = acc_t<S>;
  constexpr bool kTeacher = !std::is_same<T, NoTeacher>::value;
  constexpr int kRowsPerBlock = kBlock / TPR;
  constexpr int kWarps = TPR / 32;
  __shared__ RowState<Acc> red[kWarps];
  const int tid = threadIdx.x % TPR;
  const int64_t len = kTeacher ? p.teacher_vocab : p.vocab;
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR; r < p.n_rows;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    // Uniform over the row's threads, so the block-wide syncs stay matched.
    if (p.mask != nullptr && !p.mask[r]) {
      if (tid == 0) write_fwd_zeros<Acc>(p, r, kTeacher);
      continue;
    }
    RowState<Acc> st = fwd_row_part<S, T, TPR>(p, r, tid, 0, len);
    row_reduce<TPR, kTeacher>(st, red);
    if (tid == 0) finalize_fwd<S, T>(p, r, st);
    if constexpr (kWarps > 1) __syncthreads();  // `red` is reused by the next row
  }
}

// Ids [jb, je) of a split row: slice `s` of `n_slices` of `slice_len` ids.
struct SliceOf {
  int64_t jb, je;
  __device__ SliceOf(int s, int64_t slice_len, int64_t len) {
    jb = s * slice_len;
    jb = jb < len ? jb : len;
    je = jb + slice_len < len ? jb + slice_len : len;
  }
};

// Split forward, pass 1: block (row-block x, slice y) writes the partial state
// of its slice to part[r * n_slices + slice]. Masked rows are left to pass 2.
template <typename S, typename T>
__global__ void __launch_bounds__(kBlock, kMinBlocks<acc_t<S>>)
    vocab_stats_fwd_part_kernel(const VocabStatsFwdParams p, RowState<acc_t<S>>* part,
                                int64_t slice_len) {
  using Acc = acc_t<S>;
  constexpr bool kTeacher = !std::is_same<T, NoTeacher>::value;
  __shared__ RowState<Acc> red[kBlock / 32];
  const int64_t len = kTeacher ? p.teacher_vocab : p.vocab;
  const SliceOf sl(blockIdx.y, slice_len, len);
  for (int64_t r = blockIdx.x; r < p.n_rows; r += gridDim.x) {
    if (p.mask != nullptr && !p.mask[r]) continue;
    RowState<Acc> st = fwd_row_part<S, T, kBlock>(p, r, threadIdx.x, sl.jb, sl.je);
    row_reduce<kBlock, kTeacher>(st, red);
    if (threadIdx.x == 0) part[r * gridDim.y + blockIdx.y] = st;
    __syncthreads();
  }
}

// Split forward, pass 2: one warp per row merges the row's n_slices partial
// states (lane l takes slices l, l + 32, ...; then the butterfly) and writes
// the outputs, exactly as the unsplit kernel does after its reduction.
template <typename S, typename T>
__global__ void __launch_bounds__(kBlock)
    vocab_stats_fwd_merge_kernel(const VocabStatsFwdParams p, const RowState<acc_t<S>>* part,
                                 int n_slices) {
  using Acc = acc_t<S>;
  constexpr bool kTeacher = !std::is_same<T, NoTeacher>::value;
  constexpr int kRowsPerBlock = kBlock / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32; r < p.n_rows;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    if (p.mask != nullptr && !p.mask[r]) {
      if (lane == 0) write_fwd_zeros<Acc>(p, r, kTeacher);
      continue;
    }
    RowState<Acc> st = empty_state<Acc>();
    for (int s = lane; s < n_slices; s += 32) merge<kTeacher>(st, part[r * n_slices + s]);
    warp_reduce<32, kTeacher>(st);
    if (lane == 0) finalize_fwd<S, T>(p, r, st);
  }
}

// Backward; gridDim.y > 1 splits each row into slices of slice_len ids (the
// rows then have a whole block each, TPR == kBlock).
template <typename S, typename T, typename G, int TPR>
__global__ void __launch_bounds__(kBlock, kMinBlocks<acc_t<S>>)
    vocab_stats_bwd_kernel(const VocabStatsBwdParams p, int64_t slice_len) {
  constexpr int kRowsPerBlock = kBlock / TPR;
  const int tid = threadIdx.x % TPR;
  const SliceOf sl(blockIdx.y, slice_len, p.vocab);
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR; r < p.n_rows;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    bwd_row_part<S, T, G, TPR>(p, r, tid, sl.jb, sl.je);
  }
}

// ---- host side -------------------------------------------------------------------

// Calls f(Tag<storage type>) for a dtype tag (pyopd/dispatch.h with CUDA's 16-bit types).
template <typename F> const char* with_dtype(DType d, F&& f) {
  return pyopd::with_dtype<__nv_bfloat16, __half>(d, static_cast<F&&>(f));
}

// float64 comes only as a pair (student with teacher, logits with gradient).
template <typename A, typename B>
constexpr bool kPairOk = std::is_same<A, double>::value == std::is_same<B, double>::value;

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

unsigned int grid_for(int64_t n_rows, int rows_per_block) {
  const int64_t blocks = (n_rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned int>(blocks < 0x7fffffff ? blocks : 0x7fffffff);  // rows loop past it
}

// Streaming multiprocessors of the current device (cached per ordinal).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0: not asked yet; a benign race (same value)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev >= 0 && dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  int n = 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) n = 1;
  if (dev >= 0 && dev < kMaxDevices) cache[dev] = n;
  return n;
}

// How a row of `len` ids is split when there are `n_rows` rows: slices of
// slice_len ids (a multiple of kSliceAlign), n_slices of them; 1 slice: no split.
struct Split {
  int n_slices = 1;
  int64_t slice_len = 0;
};
Split split_for(int64_t n_rows, int64_t len) {
  Split sp;
  sp.slice_len = len;
  if (len <= kWarpRowMax) return sp;  // warp rows: 8 per block, never split
  const int64_t target = 2 * int64_t(sm_count());
  if (n_rows >= target) return sp;
  int64_t n = (target + n_rows - 1) / n_rows;
  n = n < len / kMinSlice ? n : len / kMinSlice;
  n = n < kMaxSlices ? n : kMaxSlices;
  if (n <= 1) return sp;
  int64_t sl = (len + n - 1) / n;
  sl = (sl + kSliceAlign - 1) / kSliceAlign * kSliceAlign;
  sp.slice_len = sl;
  sp.n_slices = static_cast<int>((len + sl - 1) / sl);
  return sp;
}

template <typename S, typename T>
const char* launch_fwd(const VocabStatsFwdParams& p, cudaStream_t stream) {
  using Acc = acc_t<S>;
  const int64_t longest = std::is_same<T, NoTeacher>::value ? p.vocab : p.teacher_vocab;
  if (longest <= kWarpRowMax) {
    vocab_stats_fwd_kernel<S, T, 32><<<grid_for(p.n_rows, kBlock / 32), kBlock, 0, stream>>>(p);
    return last_error();
  }
  const Split sp = split_for(p.n_rows, longest);
  if (sp.n_slices > 1) {
    // The partial states live in a stream-ordered allocation (a few KB). Where
    // the device has no memory pools, the unsplit kernel does the work.
    RowState<Acc>* part = nullptr;
    const size_t bytes = size_t(p.n_rows) * sp.n_slices * sizeof(RowState<Acc>);
    if (cudaMallocAsync(reinterpret_cast<void**>(&part), bytes, stream) == cudaSuccess) {
      const dim3 grid(grid_for(p.n_rows, 1), sp.n_slices);
      vocab_stats_fwd_part_kernel<S, T><<<grid, kBlock, 0, stream>>>(p, part, sp.slice_len);
      vocab_stats_fwd_merge_kernel<S, T>
          <<<grid_for(p.n_rows, kBlock / 32), kBlock, 0, stream>>>(p, part, sp.n_slices);
      const char* err = last_error();
      cudaFreeAsync(part, stream);
      const char* free_err = last_error();
      return err != nullptr ? err : free_err;
    }
    cudaGetLastError();  // clear the failed allocation; fall through
  }
  vocab_stats_fwd_kernel<S, T, kBlock><<<grid_for(p.n_rows, 1), kBlock, 0, stream>>>(p);
  return last_error();
}

template <typename S, typename T, typename G>
const char* launch_bwd(const VocabStatsBwdParams& p, cudaStream_t stream) {
  if (p.vocab <= kWarpRowMax) {
    vocab_stats_bwd_kernel<S, T, G, 32>
        <<<grid_for(p.n_rows, kBlock / 32), kBlock, 0, stream>>>(p, p.vocab);
  } else {
    const Split sp = split_for(p.n_rows, p.vocab);
    const dim3 grid(grid_for(p.n_rows, 1), sp.n_slices);
    vocab_stats_bwd_kernel<S, T, G, kBlock><<<grid, kBlock, 0, stream>>>(p, sp.slice_len);
  }
  return last_error();
}


template <typename P> const char* check_sizes(const P& p) {
  if (p.vocab <= 0 || p.vocab > kMaxRow) return "vocab must be in [1, 2^30] for the CUDA kernels";
  if (p.teacher != nullptr && (p.teacher_vocab < p.vocab || p.teacher_vocab > kMaxRow)) {
    return "teacher_vocab must be in [vocab, 2^30] for the CUDA kernels";
  }
  return nullptr;
}

}  // namespace
}  // namespace vs_cuda

const char* vocab_stats_fwd_cuda(const VocabStatsFwdParams& p, int device, void* stream) {
  using namespace vs_cuda;
  if (p.n_rows <= 0) return nullptr;
  if (const char* e = check_sizes(p)) return e;
  DeviceScope scope(device);
  if (scope.error != nullptr) return scope.error;
  const auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(p.student_dtype, [&](auto ts) -> const char* {
    using S = typename decltype(ts)::type;
    if (p.teacher == nullptr) return launch_fwd<S, NoTeacher>(p, s);
    return with_dtype(p.teacher_dtype, [&](auto tt) -> const char* {
      using T = typename decltype(tt)::type;
      if constexpr (kPairOk<S, T>) {
        return launch_fwd<S, T>(p, s);
      } else {
        return "float64 logits need both student and teacher in float64";
      }
    });
  });
}

const char* vocab_stats_bwd_cuda(const VocabStatsBwdParams& p, int device, void* stream) {
  using namespace vs_cuda;
  if (p.n_rows <= 0) return nullptr;
  if (const char* e = check_sizes(p)) return e;
  if (p.grad_kl != nullptr && (p.teacher == nullptr || p.kl == nullptr)) {
    return "grad_kl needs teacher and kl";
  }
  DeviceScope scope(device);
  if (scope.error != nullptr) return scope.error;
  const auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(p.student_dtype, [&](auto ts) -> const char* {
    using S = typename decltype(ts)::type;
    return with_dtype(p.grad_dtype, [&](auto tg) -> const char* {
      using G = typename decltype(tg)::type;
      if constexpr (!kPairOk<S, G>) {
        return "grad_dtype must be float64 exactly when the logits are float64";
      } else if (p.grad_kl == nullptr) {
        return launch_bwd<S, NoTeacher, G>(p, s);  // the teacher is never read
      } else {
        return with_dtype(p.teacher_dtype, [&](auto tt) -> const char* {
          using T = typename decltype(tt)::type;
          if constexpr (kPairOk<S, T>) {
            return launch_bwd<S, T, G>(p, s);
          } else {
            return "float64 logits need both student and teacher in float64";
          }
        });
      }
    });
  });
}

}  // namespace pyopd
