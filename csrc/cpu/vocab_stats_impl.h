// CPU kernels for token_stats / reverse_kl. This file is compiled once per
// instruction set (vocab_stats_{baseline,avx2,avx512}.cpp define
// PYOPD_CPU_NS and their -m flags); vocab_stats.cpp picks one at run time.
// Everything here has internal linkage or lives in PYOPD_CPU_NS, so the
// builds never mix.
//
// Per row, one pass over the vocabulary keeps (see vocab_stats.h):
//   m   running max of x = s / T
//   Z   sum exp(x - m)
//   A   sum exp(x - m) (x - m)               -> H = log Z - A / Z
//   D   sum exp(x - m_s) ((x - m_s) - (y - m_t))  -> KL = D / Z_s - log Z_s + log Z_t
// The row is walked in tiles that fit in L1: a tile is converted to float
// (and scaled by 1/T) once, its max taken, the running sums rebased to the new
// max in double, then the tile's exp-sums accumulated in SIMD lanes and added
// to the double accumulators. D makes KL exactly 0 for identical inputs and
// avoids subtracting two large numbers for close ones.
#ifndef PYOPD_CPU_NS
#error "define PYOPD_CPU_NS before including vocab_stats_impl.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "float_convert.h"
#include "pyopd/vocab_stats.h"

