// Host emulation of the CUDA token_stats / reverse_kl kernels, for machines
// without a GPU (tests/test_cuda.py builds it with g++ as a shared library
// and calls it through ctypes). It runs the per-thread code of
// csrc/cuda/vocab_stats_core.cuh for every thread of a row in turn and
// reproduces the kernels' reductions: the warp butterfly, the cross-warp step
// of 256-thread rows, and the merge of the slices of a split row. What it
// does not cover: the launch code, shuffles and __shared__ themselves, and the
// device-only instructions (ex2.approx, __fmul_rn, __funnelshift_r), whose
// host stand-ins sit next to them in the core.
//
// Build (plain host C++, the toolkit only for its headers): g++ -std=c++17
// -shared -fPIC -ffp-contract=off -x c++ -I <cuda>/include -I csrc/include
// -I csrc/cuda tests/cuda_host/emulate.cu -o libemu.so
#include <cstdint>
#include <vector>

#include "vocab_stats_core.cuh"

namespace {

using namespace pyopd;
using namespace pyopd::vs_cuda;
constexpr int kTpr256 = 256;  // threads per row of block rows (kBlock in the kernels)

template <typename T> struct Tag { using type = T; };
template <typename F> int with_dtype(int d, F&& f) {
  switch (d) {
    case 0: return f(Tag<float>{});
    case 1: return f(Tag<__nv_bfloat16>{});
    case 2: return f(Tag<__half>{});
    case 3: return f(Tag<double>{});
  }
  return -1;
}
template <typename A, typename B>
constexpr bool kPairOk = std::is_same<A, double>::value == std::is_same<B, double>::value;

// warp_reduce<kLanes> over lanes[0, 32): every lane merges its xor partner's
// state of the previous step, as __shfl_xor_sync does.
template <int kLanes, bool kTeacher, typename Acc> void butterfly(RowState<Acc>* lanes) {
  for (int off = kLanes / 2; off > 0; off /= 2) {
    std::vector<RowState<Acc>> prev(lanes, lanes + 32);
    for (int l = 0; l < 32; ++l) merge<kTeacher>(lanes[l], prev[l ^ off]);
  }
}

// row_reduce: the merged state thread 0 of a TPR-thread row ends with.
template <int TPR, bool kTeacher, typename Acc> RowState<Acc> reduce_row(std::vector<RowState<Acc>> st) {
  for (int w = 0; w < TPR / 32; ++w) butterfly<32, kTeacher>(&st[32 * w]);
  if (TPR == 32) return st[0];
  std::vector<RowState<Acc>> warp0(32, empty_state<Acc>());
  for (int w = 0; w < TPR / 32; ++w) warp0[w] = st[32 * w];
  butterfly<TPR / 32, kTeacher>(warp0.data());
  return warp0[0];
}

void slice_of(int s, int64_t slice_len, int64_t len, int64_t& jb, int64_t& je) {
  jb = s * slice_len;
  jb = jb < len ? jb : len;
  je = jb + slice_len < len ? jb + slice_len : len;
}

template <typename S, typename T, int TPR>
void fwd_rows(const VocabStatsFwdParams& p, int n_slices, int64_t slice_len) {
  using Acc = acc_t<S>;
  constexpr bool kTeacher = !std::is_same<T, NoTeacher>::value;
  const int64_t len = kTeacher ? p.teacher_vocab : p.vocab;
  for (int64_t r = 0; r < p.n_rows; ++r) {
    if (p.mask != nullptr && !p.mask[r]) {
      write_fwd_zeros<Acc>(p, r, kTeacher);
      continue;
    }
    if (n_slices <= 1) {
      std::vector<RowState<Acc>> st(TPR);
      for (int tid = 0; tid < TPR; ++tid) st[tid] = fwd_row_part<S, T, TPR>(p, r, tid, 0, len);
      finalize_fwd<S, T>(p, r, reduce_row<TPR, kTeacher>(st));
      continue;
    }
    // Split row: per-slice block states, then the merge kernel's warp.
    std::vector<RowState<Acc>> part(n_slices);
    for (int s = 0; s < n_slices; ++s) {
      int64_t jb, je;
      slice_of(s, slice_len, len, jb, je);
      std::vector<RowState<Acc>> st(kTpr256);
      for (int tid = 0; tid < kTpr256; ++tid) st[tid] = fwd_row_part<S, T, kTpr256>(p, r, tid, jb, je);
      part[s] = reduce_row<kTpr256, kTeacher>(st);
    }
    std::vector<RowState<Acc>> lanes(32, empty_state<Acc>());
    for (int l = 0; l < 32; ++l)
      for (int s = l; s < n_slices; s += 32) merge<kTeacher>(lanes[l], part[s]);
    butterfly<32, kTeacher>(lanes.data());
    finalize_fwd<S, T>(p, r, lanes[0]);
  }
}

template <typename S, typename T, typename G, int TPR>
void bwd_rows(const VocabStatsBwdParams& p, int n_slices, int64_t slice_len) {
  for (int64_t r = 0; r < p.n_rows; ++r) {
    for (int s = 0; s < (n_slices > 1 ? n_slices : 1); ++s) {
      int64_t jb = 0, je = p.vocab;
      if (n_slices > 1) slice_of(s, slice_len, p.vocab, jb, je);
      for (int tid = 0; tid < TPR; ++tid) bwd_row_part<S, T, G, TPR>(p, r, tid, jb, je);
    }
  }
}

}  // namespace

