// Trajectory scores, FiRe-OPD token weights, COPSD group advantages.
//
// One-pass reductions over [B, T] per-token tensors (B rollouts, T response
// positions). Plain structs of pointers and sizes; the kernels know nothing of
// torch or pybind11. See docs/design.md (FiRe-OPD, COPSD) for the math and
// pyopd/ops/signals.py for the torch API built on these.
//
// Split of the work: the kernels do everything that touches [B, T] memory
// (one launch per pass, each row read once and kept in cache for a second
// sweep); whatever needs the whole batch (quantile over scores, maxima,
// group statistics, possibly across ranks) is a reduction over [B] values
// and stays in the Python wrapper, which can all-gather it.
//
// Conventions shared by all three kernels:
//   - float inputs and outputs are all `dtype` (float32 or float64); [B]
//     accumulators documented as float64 are float64 whatever `dtype` is;
//   - every [B, T] input has a contiguous last dimension and its own row
//     stride (elements between rows), so slices need no copy; [B, T] outputs
//     are contiguous (row stride T);
//   - `mask` is [B, T] bool (1 byte, 0/1) with its own row stride; nullptr
//     means every position is valid. Masked positions are never read into a
//     result (a NaN there is ignored) and their outputs are written as 0;
//   - NaN at a valid position propagates into that row's results;
//   - rows == 0 or cols == 0 is legal and does nothing but write the [B]
//     outputs of empty rows.
#pragma once

#include <cstdint>

#include "pyopd/common.h"

namespace pyopd {

// Per-rollout masked means (and maxima of the two entropies) of up to four
// per-token signals. Used by trajectory_scores (all of them) and by
// fire_token_weights (entropy maxima only).
struct TrajectoryStatsParams {
  int64_t rows = 0;  // B
  int64_t cols = 0;  // T
  DType dtype = DType::kFloat32;  // of every float input and output: float32 or float64
  const bool* mask = nullptr;     // [B, T] or nullptr (all valid)
  int64_t mask_row_stride = 0;

  // inputs [B, T]; each may be nullptr (absent)
  const void* teacher_logprob = nullptr;  // log q(y_t)
  int64_t teacher_logprob_row_stride = 0;
  const void* kl = nullptr;  // per-token reverse KL(p || q)
  int64_t kl_row_stride = 0;
  const void* teacher_entropy = nullptr;  // H_t
  int64_t teacher_entropy_row_stride = 0;
  const void* student_entropy = nullptr;  // H_s
  int64_t student_entropy_row_stride = 0;

  // outputs [B]; each may be nullptr (not wanted) and must be nullptr when
  // its input is absent. Means are 0 for a row with no valid position.
  int64_t* length = nullptr;            // number of valid positions (required)
  void* score = nullptr;                // mean of teacher_logprob (FiRe-OPD's S_i)
  void* mean_kl = nullptr;
  void* mean_teacher_entropy = nullptr;
  void* mean_student_entropy = nullptr;
  // max(0, max over valid positions): entropies are >= 0, and the floor at 0
  // gives an empty row 0 and absorbs rounding below zero.
  void* max_teacher_entropy = nullptr;
  void* max_student_entropy = nullptr;
};

// FiRe-OPD soft token weights, for valid positions of kept rows:
//   c_t = clamp(1 - H_t / Mt_i, 0, 1), c_s = clamp(H_s / Ms_i, 0, 1)
//   w   = (1 + alpha c_t)(1 + beta c_s)
// where Mt_i, Ms_i are per-row normalisers (the wrapper fills them with the
// batch or per-teacher maxima); x / M is taken as 0 when M == 0 (then every
// valid x is 0 too). 0 at masked positions and on rows that are not kept.
struct FireWeightsParams {
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kFloat32;
  const bool* mask = nullptr;
  int64_t mask_row_stride = 0;
  const void* teacher_entropy = nullptr;  // [B, T], required
  int64_t teacher_entropy_row_stride = 0;
  const void* student_entropy = nullptr;  // [B, T], required
  int64_t student_entropy_row_stride = 0;
  const bool* keep = nullptr;                // [B] or nullptr (every row kept)
  const void* teacher_entropy_max = nullptr;  // [B] Mt_i >= 0, dtype, required
  const void* student_entropy_max = nullptr;  // [B] Ms_i >= 0, dtype, required
  double alpha = 1.0;
  double beta = 1.0;
  // true: scale each kept row so its weights average 1 over its valid
  // positions (FiRe-OPD Eq. 8); false: write the raw weights (the wrapper
  // then normalises over the batch with row_sum / row_count).
  bool normalize_rows = true;

  void* weight = nullptr;       // [B, T] contiguous, dtype, required
  double* row_sum = nullptr;    // [B] float64: sum of the raw (unnormalised) weights, or nullptr
  int64_t* row_count = nullptr; // [B] valid positions of kept rows (0 for dropped rows), or nullptr
};

// COPSD dense group advantage, in two passes around a [B]-sized reduction:
//   r_t = clip(teacher_logprob - student_logprob, clip_low, clip_high) + bonus
// Pass 1 (group_reward_moments): per row, count, mean and M2 = sum (r - mean)^2
// over valid positions: two sweeps over the cached row (no E[r^2] - E[r]^2
// cancellation), the first shifted by the row's first valid reward so that an
// all-equal row has its mean exactly and M2 exactly 0. The wrapper pools the
// rows of a group with Chan's formula (possibly across ranks).
// Pass 2 (group_advantages_apply): A_t = (r_t - group_mean_i) / (group_std_i + eps)
// at valid positions, 0 elsewhere.
struct GroupAdvParams {
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kFloat32;
  const bool* mask = nullptr;
  int64_t mask_row_stride = 0;
  const void* teacher_logprob = nullptr;  // [B, T] log q(y_t), required
  int64_t teacher_logprob_row_stride = 0;
  const void* student_logprob = nullptr;  // [B, T] log p(y_t) of the rollout policy, required
  int64_t student_logprob_row_stride = 0;
  double clip_low = -3.0;
  double clip_high = 5.0;
  double bonus = 0.02;

  // pass 1 outputs, [B] (required by pass 1); mean and m2 are 0 for empty rows
  int64_t* row_count = nullptr;
  double* row_mean = nullptr;
  double* row_m2 = nullptr;

  // pass 2 inputs [B] float64 (the statistics of the row's group) and output
  const double* group_mean = nullptr;
  const double* group_std = nullptr;
  double eps = 1e-6;
  void* advantage = nullptr;  // [B, T] contiguous, dtype
};

// Each returns nullptr on success, else a static message.
const char* trajectory_stats_cpu(const TrajectoryStatsParams& p);
const char* fire_weights_cpu(const FireWeightsParams& p);
const char* group_reward_moments_cpu(const GroupAdvParams& p);
const char* group_advantages_apply_cpu(const GroupAdvParams& p);
#ifdef PYOPD_WITH_CUDA
// Launch on CUDA device `device` and stream `stream` (a cudaStream_t); asynchronous.
const char* trajectory_stats_cuda(const TrajectoryStatsParams& p, int device, void* stream);
const char* fire_weights_cuda(const FireWeightsParams& p, int device, void* stream);
const char* group_reward_moments_cuda(const GroupAdvParams& p, int device, void* stream);
const char* group_advantages_apply_cuda(const GroupAdvParams& p, int device, void* stream);
#endif

}  // namespace pyopd
