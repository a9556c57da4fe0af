// CPU kernels for trajectory_scores, fire_token_weights and group_advantages
// (see pyopd/signals.h). One OpenMP thread per block of rows; inner loops are
// `omp simd` reductions over one row, which stays in L1/L2 between the two
// sweeps that some of them make. Sums are accumulated in double.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "pyopd/signals.h"
#include "pyopd/dispatch.h"

namespace pyopd {
namespace {

template <typename T>
inline const T* row_of(const void* base, int64_t row_stride, int64_t i) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + i * row_stride;
}

inline const bool* mask_row(const bool* mask, int64_t row_stride, int64_t i) {
  return mask == nullptr ? nullptr : mask + i * row_stride;
}

// c ? a : b as a bitwise blend, for the bodies of vectorised loops: a `?:` on
// floats becomes a branch, GCC may move arithmetic (which can trap under the
// default -ftrapping-math) or a load into its arms, and a loop with such
// control flow is only vectorised where the ISA has masked operations. These
// kernels are built for the baseline ISA (SSE2 on x86-64), which has none.
template <typename C>
inline C pick(bool c, C a, C b) {
  using U = std::conditional_t<sizeof(C) == 8, uint64_t, uint32_t>;
  const U m = U(0) - static_cast<U>(c);
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(C));
  std::memcpy(&ub, &b, sizeof(C));
  const U u = (ua & m) | (ub & ~m);
  C out;
  std::memcpy(&out, &u, sizeof(C));
  return out;
}

// NaN-propagating clamp (torch.clamp semantics): comparisons with NaN are false.
template <typename C>
inline C clamp_to(C x, C lo, C hi) {
  if constexpr (sizeof(C) == 8) {
    // SSE2 cannot widen a double comparison into the 0/1 the blend needs;
    // plain selects of values (no arithmetic in the arms) vectorise there.
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
  } else {
    return pick(x < lo, lo, pick(x > hi, hi, x));
  }
}

// The mask's value at t, or true without a mask; loops are instantiated for
// both cases so that neither has a branch (nor a conditional load) inside.
template <bool kMasked>
inline bool on(const bool* m, int64_t t) {
  if constexpr (kMasked) {
    // Read as a byte: GCC finds no vector type for `bool` loads feeding
    // float selects.
    return reinterpret_cast<const uint8_t*>(m)[t] != 0;
  } else {
    (void)m;
    (void)t;
    return true;
  }
}

// Fork threads only for enough work to repay it: a parallel region costs a
// few microseconds on an idle machine and a scheduler tick (~10 ms) when a
// worker thread has been preempted on a busy one.
inline bool worth_threads(int64_t rows, int64_t cols) { return rows > 1 && rows * cols >= (int64_t(1) << 15); }

inline int64_t count_valid(const bool* m, int64_t n) {
  if (m == nullptr) return n;
  int64_t c = 0;
  const uint8_t* mb = reinterpret_cast<const uint8_t*>(m);
#pragma omp simd reduction(+ : c)
  for (int64_t t = 0; t < n; ++t) c += mb[t] != 0 ? 1 : 0;
  return c;
}

// ---- trajectory_stats ------------------------------------------------------------

template <typename T>
const char* trajectory_stats_impl(const TrajectoryStatsParams& p) {
  constexpr int kChannels = 4;
  const void* in[kChannels] = {p.teacher_logprob, p.kl, p.teacher_entropy, p.student_entropy};
  const int64_t in_stride[kChannels] = {p.teacher_logprob_row_stride, p.kl_row_stride,
                                        p.teacher_entropy_row_stride,
                                        p.student_entropy_row_stride};
  T* mean_out[kChannels] = {static_cast<T*>(p.score), static_cast<T*>(p.mean_kl),
                            static_cast<T*>(p.mean_teacher_entropy),
                            static_cast<T*>(p.mean_student_entropy)};
  T* max_out[kChannels] = {nullptr, nullptr, static_cast<T*>(p.max_teacher_entropy),
                           static_cast<T*>(p.max_student_entropy)};
  const int64_t n_cols = p.cols;

#pragma omp parallel for schedule(static) if (worth_threads(p.rows, p.cols))
  for (int64_t i = 0; i < p.rows; ++i) {
    const bool* m = mask_row(p.mask, p.mask_row_stride, i);
    const int64_t n = count_valid(m, n_cols);
    p.length[i] = n;
    for (int c = 0; c < kChannels; ++c) {
      if (mean_out[c] == nullptr && max_out[c] == nullptr) continue;
      const T* x = row_of<T>(in[c], in_stride[c], i);
      double sum = 0.0;
      T mx = T(0);
      int64_t nans = 0;
      if (m != nullptr) {
#pragma omp simd reduction(+ : sum, nans) reduction(max : mx)
        for (int64_t t = 0; t < n_cols; ++t) {
          const T v = pick(on<true>(m, t), x[t], T(0));  // select, never multiply: NaN in padding stays out
          sum += double(v);
          mx = v > mx ? v : mx;
          nans += (v != v) ? 1 : 0;
        }
      } else {
#pragma omp simd reduction(+ : sum, nans) reduction(max : mx)
        for (int64_t t = 0; t < n_cols; ++t) {
          const T v = x[t];
          sum += double(v);
          mx = v > mx ? v : mx;
          nans += (v != v) ? 1 : 0;
        }
      }
      if (mean_out[c] != nullptr) mean_out[c][i] = n > 0 ? T(sum / double(n)) : T(0);
      if (max_out[c] != nullptr) {
        max_out[c][i] = nans > 0 ? std::numeric_limits<T>::quiet_NaN() : mx;
      }
    }
  }
  return nullptr;
}