namespace pyopd {
namespace PYOPD_CPU_NS {
namespace {

using cpu::load_as_float;

constexpr int64_t kTile = 512;
// Below this many logits a parallel region costs more than it saves (waking
// the pool can take milliseconds on a loaded machine).
constexpr int64_t kParallelMinElems = int64_t(1) << 16;

// The exp must be inlined into the SIMD loops: called out of line it runs one
// lane at a time (seen in perf as 60% of the forward in a scalar `vexp`).
#if defined(__GNUC__)
#define PYOPD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PYOPD_ALWAYS_INLINE inline
#endif
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// exp(x) in float, vectorisable: Cody-Waite reduction by ln 2 and a degree-7
// Taylor polynomial (relative error ~2 ulp). Exactly 0 below -87.3 (so -inf
// gives 0) and NaN for NaN.
static PYOPD_ALWAYS_INLINE float vexp(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  float xc = x < lo ? lo : x;  // comparisons with NaN are false: NaN passes
  xc = xc > hi ? hi : xc;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const int32_t ni = static_cast<int32_t>(cpu::float_to_bits(t) - cpu::float_to_bits(shifter));
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const float scale = cpu::bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  const float res = poly * scale;
  return x < lo ? 0.0f : res;
}
static PYOPD_ALWAYS_INLINE double vexp(double x) { return std::exp(x); }

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T>
static inline typename AccOf<T>::type load_acc(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, double>) {
    return p[i];
  } else {
    return load_as_float(p, i);
  }
}

// Running state of one distribution over the row.
struct Running {
  double m = kNegInf;  // max of the scaled logits seen so far
  double Z = 0.0;      // sum exp(x - m)
  double A = 0.0;      // sum exp(x - m) (x - m)
  bool empty() const { return !(m > kNegInf); }  // all -inf so far (or nothing)
};

// Rebase `r` (and the cross term D, which is in the student's scale) to the
// new max. delta_t is how far the teacher's max moved, which shifts every
// (y - m_t) in D by -delta_t.
static inline void rebase(Running& r, double new_m) {
  if (!(new_m > r.m)) return;  // unchanged (or NaN: then the sums turn NaN anyway)
  if (r.Z != 0.0) {
    const double d = r.m - new_m;  // < 0
    const double a = std::exp(d);
    r.A = a * (r.A + d * r.Z);
    r.Z = a * r.Z;
  }
  r.m = new_m;
}

template <typename Acc>
struct Tile {
  Acc v[kTile];
};

// Converts n <= kTile logits to Acc, scaled by 1/T; returns their max
// (NaN-insensitive; NaN reaches the sums through exp(NaN)).
template <typename T, typename Acc>
static inline Acc load_tile(const T* row, int64_t j0, int64_t n, Acc inv_t, Acc* out) {
  Acc mx = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    const Acc x = load_acc(row, j0 + i) * inv_t;
    out[i] = x;
    mx = std::max(mx, x);
  }
  return mx;
}

// Sums of one distribution over a tile already shifted by max m (finite).
template <typename Acc>
static inline void tile_sums(const Acc* x, int64_t n, Acc m, double& Z, double& A) {
  Acc z = 0, a = 0;
#pragma omp simd reduction(+ : z, a)
  for (int64_t i = 0; i < n; ++i) {
    const Acc d = x[i] - m;
    const Acc e = vexp(d);
    z += e;
    a += e > 0 ? e * d : Acc(0);
  }
  Z += z;
  A += a;
}

// Joint sums over a tile of student x and teacher y (both j < V).
template <typename Acc>
static inline void tile_sums_joint(const Acc* x, const Acc* y, int64_t n, Acc ms, Acc mt,
                                   Running& s, Running& t, double& D) {
  Acc zs = 0, as = 0, zt = 0, at = 0, dd = 0;
#pragma omp simd reduction(+ : zs, as, zt, at, dd)
  for (int64_t i = 0; i < n; ++i) {
    const Acc dx = x[i] - ms;
    const Acc dy = y[i] - mt;
    const Acc es = vexp(dx);
    const Acc et = vexp(dy);
    zs += es;
    zt += et;
    as += es > 0 ? es * dx : Acc(0);
    at += et > 0 ? et * dy : Acc(0);
    dd += es > 0 ? es * (dx - dy) : Acc(0);
  }
  s.Z += zs;
  s.A += as;
  t.Z += zt;
  t.A += at;
  D += dd;
}

// A finite stand-in for the max of an all -inf prefix: exp(-inf - 0) = 0.
static inline double shift_of(const Running& r) { return r.empty() ? 0.0 : r.m; }

static inline double nonneg(double v) { return v < 0 ? 0.0 : v; }  // keeps NaN

// Moves the cross term D (kept in the student's scale, shifted by the current
// maxima) to new maxima: a larger m_t adds (m_t' - m_t) to every term; a larger
// m_s rescales D like A_s. Call before rebase() of either side.
static inline void rebase_cross(double& D, const Running& s, const Running& t, double new_ms,
                                double new_mt) {
  if (s.Z == 0.0) return;  // no student mass yet, D == 0
  if (new_mt > t.m) D -= (t.m - new_mt) * s.Z;
  if (new_ms > s.m) {
    const double d = s.m - new_ms;
    const double a = std::exp(d);
    // Old terms that underflow vanish, as they do in a two-pass computation;
    // never 0 * inf = NaN when D is already +inf.
    D = a == 0.0 ? 0.0 : a * (D + d * s.Z);
  }
}

template <typename Out>
static inline void write_zeros_fwd(const VocabStatsFwdParams& p, int64_t r, bool teacher) {
  static_cast<Out*>(p.student_entropy)[r] = 0;
  static_cast<Out*>(p.student_logprob)[r] = 0;
  static_cast<Out*>(p.student_lse)[r] = 0;
  for (int k = 0; k < 4; ++k) static_cast<Out*>(p.stats)[4 * r + k] = 0;
  if (teacher) {
    static_cast<Out*>(p.kl)[r] = 0;
    static_cast<Out*>(p.teacher_entropy)[r] = 0;
    static_cast<Out*>(p.teacher_logprob)[r] = 0;
    static_cast<Out*>(p.teacher_lse)[r] = 0;
  }
}

template <typename Ts, typename Tt, bool kTeacher>
void fwd_rows(const VocabStatsFwdParams& p) {
  using Acc = typename AccOf<Ts>::type;
  using Out = Acc;
  const auto* S = static_cast<const Ts*>(p.student);
  const auto* Tch = static_cast<const Tt*>(p.teacher);
  const int64_t V = p.vocab, Vt = kTeacher ? p.teacher_vocab : 0;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);

#pragma omp parallel if (p.n_rows * (V + Vt) >= kParallelMinElems)
  {
    Tile<Acc> xs, ys;
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < p.n_rows; ++r) {
      if (p.mask != nullptr && !p.mask[r]) {
        write_zeros_fwd<Out>(p, r, kTeacher);
        continue;
      }
      const Ts* srow = S + r * p.student_row_stride;
      const Tt* trow = kTeacher ? Tch + r * p.teacher_row_stride : nullptr;
      Running s, t;
      double D = 0.0;
      for (int64_t j0 = 0; j0 < V; j0 += kTile) {
        const int64_t n = std::min(kTile, V - j0);
        const double new_ms = std::max<double>(s.m, load_tile(srow, j0, n, inv_t, xs.v));
        if constexpr (kTeacher) {
          const double new_mt = std::max<double>(t.m, load_tile(trow, j0, n, inv_t, ys.v));
          rebase_cross(D, s, t, new_ms, new_mt);
          rebase(s, new_ms);
          rebase(t, new_mt);
          tile_sums_joint(xs.v, ys.v, n, static_cast<Acc>(shift_of(s)),
                          static_cast<Acc>(shift_of(t)), s, t, D);
        } else {
          rebase(s, new_ms);
          tile_sums(xs.v, n, static_cast<Acc>(shift_of(s)), s.Z, s.A);
        }
      }
      // Teacher-only tail: ids V..Vt-1, where the student has no mass.
      for (int64_t j0 = V; j0 < Vt; j0 += kTile) {
        const int64_t n = std::min(kTile, Vt - j0);
        const double new_mt = std::max<double>(t.m, load_tile(trow, j0, n, inv_t, ys.v));
        rebase_cross(D, s, t, s.m, new_mt);
        rebase(t, new_mt);
        tile_sums(ys.v, n, static_cast<Acc>(shift_of(t)), t.Z, t.A);
      }

      // Ids outside [0, V) never index the row (the Python wrapper rejects them;
      // under torch.compile it cannot): a negative id gives 0, one >= V NaN.
      const int64_t y = p.tokens != nullptr ? p.tokens[r] : -1;
      const bool y_in = y >= 0 && y < V;
      const double y_nan = y >= V ? std::numeric_limits<double>::quiet_NaN() : 0.0;
      const double log_zs = std::log(s.Z);
      static_cast<Out*>(p.student_entropy)[r] = static_cast<Out>(nonneg(log_zs - s.A / s.Z));
      static_cast<Out*>(p.student_lse)[r] = static_cast<Out>(s.m + log_zs);
      static_cast<Out*>(p.student_logprob)[r] =
          !y_in ? static_cast<Out>(y_nan)
                : static_cast<Out>((load_acc(srow, y) * inv_t - static_cast<Acc>(s.m)) - log_zs);
      Out* st = static_cast<Out*>(p.stats) + 4 * r;
      st[0] = static_cast<Out>(s.m);
      st[1] = static_cast<Out>(log_zs);
      st[2] = st[3] = 0;
      if constexpr (kTeacher) {
        const double log_zt = std::log(t.Z);
        static_cast<Out*>(p.teacher_entropy)[r] = static_cast<Out>(nonneg(log_zt - t.A / t.Z));
        static_cast<Out*>(p.teacher_lse)[r] = static_cast<Out>(t.m + log_zt);
        static_cast<Out*>(p.teacher_logprob)[r] =
            !y_in ? static_cast<Out>(y_nan)
                  : static_cast<Out>((load_acc(trow, y) * inv_t - static_cast<Acc>(t.m)) - log_zt);
        static_cast<Out*>(p.kl)[r] = static_cast<Out>(nonneg(D / s.Z - log_zs + log_zt));
        st[2] = static_cast<Out>(t.m);
        st[3] = static_cast<Out>(log_zt);
      }
    }
  }
}

