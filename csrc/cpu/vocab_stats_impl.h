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
#include <cstring>
#include <limits>
#include <type_traits>

#include "float_convert.h"
#include "pyopd/vocab_stats.h"
#include "pyopd/dispatch.h"

namespace pyopd {
namespace PYOPD_CPU_NS {
namespace {

using cpu::load_as_float;

// A tile of student and teacher logits (2 x 8 KiB in float) stays in L1 between
// the max pass and the exp pass; long tiles amortise the per-tile rebase.
constexpr int64_t kTile = 2048;
// Elements per block of the joint exp sums between prefetches of the next tile.
constexpr int64_t kSumBlock = 256;
// Backward: how far ahead of the block being computed its logits are asked for.
constexpr int64_t kBwdAhead = 2048;
// Rows per dynamic-scheduling chunk: a row is >= 64 KiB at the sizes that go
// parallel, so 2 rows amortise the scheduler and keep the tail short on a
// busy machine.
constexpr int64_t kRowChunk = 2;
// Below this many logits a parallel region costs more than it saves (waking
// the pool can take milliseconds on a loaded machine).
constexpr int64_t kParallelMinElems = int64_t(1) << 16;

// The exp must be inlined into the SIMD loops: called out of line it runs one
// lane at a time (seen in perf as 60% of the forward in a scalar `vexp`).
// The hot loops (load_tile, tile_sums, tile_sums_joint, grad_span) are kept
// out of line: one call per tile or row costs nothing, and each then has its
// own entry in GCC's vectoriser report, which tests/test_vectorization.py
// reads to check that every one is vectorised on every ISA.
#if defined(__GNUC__)
#define PYOPD_ALWAYS_INLINE inline __attribute__((always_inline))
#define PYOPD_HOT_LOOP __attribute__((noinline, noclone))
#else
#define PYOPD_ALWAYS_INLINE inline
#define PYOPD_HOT_LOOP
#endif
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Fused multiply-add where the ISA has one. The kernel files are built with
// -ffp-contract=off so that every other rounding is the written one (the
// scaled logit z = x * (1/T) in particular, see load_tile); the exp keeps its
// FMAs explicitly.
static PYOPD_ALWAYS_INLINE float madd(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
// float64 is the checking path: plain rounding.
static PYOPD_ALWAYS_INLINE double madd(double a, double b, double c) { return a * b + c; }

// At or below this, vexp gives exactly 0 (float: e^-87.34 is the smallest normal).
// Arguments are clamped to kFlush before use, so an exp that is 0 is always
// multiplied by a finite number: e * d is 0, never 0 * inf = NaN, and the loop
// bodies need no branch (a branch around a possibly trapping multiply is what
// keeps GCC from if-converting, hence vectorising, without masked stores).
template <typename Acc> struct Lim;
template <> struct Lim<float> {
  static constexpr float kFlush = -88.0f;
};
template <> struct Lim<double> {
  static constexpr double kFlush = -746.0;  // std::exp(-746) == 0
};

// c ? a : b as a bitwise blend. A `?:` on floats is gimplified into a branch;
// with -ftrapping-math (the default, and we keep IEEE semantics) GCC may then
// duplicate arithmetic into the arms, and a possibly trapping operation under
// control flow blocks if-conversion, hence vectorisation, on every ISA without
// masked operations (SSE2, AVX2). A blend has no control flow to begin with.
static PYOPD_ALWAYS_INLINE float sel(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return cpu::bits_to_float((cpu::float_to_bits(a) & m) | (cpu::float_to_bits(b) & ~m));
}
static PYOPD_ALWAYS_INLINE double sel(bool c, double a, double b) {
  const uint64_t m = uint64_t(0) - static_cast<uint64_t>(c);
  uint64_t ua, ub;
  std::memcpy(&ua, &a, 8);
  std::memcpy(&ub, &b, 8);
  const uint64_t u = (ua & m) | (ub & ~m);
  double out;
  std::memcpy(&out, &u, 8);
  return out;
}

// max(d, kFlush) that lets NaN through (the comparison is false for NaN).
template <typename Acc>
static PYOPD_ALWAYS_INLINE Acc flush_lo(Acc d) { return sel(d < Lim<Acc>::kFlush, Lim<Acc>::kFlush, d); }
// A -inf log-prob replaced by 0: only used where its weight p_j is 0, or in
// rows whose result is overridden (+inf KL), so the value never shows.
template <typename Acc>
static PYOPD_ALWAYS_INLINE Acc finite_or_zero(Acc d) {
  return sel(d == -std::numeric_limits<Acc>::infinity(), Acc(0), d);
}

// exp(d) in float for d in [kFlush, 0] or NaN (every caller flushes first,
// and d <= 0 because it is a logit minus the row max, or a log-prob), so no
// clamping and no select is needed: Cody-Waite reduction d = n ln2 + r with
// |r| <= ln2 / 2, a degree-6 polynomial fitted to e^r for relative error
// (~1.2 ulp when evaluated in float with FMAs), and 2^n built in the exponent
// bits. For d < -87.68, n = -127 gives the bit pattern 0, so exp(d) is
// exactly 0 (-inf flushed to kFlush = -88 included); NaN stays NaN.
static PYOPD_ALWAYS_INLINE float vexp(float d) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = madd(d, 1.44269504088896341f, shifter);
  const float n = t - shifter;
  const int32_t ni = static_cast<int32_t>(cpu::float_to_bits(t) - cpu::float_to_bits(shifter));
  const float r = madd(-n, 1.428606765330187e-06f, madd(-n, 0.693145751953125f, d));
  float poly = 0.0013843641f;
  poly = madd(poly, r, 0.0083741564f);
  poly = madd(poly, r, 0.041668002f);
  poly = madd(poly, r, 0.16666432f);
  poly = madd(poly, r, 0.49999994f);
  poly = madd(poly, r, 1.0f);
  poly = madd(poly, r, 1.0f);
  const float scale = cpu::bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return poly * scale;
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

// The forward walks a row in two phases per tile: load_tile streams the tile
// from memory, then the exp sums run on it from L1. Nothing asks for the next
// tile while the sums run, so without a hint its loads wait for memory
// afterwards (forward time = memory time + arithmetic time). The sums
// therefore ask for the next tile into L2, a few 64-byte lines per block of
// kSumBlock elements: spread out, the requests overlap the arithmetic (all at
// once, they queued behind each other and gained nothing). Measured on one
// core (bench/cpu_profile.py): forward 138 -> 115 ms (AVX-512) and 185 -> 145 ms
// (AVX2) at 4096 x 32768 float32.
struct NextTile {
  const char* p;      // first byte of the span to fetch
  int64_t lines;      // its 64-byte lines (0: nothing to fetch)
  int64_t done = 0;   // lines asked for so far
  template <typename T>
  NextTile(const T* first, int64_t n) : p(reinterpret_cast<const char*>(first)),
      lines(n > 0 ? (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 : 0) {}
  // Asks for this block's share of the lines, for a tile of n elements.
  PYOPD_ALWAYS_INLINE void ask(int64_t n) {
    const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
    ask_until(done + (blocks > 0 ? (lines + blocks - 1) / blocks : lines));
  }
  // Asks for every line not yet asked for.
  PYOPD_ALWAYS_INLINE void ask_all() { ask_until(lines); }

 private:
  PYOPD_ALWAYS_INLINE void ask_until(int64_t end) {
    for (const int64_t e = std::min(lines, end); done < e; ++done) __builtin_prefetch(p + 64 * done, 0, 2);
  }
};

template <typename Acc>
struct Tile {
  Acc v[kTile];
};

// Converts n <= kTile logits to Acc, scaled by 1/T; returns their max
// (NaN-insensitive; NaN reaches the sums through exp(NaN)). z = x * (1/T) is
// rounded on its own (no FMA contraction in these files), so every later
// use of z_j, e.g. the sampled token's log-prob, sees the same value and
// z_j - max <= 0 holds exactly.
template <typename T, typename Acc>
PYOPD_HOT_LOOP static Acc load_tile(const T* row, int64_t j0, int64_t n, Acc inv_t, Acc* out) {
  Acc mx = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {  // vec-loop: load_tile
    const Acc x = load_acc(row, j0 + i) * inv_t;
    out[i] = x;
    mx = std::max(mx, x);
  }
  return mx;
}

// Sums of one distribution over one block (<= kSumBlock) of a tile already
// shifted by max m (finite). Each block's sums start from 0 and go to the
// double accumulators, as in tile_sums_joint, so token_stats and reverse_kl
// agree bit for bit.
template <typename Acc>
PYOPD_HOT_LOOP static void tile_sums(const Acc* x, int64_t n, Acc m, double& Z, double& A) {
  Acc z = 0, a = 0;
#pragma omp simd reduction(+ : z, a)
  for (int64_t i = 0; i < n; ++i) {  // vec-loop: tile_sums
    const Acc d = flush_lo(x[i] - m);  // -inf -> kFlush: e = 0 and e * d = 0
    const Acc e = vexp(d);
    z += e;
    a = madd(e, d, a);
  }
  Z += z;
  A += a;
}

// Joint sums over one block of a tile of student x and teacher y (both j < V).
// `hole` is min_j (y_j - x_j): -inf iff some id has a -inf teacher logit under
// a finite student one, i.e. the student's support is not inside the
// teacher's and KL = +inf, whether or not that student mass underflows in float.
template <typename Acc>
PYOPD_HOT_LOOP static void tile_sums_joint(const Acc* x, const Acc* y, int64_t n, Acc ms, Acc mt,
                                   Running& s, Running& t, double& D, Acc& hole) {
  Acc zs = 0, as = 0, zt = 0, at = 0, dd = 0, h = hole;
#pragma omp simd reduction(+ : zs, as, zt, at, dd) reduction(min : h)
  for (int64_t i = 0; i < n; ++i) {  // vec-loop: tile_sums_joint
    const Acc dx = flush_lo(x[i] - ms);
    const Acc dy_raw = y[i] - mt;
    const Acc dy = flush_lo(dy_raw);
    const Acc es = vexp(dx);
    const Acc et = vexp(dy);
    zs += es;
    zt += et;
    as = madd(es, dx, as);
    at = madd(et, dy, at);
    // Where es == 0 the factor is finite (a -inf teacher logit reads as 0), so
    // the term is 0; where es > 0 and the teacher is -inf the row is a hole.
    dd = madd(es, dx - finite_or_zero(dy_raw), dd);
    // y - x is -inf exactly where the teacher is -inf and the student is not
    // (both -inf gives NaN, which min ignores).
    h = std::min(h, y[i] - x[i]);
  }
  s.Z += zs;
  s.A += as;
  t.Z += zt;
  t.A += at;
  D += dd;
  hole = h;
}

// A whole tile, block by block, asking for the next tile as it goes (NextTile).
template <typename Acc>
static inline void sum_tile(const Acc* x, int64_t n, Acc m, double& Z, double& A, NextTile next) {
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    next.ask(n);
    tile_sums(x + b0, std::min(kSumBlock, n - b0), m, Z, A);
  }
}

template <typename Acc>
static inline void sum_tile_joint(const Acc* x, const Acc* y, int64_t n, Acc ms, Acc mt, Running& s,
                                  Running& t, double& D, Acc& hole, NextTile next_x, NextTile next_y) {
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    next_x.ask(n);
    next_y.ask(n);
    tile_sums_joint(x + b0, y + b0, std::min(kSumBlock, n - b0), ms, mt, s, t, D, hole);
  }
}

// A finite stand-in for the max of an all -inf prefix: exp(-inf - 0) = 0.
static inline double shift_of(const Running& r) { return r.empty() ? 0.0 : r.m; }

static inline double nonneg(double v) { return v < 0 ? 0.0 : v; }  // keeps NaN
static inline double nonpos(double v) { return v > 0 ? 0.0 : v; }  // keeps NaN

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

template <typename T>
static bool row_has_nan(const T* row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(load_acc(row, j))) return true;
  }
  return false;
}

// Per-row results of one distribution, with PyTorch's non-finite semantics:
// a +inf logit gives lse = +inf (NaN if the row also has a NaN) and NaN
// entropy / log-probs; an all -inf row gives lse = -inf and NaN for the rest
// (log_softmax's -inf - -inf).
struct RowResult {
  double lse, log_z, entropy;
  bool finite;  // lse finite: log-probs and entropy are meaningful
};

template <typename T>
static RowResult finish_row(const Running& r, const T* row, int64_t n) {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  const double log_z = std::log(r.Z);
  RowResult out{r.m + log_z, log_z, nonneg(log_z - r.A / r.Z), true};
  if (r.m == std::numeric_limits<double>::infinity()) {
    out.lse = row_has_nan(row, n) ? kNaN : r.m;
    out.log_z = out.entropy = kNaN;
  }
  out.finite = std::isfinite(out.lse);
  if (!out.finite) out.entropy = kNaN;
  return out;
}

// log p(y) from the scaled logit z_y (rounded as in load_tile); <= 0 always.
template <typename T, typename Acc>
static inline double row_logprob(const T* row, int64_t y, Acc inv_t, double m, const RowResult& rr) {
  if (!rr.finite) return std::numeric_limits<double>::quiet_NaN();
  const Acc z = load_acc(row, y) * inv_t;
  return nonpos((static_cast<double>(z) - m) - rr.log_z);
}

template <typename Ts, typename Tt, bool kTeacher>
void fwd_rows(const VocabStatsFwdParams& p) {
  using Acc = typename AccOf<Ts>::type;
  using Out = Acc;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const auto* S = static_cast<const Ts*>(p.student);
  const auto* Tch = static_cast<const Tt*>(p.teacher);
  const int64_t V = p.vocab, Vt = kTeacher ? p.teacher_vocab : 0;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);

#pragma omp parallel if (p.n_rows * (V + Vt) >= kParallelMinElems)
  {
    Tile<Acc> xs, ys;
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t r = 0; r < p.n_rows; ++r) {
      if (p.mask != nullptr && !p.mask[r]) {
        write_zeros_fwd<Out>(p, r, kTeacher);
        continue;
      }
      const Ts* srow = S + r * p.student_row_stride;
      const Tt* trow = kTeacher ? Tch + r * p.teacher_row_stride : nullptr;
      Running s, t;
      double D = 0.0;
      Acc hole = std::numeric_limits<Acc>::infinity();
      for (int64_t j0 = 0; j0 < V; j0 += kTile) {
        const int64_t n = std::min(kTile, V - j0);
        const int64_t next = std::min(kTile, V - j0 - kTile);
        const double new_ms = std::max<double>(s.m, load_tile(srow, j0, n, inv_t, xs.v));
        if constexpr (kTeacher) {
          const double new_mt = std::max<double>(t.m, load_tile(trow, j0, n, inv_t, ys.v));
          rebase_cross(D, s, t, new_ms, new_mt);
          rebase(s, new_ms);
          rebase(t, new_mt);
          sum_tile_joint(xs.v, ys.v, n, static_cast<Acc>(shift_of(s)),
                         static_cast<Acc>(shift_of(t)), s, t, D, hole,
                          NextTile(srow + j0 + kTile, next),
                          // after the last shared tile, the teacher-only tail's first
                          next > 0 ? NextTile(trow + j0 + kTile, next)
                                   : NextTile(trow + V, std::min(kTile, Vt - V)));
        } else {
          rebase(s, new_ms);
          sum_tile(xs.v, n, static_cast<Acc>(shift_of(s)), s.Z, s.A, NextTile(srow + j0 + kTile, next));
        }
      }
      // Teacher-only tail: ids V..Vt-1, where the student has no mass.
      for (int64_t j0 = V; j0 < Vt; j0 += kTile) {
        const int64_t n = std::min(kTile, Vt - j0);
        const double new_mt = std::max<double>(t.m, load_tile(trow, j0, n, inv_t, ys.v));
        rebase_cross(D, s, t, s.m, new_mt);
        rebase(t, new_mt);
        sum_tile(ys.v, n, static_cast<Acc>(shift_of(t)), t.Z, t.A,
                 NextTile(trow + j0 + kTile, std::min(kTile, Vt - j0 - kTile)));
      }

      // Ids outside [0, V) never index the row (the Python wrapper rejects them;
      // under torch.compile it cannot): a negative id gives 0, one >= V NaN.
      const int64_t y = p.tokens != nullptr ? p.tokens[r] : -1;
      const bool y_in = y >= 0 && y < V;
      const double y_nan = y >= V ? kNaN : 0.0;
      const RowResult rs = finish_row(s, srow, V);
      static_cast<Out*>(p.student_entropy)[r] = static_cast<Out>(rs.entropy);
      static_cast<Out*>(p.student_lse)[r] = static_cast<Out>(rs.lse);
      static_cast<Out*>(p.student_logprob)[r] =
          static_cast<Out>(y_in ? row_logprob(srow, y, inv_t, s.m, rs) : y_nan);
      Out* st = static_cast<Out*>(p.stats) + 4 * r;
      st[0] = static_cast<Out>(s.m);
      st[1] = static_cast<Out>(rs.log_z);
      st[2] = st[3] = 0;
      if constexpr (kTeacher) {
        const RowResult rt = finish_row(t, trow, Vt);
        static_cast<Out*>(p.teacher_entropy)[r] = static_cast<Out>(rt.entropy);
        static_cast<Out*>(p.teacher_lse)[r] = static_cast<Out>(rt.lse);
        static_cast<Out*>(p.teacher_logprob)[r] =
            static_cast<Out>(y_in ? row_logprob(trow, y, inv_t, t.m, rt) : y_nan);
        // KL: NaN unless the student's lse is finite and the teacher's is
        // finite or -inf; +inf when the student has support where the teacher
        // has none; else the sum, which is >= 0.
        double kl;
        if (!rs.finite || std::isnan(rt.lse) || rt.lse == kInf) {
          kl = kNaN;
        } else if (hole == -std::numeric_limits<Acc>::infinity()) {
          kl = kInf;
        } else {
          kl = nonneg(D / s.Z - rs.log_z + rt.log_z);
        }
        static_cast<Out*>(p.kl)[r] = static_cast<Out>(kl);
        st[2] = static_cast<Out>(t.m);
        st[3] = static_cast<Out>(rt.log_z);
      }
    }
  }
}