// ---- fire_weights ----------------------------------------------------------------

template <typename T>
const char* fire_weights_impl(const FireWeightsParams& p) {
  const int64_t n_cols = p.cols;
  const T alpha = T(p.alpha), beta = T(p.beta);
  const T* tmax = static_cast<const T*>(p.teacher_entropy_max);
  const T* smax = static_cast<const T*>(p.student_entropy_max);

#pragma omp parallel for schedule(static) if (worth_threads(p.rows, p.cols))
  for (int64_t i = 0; i < p.rows; ++i) {
    T* w = static_cast<T*>(p.weight) + i * n_cols;
    const bool kept = p.keep == nullptr || p.keep[i];
    if (!kept) {
      for (int64_t t = 0; t < n_cols; ++t) w[t] = T(0);
      if (p.row_sum) p.row_sum[i] = 0.0;
      if (p.row_count) p.row_count[i] = 0;
      continue;
    }
    const bool* m = mask_row(p.mask, p.mask_row_stride, i);
    const T* ht = row_of<T>(p.teacher_entropy, p.teacher_entropy_row_stride, i);
    const T* hs = row_of<T>(p.student_entropy, p.student_entropy_row_stride, i);
    // x / M with M == 0 is 0; a NaN normaliser (NaN somewhere in the batch) propagates.
    const T mt = tmax[i], ms = smax[i];
    const bool use_t = !(mt <= T(0)), use_s = !(ms <= T(0));
    const T dt = use_t ? mt : T(1), ds = use_s ? ms : T(1);
    double sum = 0.0;
    int64_t n = 0;
    auto sweep = [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
#pragma omp simd reduction(+ : sum, n)
      for (int64_t t = 0; t < n_cols; ++t) {
        const bool v = on<kMasked>(m, t);
        const T rt = pick(use_t, ht[t] / dt, T(0));
        const T rs = pick(use_s, hs[t] / ds, T(0));
        const T ct = clamp_to(T(1) - rt, T(0), T(1));
        const T cs = clamp_to(rs, T(0), T(1));
        const T wt = pick(v, (T(1) + alpha * ct) * (T(1) + beta * cs), T(0));
        w[t] = wt;
        sum += double(wt);
        n += static_cast<int64_t>(v);
      }
    };
    if (m != nullptr) {
      sweep(std::true_type{});
    } else {
      sweep(std::false_type{});
    }
    if (p.row_sum) p.row_sum[i] = sum;
    if (p.row_count) p.row_count[i] = n;
    if (p.normalize_rows && n > 0) {
      const T scale = T(double(n) / sum);
#pragma omp simd
      for (int64_t t = 0; t < n_cols; ++t) w[t] *= scale;
    }
  }
  return nullptr;
}

// ---- group advantages ------------------------------------------------------------

template <typename T>
inline double reward(T lq, T lp, double lo, double hi, double bonus) {
  return clamp_to(double(lq) - double(lp), lo, hi) + bonus;
}