template <typename G>
static inline void store_grad(G* out, int64_t i, float v) { cpu::store_from_float(out, i, v); }
static inline void store_grad(double* out, int64_t i, double v) { out[i] = v; }

// grad_j / (1/T) = p_j (a lp_j - g_kl lq_j + b), 0 where p_j == 0; the teacher
// term only when the KL has an upstream gradient.
template <bool kReadTeacher, typename Acc>
static inline void grad_tile(const Acc* x, const Acc* y, int64_t n, Acc ms, Acc log_zs, Acc mt,
                             Acc log_zt, Acc a, Acc g_kl, Acc b, Acc inv_t, Acc* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Acc lp = (x[i] - ms) - log_zs;
    const Acc pj = vexp(lp);
    Acc inner = a * lp + b;
    if constexpr (kReadTeacher) inner -= g_kl * ((y[i] - mt) - log_zt);
    out[i] = pj > 0 ? pj * inner * inv_t : Acc(0);
  }
}

template <typename Ts, typename Tt, typename G, bool kTeacher>
void bwd_rows(const VocabStatsBwdParams& p) {
  using Acc = typename AccOf<Ts>::type;
  using Out = Acc;  // dtype of the saved per-row tensors and upstream grads
  const auto* S = static_cast<const Ts*>(p.student);
  const auto* Tch = static_cast<const Tt*>(p.teacher);
  const int64_t V = p.vocab;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  const Out* stats = static_cast<const Out*>(p.stats);
  auto upstream = [](const void* g, int64_t r) -> Acc {
    return g != nullptr ? static_cast<const Out*>(g)[r] : Acc(0);
  };
  G* grad = static_cast<G*>(p.grad_student);

#pragma omp parallel if (p.n_rows * V >= kParallelMinElems)
  {
    Tile<Acc> xs, ys;
    Tile<Acc> gs;
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < p.n_rows; ++r) {
      G* grow = grad + r * V;
      if (p.mask != nullptr && !p.mask[r]) {
        for (int64_t j = 0; j < V; ++j) store_grad(grow, j, Acc(0));
        continue;
      }
      const Acc g_kl = kTeacher ? upstream(p.grad_kl, r) : Acc(0);
      const Acc g_lp = upstream(p.grad_logprob, r);
      const Acc g_h = upstream(p.grad_entropy, r);
      const Acc g_lse = upstream(p.grad_lse, r);
      const Acc kl = (kTeacher && p.grad_kl != nullptr) ? static_cast<const Out*>(p.kl)[r] : Acc(0);
      const Acc hs = p.grad_entropy != nullptr ? static_cast<const Out*>(p.student_entropy)[r] : Acc(0);
      const Acc ms = stats[4 * r], log_zs = stats[4 * r + 1];
      const Acc mt = stats[4 * r + 2], log_zt = stats[4 * r + 3];
      // grad_j = (p_j (a lp_j - g_kl lq_j + b) + g_lp [j == y]) / T
      const Acc a = g_kl - g_h;
      const Acc b = -g_kl * kl - g_lp - g_h * hs + g_lse;
      const int64_t y = p.tokens != nullptr ? p.tokens[r] : -1;
      // The teacher is only read when the KL has an upstream gradient.
      const bool read_teacher = kTeacher && g_kl != Acc(0);
      const Ts* srow = S + r * p.student_row_stride;
      const Tt* trow = kTeacher ? Tch + r * p.teacher_row_stride : nullptr;
      for (int64_t j0 = 0; j0 < V; j0 += kTile) {
        const int64_t n = std::min(kTile, V - j0);
        load_tile(srow, j0, n, inv_t, xs.v);
        if (read_teacher) {
          load_tile(trow, j0, n, inv_t, ys.v);
          grad_tile<true>(xs.v, ys.v, n, ms, log_zs, mt, log_zt, a, g_kl, b, inv_t, gs.v);
        } else {
          grad_tile<false>(xs.v, ys.v, n, ms, log_zs, mt, log_zt, a, g_kl, b, inv_t, gs.v);
        }
        // The sampled token's one-hot term, outside the vector loop.
        if (y >= j0 && y < j0 + n) gs.v[y - j0] += g_lp * inv_t;
        for (int64_t i = 0; i < n; ++i) store_grad(grow, j0 + i, gs.v[i]);
      }
    }
  }
}