template <typename G>
static PYOPD_ALWAYS_INLINE void store_grad(G* out, int64_t i, float v) { cpu::store_from_float(out, i, v); }
static PYOPD_ALWAYS_INLINE void store_grad(double* out, int64_t i, double v) { out[i] = v; }

// grad_j = p_j (a lp_j - g_kl lq_j + b) with a, b, g_kl already divided by
// T (by the caller: one multiply less per element), read straight from the
// logits and written straight to the gradient (no max is needed, so no tile
// buffer). The teacher term only when the KL has an upstream gradient. Rows
// reaching here have a finite lse, so lp_j < kFlush means p_j == 0 and the
// flushed lp_j keeps every product finite.
template <bool kReadTeacher, typename Ts, typename Tt, typename G, typename Acc>
PYOPD_HOT_LOOP static void grad_span(const Ts* srow, const Tt* trow, G* grow, int64_t n, Acc ms,
                             Acc log_zs, Acc mt, Acc log_zt, Acc a, Acc g_kl, Acc b, Acc inv_t) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {  // vec-loop: grad_span
    const Acc lp = flush_lo((load_acc(srow, i) * inv_t - ms) - log_zs);
    const Acc pj = vexp(lp);
    Acc inner = madd(a, lp, b);
    if constexpr (kReadTeacher) {
      inner = madd(-g_kl, finite_or_zero((load_acc(trow, i) * inv_t - mt) - log_zt), inner);
    }
    store_grad(grow, i, pj * inner);
  }
}