// The input fields the forward and backward params share (VocabStatsInputs).
static void set_inputs(VocabStatsInputs& p, const void* student, int sdt, int64_t s_stride,
                       const void* teacher, int tdt, int64_t t_stride, const int64_t* tokens,
                       const bool* mask, int64_t n_rows, int64_t vocab, int64_t teacher_vocab,
                       double inv_t) {
  p.student = student;
  p.student_dtype = static_cast<DType>(sdt);
  p.student_row_stride = s_stride;
  p.teacher = teacher;
  p.teacher_dtype = static_cast<DType>(tdt);
  p.teacher_row_stride = t_stride;
  p.tokens = tokens;
  p.mask = mask;
  p.n_rows = n_rows;
  p.vocab = vocab;
  p.teacher_vocab = teacher_vocab;
  p.inv_temperature = inv_t;
}

// tpr: threads per row (32 or 256); n_slices > 1 splits rows into slices of
// slice_len ids (done by 256-thread blocks). outs: kl, student_entropy,
// teacher_entropy, student_logprob, teacher_logprob, student_lse, teacher_lse,
// stats; token_ok (may be null) is set to 0 for an out-of-range id on an
// unmasked row. Returns 0, or -1 for an unsupported combination.
extern "C" int emu_vocab_stats_fwd(const void* student, int sdt, int64_t s_stride, const void* teacher,
                                   int tdt, int64_t t_stride, const int64_t* tokens, const bool* mask,
                                   int64_t n_rows, int64_t vocab, int64_t teacher_vocab, double inv_t,
                                   void* const* outs, int tpr, int n_slices, int64_t slice_len,
                                   int32_t* token_ok) {
  VocabStatsFwdParams p;
  p.token_ok = token_ok;
  set_inputs(p, student, sdt, s_stride, teacher, tdt, t_stride, tokens, mask, n_rows, vocab,
             teacher_vocab, inv_t);
  p.kl = outs[0];
  p.student_entropy = outs[1];
  p.teacher_entropy = outs[2];
  p.student_logprob = outs[3];
  p.teacher_logprob = outs[4];
  p.student_lse = outs[5];
  p.teacher_lse = outs[6];
  p.stats = outs[7];
  return with_dtype(sdt, [&](auto ts) -> int {
    using S = typename decltype(ts)::type;
    auto run = [&](auto tt) -> int {
      using T = typename decltype(tt)::type;
      if (tpr == 32 && n_slices <= 1) fwd_rows<S, T, 32>(p, n_slices, slice_len);
      else fwd_rows<S, T, kTpr256>(p, n_slices, slice_len);
      return 0;
    };
    if (teacher == nullptr) return run(Tag<NoTeacher>{});
    return with_dtype(tdt, [&](auto tt) -> int {
      using T = typename decltype(tt)::type;
      if constexpr (kPairOk<S, T>) return run(tt); else return -1;
    });
  });
}

// grads: grad_kl, grad_logprob, grad_entropy, grad_lse (each may be null);
// saved: stats, kl, student_entropy.
extern "C" int emu_vocab_stats_bwd(const void* student, int sdt, int64_t s_stride, const void* teacher,
                                   int tdt, int64_t t_stride, const int64_t* tokens, const bool* mask,
                                   int64_t n_rows, int64_t vocab, int64_t teacher_vocab, double inv_t,
                                   const void* const* saved, const void* const* grads, void* grad_student,
                                   int gdt, int tpr, int n_slices, int64_t slice_len) {
  VocabStatsBwdParams p;
  set_inputs(p, student, sdt, s_stride, teacher, tdt, t_stride, tokens, mask, n_rows, vocab,
             teacher_vocab, inv_t);
  p.stats = saved[0];
  p.kl = saved[1];
  p.student_entropy = saved[2];
  p.grad_kl = grads[0];
  p.grad_logprob = grads[1];
  p.grad_entropy = grads[2];
  p.grad_lse = grads[3];
  p.grad_student = grad_student;
  p.grad_dtype = static_cast<DType>(gdt);
  return with_dtype(sdt, [&](auto ts) -> int {
    using S = typename decltype(ts)::type;
    return with_dtype(gdt, [&](auto tg) -> int {
      using G = typename decltype(tg)::type;
      // Gradients in the student's dtype or float32 (as the Python wrappers
      // allocate them); other pairs are not instantiated to keep the build short.
      constexpr bool kGradOk = std::is_same<G, S>::value ||
                               (std::is_same<G, float>::value && !std::is_same<S, double>::value);
      if constexpr (!kGradOk) {
        return -1;
      } else {
        auto run = [&](auto tt) -> int {
          using T = typename decltype(tt)::type;
          if (tpr == 32 && n_slices <= 1) bwd_rows<S, T, G, 32>(p, n_slices, slice_len);
          else bwd_rows<S, T, G, kTpr256>(p, n_slices, slice_len);
          return 0;
        };
        if (p.grad_kl == nullptr) return run(Tag<NoTeacher>{});
        return with_dtype(tdt, [&](auto tt) -> int {
          using T = typename decltype(tt)::type;
          if constexpr (kPairOk<S, T>) return run(tt); else return -1;
        });
      }
    });
  });
}