// ---- dtype dispatch ---------------------------------------------------------

template <typename T> struct Tag { using type = T; };

template <typename F>
static inline const char* with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kBFloat16: return f(Tag<bf16_t>{});
    case DType::kFloat16: return f(Tag<fp16_t>{});
    case DType::kFloat64: return f(Tag<double>{});
  }
  return "unknown dtype";
}

template <typename A, typename B>
constexpr bool kPairOk = std::is_same_v<A, double> == std::is_same_v<B, double>;

}  // namespace

const char* vocab_stats_fwd(const VocabStatsFwdParams& p) {
  return with_dtype(p.student_dtype, [&](auto ts) -> const char* {
    using Ts = typename decltype(ts)::type;
    if (p.teacher == nullptr) {
      fwd_rows<Ts, Ts, false>(p);
      return nullptr;
    }
    return with_dtype(p.teacher_dtype, [&](auto tt) -> const char* {
      using Tt = typename decltype(tt)::type;
      if constexpr (kPairOk<Ts, Tt>) {
        fwd_rows<Ts, Tt, true>(p);
        return nullptr;
      } else {
        return "float64 logits need both student and teacher in float64";
      }
    });
  });
}

const char* vocab_stats_bwd(const VocabStatsBwdParams& p) {
  return with_dtype(p.student_dtype, [&](auto ts) -> const char* {
    using Ts = typename decltype(ts)::type;
    return with_dtype(p.grad_dtype, [&](auto tg) -> const char* {
      using G = typename decltype(tg)::type;
      if constexpr (!kPairOk<Ts, G>) {
        return "grad_dtype must be float64 exactly when the logits are float64";
      } else if (p.teacher == nullptr) {
        bwd_rows<Ts, Ts, G, false>(p);
        return nullptr;
      } else {
        return with_dtype(p.teacher_dtype, [&](auto tt) -> const char* {
          using Tt = typename decltype(tt)::type;
          if constexpr (kPairOk<Ts, Tt>) {
            bwd_rows<Ts, Tt, G, true>(p);
            return nullptr;
          } else {
            return "float64 logits need both student and teacher in float64";
          }
        });
      }
    });
  });
}

}  // namespace PYOPD_CPU_NS
}  // namespace pyopd