template <typename T>
const char* group_reward_moments_impl(const GroupAdvParams& p) {
  const int64_t n_cols = p.cols;
  const double lo = p.clip_low, hi = p.clip_high, bonus = p.bonus;

#pragma omp parallel for schedule(static) if (worth_threads(p.rows, p.cols))
  for (int64_t i = 0; i < p.rows; ++i) {
    const bool* m = mask_row(p.mask, p.mask_row_stride, i);
    const T* lq = row_of<T>(p.teacher_logprob, p.teacher_logprob_row_stride, i);
    const T* lp = row_of<T>(p.student_logprob, p.student_logprob_row_stride, i);
    // Shift by the first valid reward: an all-equal row then has mean exactly
    // that reward and M2 exactly 0 (so a constant group gets A = 0, not 1e-11).
    int64_t first = 0;
    while (first < n_cols && m != nullptr && !m[first]) ++first;
    if (first >= n_cols) {
      p.row_count[i] = 0;
      p.row_mean[i] = 0.0;
      p.row_m2[i] = 0.0;
      continue;
    }
    const double shift = reward(lq[first], lp[first], lo, hi, bonus);
    double sum = 0.0, m2 = 0.0, mean = 0.0;
    int64_t n = 0;
    auto sweeps = [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
#pragma omp simd reduction(+ : sum, n)
      for (int64_t t = 0; t < n_cols; ++t) {
        const bool v = on<kMasked>(m, t);
        const double r = reward(lq[t], lp[t], lo, hi, bonus) - shift;
        sum += pick(v, r, 0.0);
        n += static_cast<int64_t>(v);
      }
      mean = shift + sum / double(n);
#pragma omp simd reduction(+ : m2)
      for (int64_t t = 0; t < n_cols; ++t) {
        const bool v = on<kMasked>(m, t);
        const double d = reward(lq[t], lp[t], lo, hi, bonus) - mean;
        m2 += pick(v, d * d, 0.0);
      }
    };
    if (m != nullptr) {
      sweeps(std::true_type{});
    } else {
      sweeps(std::false_type{});
    }
    p.row_count[i] = n;
    p.row_mean[i] = mean;
    p.row_m2[i] = m2;
  }
  return nullptr;
}

template <typename T>
const char* group_advantages_apply_impl(const GroupAdvParams& p) {
  const int64_t n_cols = p.cols;
  const double lo = p.clip_low, hi = p.clip_high, bonus = p.bonus;

#pragma omp parallel for schedule(static) if (worth_threads(p.rows, p.cols))
  for (int64_t i = 0; i < p.rows; ++i) {
    const bool* m = mask_row(p.mask, p.mask_row_stride, i);
    const T* lq = row_of<T>(p.teacher_logprob, p.teacher_logprob_row_stride, i);
    const T* lp = row_of<T>(p.student_logprob, p.student_logprob_row_stride, i);
    T* a = static_cast<T*>(p.advantage) + i * n_cols;
    const double mean = p.group_mean[i];
    const double denom = p.group_std[i] + p.eps;
    auto sweep = [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
#pragma omp simd
      for (int64_t t = 0; t < n_cols; ++t) {
        const bool v = on<kMasked>(m, t);
        const double r = reward(lq[t], lp[t], lo, hi, bonus);
        a[t] = pick(v, T((r - mean) / denom), T(0));
      }
    };
    if (m != nullptr) {
      sweep(std::true_type{});
    } else {
      sweep(std::false_type{});
    }
  }
  return nullptr;
}

// float32 / float64 dispatch (pyopd/dispatch.h); the bindings have already rejected other tags.
template <template <typename> class Fn, typename P>
const char* dispatch_float(const P& p) {
  return with_float_dtype(p.dtype, [&](auto t) { return Fn<typename decltype(t)::type>::run(p); });
}

template <typename T>
struct TrajectoryStatsFn {
  static const char* run(const TrajectoryStatsParams& p) { return trajectory_stats_impl<T>(p); }
};
template <typename T>
struct FireWeightsFn {
  static const char* run(const FireWeightsParams& p) { return fire_weights_impl<T>(p); }
};
template <typename T>
struct GroupMomentsFn {
  static const char* run(const GroupAdvParams& p) { return group_reward_moments_impl<T>(p); }
};
template <typename T>
struct GroupApplyFn {
  static const char* run(const GroupAdvParams& p) { return group_advantages_apply_impl<T>(p); }
};

}  // namespace

const char* trajectory_stats_cpu(const TrajectoryStatsParams& p) {
  return dispatch_float<TrajectoryStatsFn>(p);
}
const char* fire_weights_cpu(const FireWeightsParams& p) { return dispatch_float<FireWeightsFn>(p); }
const char* group_reward_moments_cpu(const GroupAdvParams& p) {
  return dispatch_float<GroupMomentsFn>(p);
}
const char* group_advantages_apply_cpu(const GroupAdvParams& p) {
  return dispatch_float<GroupApplyFn>(p);
}

}  // namespace pyopd
