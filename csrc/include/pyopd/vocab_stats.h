// Per-token vocabulary statistics: token_stats (one model) and reverse_kl
// (student vs teacher), forward and backward. Plain structs of pointers and
// sizes; the kernels know nothing of torch or pybind11.
//
// Conventions (see docs/design.md, "The vocabulary pass"):
//   x_j = s_j / T (student, j < V), y_j = t_j / T (teacher, j < Vt, Vt >= V)
//   p = softmax(x), q = softmax(y)
// Per row the kernels keep the running max m and Z = sum exp(x - m), so
// lse = m + log Z; log p_j = (x_j - m) - log Z is formed without subtracting
// two large numbers, which keeps logits of 1e4 accurate.
#pragma once

#include <cstdint>

#include "pyopd/common.h"

namespace pyopd {

// The inputs of both passes (the backward reads the same logits, tokens and mask).
struct VocabStatsInputs {
  const void* student = nullptr;   // [N, V] rows, last dim contiguous
  DType student_dtype = DType::kFloat32;
  int64_t student_row_stride = 0;  // elements between rows
  const void* teacher = nullptr;   // [N, Vt] or nullptr for token_stats
  DType teacher_dtype = DType::kFloat32;
  int64_t teacher_row_stride = 0;
  const int64_t* tokens = nullptr;  // [N] sampled ids in [0, V), or nullptr
  const bool* mask = nullptr;       // [N] true where the row counts, or nullptr (all)
  int64_t n_rows = 0;
  int64_t vocab = 0;          // V
  int64_t teacher_vocab = 0;  // Vt
  double inv_temperature = 1.0;
};

struct VocabStatsFwdParams : VocabStatsInputs {
  // outputs, each [N], float32 (float64 when the inputs are float64)
  void* kl = nullptr;                // reverse_kl only
  void* student_entropy = nullptr;
  void* teacher_entropy = nullptr;   // reverse_kl only
  void* student_logprob = nullptr;   // 0 where tokens == nullptr
  void* teacher_logprob = nullptr;   // reverse_kl only
  void* student_lse = nullptr;
  void* teacher_lse = nullptr;       // reverse_kl only
  // [N, 4]: (m_s, log Z_s, m_t, log Z_t), what backward needs to recompute p, q
  void* stats = nullptr;
  // CUDA only, optional: a device int set to 0 when an unmasked row's id lies
  // outside [0, V); the caller asserts on it asynchronously (no host sync).
  // The CPU kernels ignore it (the Python wrapper raises there).
  int32_t* token_ok = nullptr;
};

struct VocabStatsBwdParams : VocabStatsInputs {
  // saved from forward ([N] and [N, 4]), float32 or float64 like the outputs
  const void* stats = nullptr;
  const void* kl = nullptr;               // needed when grad_kl != nullptr
  const void* student_entropy = nullptr;  // needed when grad_entropy != nullptr
  // upstream gradients, [N], nullptr means zero
  const void* grad_kl = nullptr;
  const void* grad_logprob = nullptr;
  const void* grad_entropy = nullptr;
  const void* grad_lse = nullptr;

  void* grad_student = nullptr;  // [N, V] contiguous
  DType grad_dtype = DType::kFloat32;
};

// Returns nullptr on success, else a static message.
const char* vocab_stats_fwd_cpu(const VocabStatsFwdParams& p);
const char* vocab_stats_bwd_cpu(const VocabStatsBwdParams& p);
#ifdef PYOPD_WITH_CUDA
// Launch on CUDA device `device` and stream `stream` (a cudaStream_t).
const char* vocab_stats_fwd_cuda(const VocabStatsFwdParams& p, int device, void* stream);
const char* vocab_stats_bwd_cuda(const VocabStatsBwdParams& p, int device, void* stream);
#endif

}  // namespace pyopd