template <typename G, typename Acc>
static inline void fill_row(G* grow, int64_t n, Acc v) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) store_grad(grow, j, v);  // vec-loop: fill_row
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
#pragma omp for schedule(dynamic, kRowChunk)
    for (int64_t r = 0; r < p.n_rows; ++r) {
      G* grow = grad + r * V;
      if (p.mask != nullptr && !p.mask[r]) {
        fill_row(grow, V, Acc(0));
        continue;
      }
      const int64_t y = p.tokens != nullptr ? p.tokens[r] : -1;
      const bool y_in = y >= 0 && y < V;
      const Acc g_kl = kTeacher ? upstream(p.grad_kl, r) : Acc(0);
      // log p(y) is a constant (0, or NaN for an id >= V) without a token in
      // [0, V): its upstream gradient does not reach the logits.
      const Acc g_lp = y_in ? upstream(p.grad_logprob, r) : Acc(0);
      const Acc g_h = upstream(p.grad_entropy, r);
      const Acc g_lse = upstream(p.grad_lse, r);
      const Acc kl = (kTeacher && p.grad_kl != nullptr) ? static_cast<const Out*>(p.kl)[r] : Acc(0);
      const Acc hs = p.grad_entropy != nullptr ? static_cast<const Out*>(p.student_entropy)[r] : Acc(0);
      const Acc ms = stats[4 * r], log_zs = stats[4 * r + 1];
      const Acc mt = stats[4 * r + 2], log_zt = stats[4 * r + 3];
      // A non-finite forward gives a NaN gradient, as autograd through
      // log_softmax would: the student's lse is not finite, or an output with
      // a nonzero upstream gradient is not finite.
      if (!std::isfinite(static_cast<double>(ms) + static_cast<double>(log_zs)) ||
          (g_kl != Acc(0) && !std::isfinite(kl)) || (g_h != Acc(0) && !std::isfinite(hs))) {
        fill_row(grow, V, std::numeric_limits<Acc>::quiet_NaN());
        continue;
      }
      // grad_j = (p_j (a lp_j - g_kl lq_j + b) + g_lp [j == y]) / T; a zero
      // upstream gradient contributes nothing (not 0 * value).
      const Acc a = g_kl - g_h;
      const Acc b = (g_kl != Acc(0) ? -g_kl * kl : Acc(0)) - g_lp -
                    (g_h != Acc(0) ? g_h * hs : Acc(0)) + g_lse;
      // The teacher is only read when the KL has an upstream gradient.
      const bool read_teacher = kTeacher && g_kl != Acc(0);
      const Ts* srow = S + r * p.student_row_stride;
      const Tt* trow = kTeacher ? Tch + r * p.teacher_row_stride : nullptr;
      const Acc at = a * inv_t, bt = b * inv_t, g_klt = g_kl * inv_t;
      // In blocks of kSumBlock ids, asking kBwdAhead ids ahead for the logits
      // (NextTile) on the way: a single pass reads and writes as it computes,
      // but the hardware prefetcher alone left the bf16 loop waiting on memory
      // (one core, 512 x 151936 bf16: 70 -> 45 ms on AVX-512, 76 -> 73 on AVX2;
      // float32 unchanged).
      for (int64_t j0 = 0; j0 < V; j0 += kSumBlock) {
        const int64_t n = std::min(kSumBlock, V - j0);
        const int64_t ahead = j0 + kBwdAhead;
        if (ahead < V) {
          const int64_t m = std::min(kSumBlock, V - ahead);
          NextTile(srow + ahead, m).ask_all();
          if (read_teacher) NextTile(trow + ahead, m).ask_all();
        }
        if (read_teacher) {
          grad_span<true>(srow + j0, trow + j0, grow + j0, n, ms, log_zs, mt, log_zt, at, g_klt, bt,
                          inv_t);
        } else {
          grad_span<false>(srow + j0, trow, grow + j0, n, ms, log_zs, mt, log_zt, at, g_klt, bt,
                           inv_t);
        }
      }
      // The sampled token's one-hot term, outside the vector loop (recomputed
      // exactly as in the loop, then rounded once to G).
      if (y_in) {
        const Acc lp = flush_lo((load_acc(srow, y) * inv_t - ms) - log_zs);
        Acc inner = madd(at, lp, bt);
        if (read_teacher) {
          inner = madd(-g_klt, finite_or_zero((load_acc(trow, y) * inv_t - mt) - log_zt), inner);
        }
        store_grad(grow, y, vexp(lp) * inner + g_lp * inv_t);
      }
    }
  }
}

// ---- dtype dispatch ---------------------------------------------------------

// pyopd/dispatch.h with this backend's 16-bit storage types.
template <typename F>
static inline const char* with_dtype(DType d, F&& f) {
  return pyopd::with_dtype<bf16_t, fp16_t>(d, static_cast<F&&>(f));
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
