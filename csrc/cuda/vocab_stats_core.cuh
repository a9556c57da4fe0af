// Per-thread building blocks of the CUDA token_stats / reverse_kl kernels
// (csrc/cuda/vocab_stats.cu): storage-type loads and stores, the running
// (max, sum-exp) state of a row and how two states merge, the per-chunk
// forward and backward work, and the walk that splits a row among threads.
//
// Everything here is __host__ __device__ and free of thread indices and
// shuffles, so the same code runs on the host in tests/cuda_host/emulate.cu,
// which plays the threads of a row one after another (tests/test_cuda.py
// checks it against the float64 reference on machines without a GPU). The
// kernel file adds the thread mapping, the warp/block reductions, the split
// of long rows over blocks and the launches.
//
// The math is that of csrc/cpu/vocab_stats_impl.h (see vocab_stats.h):
//   x_j = s_j / T, y_j = t_j / T; per distribution the running max m,
//   Z = sum exp(x - m), A = sum exp(x - m) (x - m); the cross term
//   D = sum_{j<V} exp(x_j - m_s) ((x_j - m_s) - (y_j - m_t)).
// Accumulation is in float (double for float64 logits).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "pyopd/vocab_stats.h"

#define PYOPD_HD __host__ __device__ __forceinline__
// `#pragma unroll` only in the device pass (the host compiler warns about it).
#ifdef __CUDA_ARCH__
#define PYOPD_UNROLL _Pragma("unroll")
#else
#define PYOPD_UNROLL
#endif

namespace pyopd {
namespace vs_cuda {

// Teacher type of the instantiations that never read a teacher.
struct NoTeacher {};

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// ---- scalar math, overloaded on the accumulator type -------------------------

PYOPD_HD float vmax(float a, float b) { return fmaxf(a, b); }  // drops NaN, like std::max on the CPU
PYOPD_HD double vmax(double a, double b) { return fmax(a, b); }
PYOPD_HD float vfma(float a, float b, float c) { return fmaf(a, b, c); }
PYOPD_HD double vfma(double a, double b, double c) { return fma(a, b, c); }
// The scaled logit z = x / T as x * (1/T) rounded on its own, never fused with
// the subtraction of the max that follows (nvcc contracts a * b + c into an FMA
// by default). Rounding z first is what the CPU kernels and PyTorch do, and it
// makes z - m exactly 0 at the max, so log-probs there are exactly -log Z.
// (A host build of this header must use -ffp-contract=off for the same reason.)
PYOPD_HD float vmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PYOPD_HD double vmul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
template <typename Acc> PYOPD_HD Acc max_finite();
template <> PYOPD_HD float max_finite<float>() { return FLT_MAX; }
template <> PYOPD_HD double max_finite<double>() { return DBL_MAX; }
// Plain IEEE tests, the same in host and device code (no fast-math here).
template <typename Acc> PYOPD_HD bool finite(Acc v) { return v - v == Acc(0); }  // false for inf, NaN
template <typename Acc> PYOPD_HD bool is_nan(Acc v) { return v != v; }
// min(v, 0) that keeps NaN (a log-prob is <= 0; rounding may give +1 ulp).
template <typename Acc> PYOPD_HD Acc nonpos(Acc v) { return v > Acc(0) ? Acc(0) : v; }
// 2^x. In float this is the hardware's MUFU.EX2 alone (ex2.approx.ftz: about
// 2 ulp, the same instruction exp2f uses); results below 2^-126 are flushed to
// 0, like the CPU kernel's exp, which returns 0 below ln(2^-126). exp2f would
// add three instructions per call to keep denormal results, and the forward
// loop is close to issue-bound. 2^-inf = 0, 2^NaN = NaN.
PYOPD_HD float vexp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = exp2f(x);
  return y < FLT_MIN ? 0.0f : y;  // as on the device
#endif
}

template <typename Acc> PYOPD_HD Acc neg_inf() { return static_cast<Acc>(-INFINITY); }
// exp(x) as 2^(x log2 e) in float. Every x here is (logit - running max) <= 0:
// the rounding of x log2 e costs a relative error of about |x| 2^-24, which only
// matters where exp(x) is already negligible (|x| > 20: below 2e-9 of the max).
PYOPD_HD float vexp(float x) { return vexp2(x * 1.44269504088896341f); }
PYOPD_HD double vexp(double x) { return exp(x); }

PYOPD_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
PYOPD_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// ---- loads and stores ---------------------------------------------------------
// A chunk is K consecutive elements; vector chunks are loaded and stored as
// 16-, 8- or 4-byte words, so their address must be aligned to
// min(16, K * sizeof(T)) bytes (kChunkAlign; load_chunk_at reads chunks that
// are not). K == 1 is a plain element.

template <typename T> PYOPD_HD T load_elem(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);  // read-only path: the logits never change during a launch
#else
  return *p;
#endif
}
PYOPD_HD float to_acc(float v, float) { return v; }
PYOPD_HD float to_acc(__nv_bfloat16 v, float) { return __bfloat162float(v); }
PYOPD_HD float to_acc(__half v, float) { return __half2float(v); }
PYOPD_HD double to_acc(double v, double) { return v; }

template <int kBytes> PYOPD_HD void load_words(const void* p, uint32_t (&w)[kBytes / 4]) {
#ifdef __CUDA_ARCH__
  if constexpr (kBytes % 16 == 0) {
PYOPD_UNROLL
    for (int i = 0; i < kBytes / 16; ++i) {
      const uint4 q = __ldg(static_cast<const uint4*>(p) + i);
      w[4 * i] = q.x; w[4 * i + 1] = q.y; w[4 * i + 2] = q.z; w[4 * i + 3] = q.w;
    }
  } else if constexpr (kBytes == 8) {
    const uint2 q = __ldg(static_cast<const uint2*>(p));
    w[0] = q.x; w[1] = q.y;
  } else {
    static_assert(kBytes == 4, "chunks are 4, 8 or a multiple of 16 bytes");
    w[0] = __ldg(static_cast<const unsigned int*>(p));
  }
#else
  std::memcpy(w, p, kBytes);
#endif
}

template <int kBytes> PYOPD_HD void store_words(void* p, const uint32_t (&w)[kBytes / 4]) {
#ifdef __CUDA_ARCH__
  // Spelled out in PTX: a uint4 assignment through a pointer that came from a
  // 2-byte type is split into 4-byte stores (the alignment is not known).
  if constexpr (kBytes % 16 == 0) {
PYOPD_UNROLL
    for (int i = 0; i < kBytes / 16; ++i) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(static_cast<uint4*>(p) + i),
                   "r"(w[4 * i]), "r"(w[4 * i + 1]), "r"(w[4 * i + 2]), "r"(w[4 * i + 3])
                   : "memory");
    }
  } else if constexpr (kBytes == 8) {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]) : "memory");
  } else {
    static_assert(kBytes == 4, "chunks are 4, 8 or a multiple of 16 bytes");
    *static_cast<unsigned int*>(p) = w[0];
  }
#else
  std::memcpy(p, w, kBytes);
#endif
}

// Storage words -> accumulator values (little-endian: element 0 in the low bits).
template <int K>
PYOPD_HD void decode(const uint32_t (&w)[K], float (&out)[K], float) {
PYOPD_UNROLL
  for (int k = 0; k < K; ++k) out[k] = bits_to_float(w[k]);
}
template <int K>
PYOPD_HD void decode(const uint32_t (&w)[K / 2], float (&out)[K], __nv_bfloat16) {
PYOPD_UNROLL
  for (int i = 0; i < K / 2; ++i) {  // a bfloat16 is the high half of a float
    out[2 * i] = bits_to_float(w[i] << 16);
    out[2 * i + 1] = bits_to_float(w[i] & 0xffff0000u);
  }
}
template <int K>
PYOPD_HD void decode(const uint32_t (&w)[K / 2], float (&out)[K], __half) {
PYOPD_UNROLL
  for (int i = 0; i < K / 2; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
template <int K>
PYOPD_HD void decode(const uint32_t (&w)[2 * K], double (&out)[K], double) {
PYOPD_UNROLL
  for (int k = 0; k < K; ++k) {
    const uint64_t u = (static_cast<uint64_t>(w[2 * k + 1]) << 32) | w[2 * k];
    double d;
    std::memcpy(&d, &u, 8);
    out[k] = d;
  }
}

// K elements of T at p, converted to Acc.
template <int K, typename T, typename Acc>
PYOPD_HD void load_chunk(const T* p, Acc (&out)[K]) {
  if constexpr (K == 1) {
    out[0] = to_acc(load_elem(p), Acc());
  } else {
    uint32_t w[K * sizeof(T) / 4];
    load_words<K * sizeof(T)>(p, w);
    decode<K>(w, out, T());
  }
}

PYOPD_HD void store_elem(float* p, float v) { *p = v; }
PYOPD_HD void store_elem(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
PYOPD_HD void store_elem(__half* p, float v) { *p = __float2half_rn(v); }
PYOPD_HD void store_elem(double* p, double v) { *p = v; }

// Accumulator values -> storage words, rounding to nearest even.
template <int K>
PYOPD_HD void encode(const float (&v)[K], uint32_t (&w)[K], float) {
PYOPD_UNROLL
  for (int k = 0; k < K; ++k) w[k] = float_to_bits(v[k]);
}
template <int K>
PYOPD_HD void encode(const float (&v)[K], uint32_t (&w)[K / 2], __nv_bfloat16) {
PYOPD_UNROLL
  for (int i = 0; i < K / 2; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);  // .x = low half
    std::memcpy(&w[i], &h, 4);
  }
}
template <int K>
PYOPD_HD void encode(const float (&v)[K], uint32_t (&w)[K / 2], __half) {
PYOPD_UNROLL
  for (int i = 0; i < K / 2; ++i) {
    const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    std::memcpy(&w[i], &h, 4);
  }
}
template <int K>
PYOPD_HD void encode(const double (&v)[K], uint32_t (&w)[2 * K], double) {
PYOPD_UNROLL
  for (int k = 0; k < K; ++k) {
    uint64_t u;
    std::memcpy(&u, &v[k], 8);
    w[2 * k] = static_cast<uint32_t>(u);
    w[2 * k + 1] = static_cast<uint32_t>(u >> 32);
  }
}

template <int K, typename G, typename Acc>
PYOPD_HD void store_chunk(G* p, const Acc (&v)[K]) {
  if constexpr (K == 1) {
    store_elem(p, v[0]);
  } else {
    uint32_t w[K * sizeof(G) / 4];
    encode<K>(v, w, G());
    store_words<K * sizeof(G)>(p, w);
  }
}

// Alignment (bytes) a K-element chunk of T needs for word accesses.
template <int K, typename T> constexpr int kChunkAlign = K * sizeof(T) < 16 ? K * sizeof(T) : 16;

// Elements from p to the next kAlign-byte boundary, or -1 when p is not even
// aligned to its element size (then only scalar accesses are safe).
template <int kAlign, typename T> PYOPD_HD int head_to(const T* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return -1;
  return static_cast<int>(((kAlign - a % kAlign) % kAlign) / sizeof(T));
}

// Byte offset of p past its chunk alignment, or -1 when p is not aligned to
// its element size. Chunks of a stream that start at p + i K all have it.
template <int K, typename T> PYOPD_HD int chunk_offset(const T* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return -1;
  return static_cast<int>(a % kChunkAlign<K, T>);
}

// K elements of T at p, where p is `ob` bytes past a kChunkAlign boundary
// (ob is the same for every chunk of a row, so the branch is uniform). With
// ob != 0 the chunk straddles kChunkAlign-byte words: the words around it are
// loaded aligned (each overlaps the chunk, so none can leave its allocation)
// and the chunk's words are cut out of them with word selects and a 16-bit
// funnel shift. Neighbouring threads load the same words, which L1 serves:
// DRAM traffic is that of the aligned case.
template <int K, typename T, typename Acc>
PYOPD_HD void load_chunk_at(const T* p, int ob, Acc (&out)[K]) {
  if constexpr (K == 1) {
    (void)ob;
    load_chunk<1>(p, out);
  } else {
    constexpr int kB = K * sizeof(T), kA = kChunkAlign<K, T>;
    constexpr int kNW = kB / 4, kNA = kA / 4;  // words in the chunk, in an aligned word
    if (ob == 0) {
      load_chunk<K>(p, out);
      return;
    }
    const char* base = reinterpret_cast<const char*>(p) - ob;
    uint32_t cat[kNW + kNA];
PYOPD_UNROLL
    for (int i = 0; i <= kB / kA; ++i) {
      uint32_t w[kNA];
      load_words<kA>(base + i * kA, w);
PYOPD_UNROLL
      for (int k = 0; k < kNA; ++k) cat[i * kNA + k] = w[k];
    }
    // Barrel shift by ob / 4 words: one select stage per bit, all on registers.
    const int ws = ob / 4;
PYOPD_UNROLL
    for (int bit = 1; bit < kNA; bit *= 2) {
      const bool on = (ws & bit) != 0;
PYOPD_UNROLL
      for (int k = 0; k + bit < kNW + kNA; ++k) cat[k] = on ? cat[k + bit] : cat[k];
    }
    uint32_t w[kNW];
    const int hs = (ob % 4) * 8;  // 0 or 16: 2-byte types may sit mid-word
PYOPD_UNROLL
    for (int k = 0; k < kNW; ++k) {
#ifdef __CUDA_ARCH__
      w[k] = __funnelshift_r(cat[k], cat[k + 1], hs);
#else
      w[k] = hs == 0 ? cat[k] : (cat[k] >> hs) | (cat[k + 1] << (32 - hs));
#endif
    }
    decode<K>(w, out, T());
  }
}

// ---- running state of a row ----------------------------------------------------
// Per distribution: m = running max of x = s / T, Z = sum exp(x - m),
// A = sum exp(x - m) (x - m); D = sum exp(x_j - m_s) ((x_j - m_s) - (y_j - m_t)).
// Each x - m is vmul(s, 1/T) - m, the very value the backward forms again for
// log p and log q, so that forward and backward round alike (which keeps KL
// gradients tight at logits of 1e4).
// H = max over ids j < V of (x_j - m_s) - (y_j - m_t): +inf exactly when some
// id has a finite student logit and a -inf teacher logit (the student's support
// is not inside the teacher's), which makes the KL +inf even where that id's
// exp(x - m_s) underflows to 0. NaN differences (both -inf) are dropped by vmax.
// No constructors or default member initialisers: these live in __shared__.

template <typename Acc> struct Dist {
  Acc m;  // max of the scaled logits seen so far (-inf: none finite yet); never NaN
  Acc Z;  // sum exp(x - m)   (NaN once a NaN logit was seen)
  Acc A;  // sum exp(x - m) (x - m), 0 where exp(x - m) == 0
};

template <typename Acc> struct RowState {
  Dist<Acc> s, t;  // student; teacher (unused without one)
  Acc D;           // cross term, in the frame of (s.m, t.m)
  Acc H;           // hole detector (see above); -inf while nothing was seen
};

template <typename Acc> PYOPD_HD RowState<Acc> empty_state() {
  RowState<Acc> st;
  st.s.m = st.t.m = neg_inf<Acc>();
  st.s.Z = st.s.A = st.t.Z = st.t.A = st.D = Acc(0);
  st.H = neg_inf<Acc>();
  return st;
}

// -m, the shift of the sums: 0 for an all -inf prefix (m = -inf), where
// exp(-inf - 0) = 0 and exp(-inf - (-inf)) would be NaN. After a +inf logit
// (m = +inf) the shift is the most negative finite value: the +inf ids then
// add exp(+inf) = +inf to Z (so lse = +inf, as in PyTorch) and finite ones 0,
// instead of inf - inf = NaN, which is kept for NaN logits.
template <typename Acc> PYOPD_HD Acc neg_shift(const Dist<Acc>& d) {
  if (d.m == neg_inf<Acc>()) return Acc(0);
  return d.m == -neg_inf<Acc>() ? -max_finite<Acc>() : -d.m;
}

// Moves a distribution's sums to a larger max: Z' = a Z, A' = a (A + (m - m') Z)
// with a = exp(m - m'). An empty state (Z == 0) only takes the new max, so
// -inf - (-inf) is never formed; a NaN Z stays NaN (0 * NaN).
template <typename Acc> PYOPD_HD void rebase(Dist<Acc>& r, Acc new_m) {
  if (!(new_m > r.m)) return;
  if (r.Z != Acc(0)) {
    const Acc d = r.m - new_m;  // < 0
    const Acc a = vexp(d);
    r.A = a * (r.A + d * r.Z);
    r.Z = a * r.Z;
  }
  r.m = new_m;
}

// Moves D to new maxima; call before rebase() of either side (it needs the old
// s.m, s.Z and t.m). A larger m_t adds (m_t' - m_t) to every (x - m_s) - (y - m_t)
// term; a larger m_s rescales D like A. D = 0 while the student has no mass.
// D may be +inf (student mass where the teacher's logit is -inf); when the
// student's rescale factor underflows to 0, those terms have exp(x - m_s) == 0
// in the new frame and count 0, as in a two-pass sum, instead of 0 * inf.
// (A NaN logit has already made s.Z or t.Z NaN, so no NaN is lost here.)
template <typename Acc>
PYOPD_HD void rebase_cross(Acc& D, const Dist<Acc>& s, const Dist<Acc>& t, Acc new_ms, Acc new_mt) {
  if (s.Z == Acc(0)) return;
  if (new_mt > t.m) D -= (t.m - new_mt) * s.Z;
  if (new_ms > s.m) {
    const Acc d = s.m - new_ms;
    const Acc a = vexp(d);
    D = a > Acc(0) ? a * (D + d * s.Z) : Acc(0);
  }
}

// a <- a combined with b: both are moved to the common maxima, then added.
// Symmetric, so the two lanes of a butterfly step get the same result.
template <bool kTeacher, typename Acc> PYOPD_HD void merge(RowState<Acc>& a, RowState<Acc> b) {
  const Acc ms = vmax(a.s.m, b.s.m);
  if constexpr (kTeacher) {
    const Acc mt = vmax(a.t.m, b.t.m);
    rebase_cross(a.D, a.s, a.t, ms, mt);
    rebase_cross(b.D, b.s, b.t, ms, mt);
    rebase(a.t, mt);
    rebase(b.t, mt);
    a.t.Z += b.t.Z;
    a.t.A += b.t.A;
    a.D += b.D;
    a.H = vmax(a.H, b.H);
  }
  rebase(a.s, ms);
  rebase(b.s, ms);
  a.s.Z += b.s.Z;
  a.s.A += b.s.A;
}

// ---- forward work on a chunk ------------------------------------------------------
// A chunk's max is taken on the raw values and scaled once: rounding is
// monotone and 1/T > 0, so vmul(max(s), 1/T) == max(vmul(s, 1/T)), as the
// CPU computes it.

template <int N, int K, typename Acc> PYOPD_HD Acc chunk_max(const Acc (&v)[N][K]) {
  Acc mx = v[0][0];
PYOPD_UNROLL
  for (int u = 0; u < N; ++u) {
PYOPD_UNROLL
    for (int k = 0; k < K; ++k) mx = vmax(mx, v[u][k]);  // drops NaN, like std::max on the CPU
  }
  return mx;
}

// Z, A of one distribution over a chunk, after the rebase to its max.
// Terms are 0 where exp(x - m) == 0 (a -inf logit: no 0 * inf), as on the CPU.
template <int N, int K, typename Acc>
PYOPD_HD void accumulate(Dist<Acc>& d, const Acc (&v)[N][K], Acc inv_t) {
  const Acc shift = neg_shift(d);
PYOPD_UNROLL
  for (int u = 0; u < N; ++u) {
PYOPD_UNROLL
    for (int k = 0; k < K; ++k) {
      const Acc dx = vmul(v[u][k], inv_t) + shift;
      const Acc e = vexp(dx);
      d.Z += e;
      d.A = e > Acc(0) ? vfma(e, dx, d.A) : d.A;
    }
  }
}

// Student and teacher over the same ids j < V.
template <int N, int K, typename Acc>
PYOPD_HD void accumulate_joint(RowState<Acc>& st, const Acc (&xs)[N][K], const Acc (&xt)[N][K],
                               Acc inv_t) {
  const Acc new_ms = vmax(st.s.m, vmul(chunk_max(xs), inv_t));
  const Acc new_mt = vmax(st.t.m, vmul(chunk_max(xt), inv_t));
  if (new_ms > st.s.m || new_mt > st.t.m) {  // rare after the first chunks
    rebase_cross(st.D, st.s, st.t, new_ms, new_mt);
    rebase(st.s, new_ms);
    rebase(st.t, new_mt);
  }
  const Acc shift_s = neg_shift(st.s), shift_t = neg_shift(st.t);
PYOPD_UNROLL
  for (int u = 0; u < N; ++u) {
PYOPD_UNROLL
    for (int k = 0; k < K; ++k) {
      const Acc dx = vmul(xs[u][k], inv_t) + shift_s;
      const Acc dy = vmul(xt[u][k], inv_t) + shift_t;
      const Acc es = vexp(dx);
      const Acc et = vexp(dy);
      const Acc diff = dx - dy;
      st.s.Z += es;
      st.t.Z += et;
      st.t.A = et > Acc(0) ? vfma(et, dy, st.t.A) : st.t.A;
      st.H = vmax(st.H, diff);  // +inf: a teacher hole under a finite student logit
      // 0 where es == 0 (also when both logits are -inf); +inf where only the
      // teacher's is -inf: the KL is then infinite.
      if (es > Acc(0)) {
        st.s.A = vfma(es, dx, st.s.A);
        st.D = vfma(es, diff, st.D);
      }
    }
  }
}

// Chunk visitors for walk_row: run<K, N, kStride>(j0) handles the N chunks of
// K elements at j0, j0 + kStride, ... (all loads first, so they overlap).
// The chunk's max is taken on the raw values (see RowState).

template <typename S> struct FwdStudentOnly {
  using Acc = acc_t<S>;
  const S* s;
  Acc inv_t;
  Dist<Acc>& d;
  template <int K, int N, int kStride> PYOPD_HD void run(int j0) {
    Acc xs[N][K];
PYOPD_UNROLL
    for (int u = 0; u < N; ++u) load_chunk<K>(s + j0 + u * kStride, xs[u]);
    rebase(d, vmax(d.m, vmul(chunk_max(xs), inv_t)));
    accumulate(d, xs, inv_t);
  }
};

// The student leads (its chunks are aligned); the teacher's chunks are ob_t
// bytes past their alignment.
template <typename S, typename T> struct FwdJoint {
  using Acc = acc_t<S>;
  const S* s;
  const T* t;
  int ob_t;
  Acc inv_t;
  RowState<Acc>& st;
  template <int K, int N, int kStride> PYOPD_HD void run(int j0) {
    Acc xs[N][K], xt[N][K];
PYOPD_UNROLL
    for (int u = 0; u < N; ++u) {
      load_chunk<K>(s + j0 + u * kStride, xs[u]);
      load_chunk_at<K>(t + j0 + u * kStride, ob_t, xt[u]);
    }
    accumulate_joint(st, xs, xt, inv_t);
  }
};

// Teacher ids V..Vt-1 (t points at id V): no student mass there, but a larger
// teacher max still moves D.
template <typename T, typename Acc> struct FwdTeacherTail {
  const T* t;
  Acc inv_t;
  RowState<Acc>& st;
  template <int K, int N, int kStride> PYOPD_HD void run(int j0) {
    Acc xt[N][K];
PYOPD_UNROLL
    for (int u = 0; u < N; ++u) load_chunk<K>(t + j0 + u * kStride, xt[u]);
    const Acc new_mt = vmax(st.t.m, vmul(chunk_max(xt), inv_t));
    if (new_mt > st.t.m) {
      rebase_cross(st.D, st.s, st.t, st.s.m, new_mt);
      rebase(st.t, new_mt);
    }
    accumulate(st.t, xt, inv_t);
  }
};

// ---- backward work on a chunk -------------------------------------------------------
// grad_j = (p_j (a lp_j - g_kl lq_j + b) + g_lp [j == y]) / T, the p-term 0
// where p_j == 0 (or NaN, as on the CPU), with a = g_kl - g_h and
// b = -g_kl KL - g_lp - g_h H_s + g_lse. T = NoTeacher: lq is not read (the
// row's g_kl is 0 or there is no KL gradient).
template <typename Acc> struct BwdCoeffs {
  Acc inv_t, ms, log_zs, mt, log_zt, a, b, g_kl, g_lp;
  int y;  // sampled id, -1 when none
};

// The gradient, the only stored stream, leads (its chunks are aligned); the
// student's and teacher's chunks are ob_s and ob_t bytes past their alignment.
// Ids j are relative to the slice start; y is too.
template <typename S, typename T, typename G> struct BwdRow {
  using Acc = acc_t<S>;
  static constexpr bool kTeacher = !std::is_same<T, NoTeacher>::value;
  const S* s;
  const T* t;
  G* g;
  int ob_s, ob_t;
  const BwdCoeffs<Acc>& c;
  template <int K, int N, int kStride> PYOPD_HD void run(int j0) {
    Acc xs[N][K];
    Acc xt[kTeacher ? N : 1][K];
PYOPD_UNROLL
    for (int u = 0; u < N; ++u) {
      load_chunk_at<K>(s + j0 + u * kStride, ob_s, xs[u]);
      if constexpr (kTeacher) load_chunk_at<K>(t + j0 + u * kStride, ob_t, xt[u]);
    }
PYOPD_UNROLL
    for (int u = 0; u < N; ++u) {
      Acc out[K];
PYOPD_UNROLL
      for (int k = 0; k < K; ++k) {
        const Acc lp = nonpos((vmul(xs[u][k], c.inv_t) - c.ms) - c.log_zs);
        const Acc pj = vexp(lp);
        Acc inner = vfma(c.a, lp, c.b);
        if constexpr (kTeacher) {
          const Acc lq = nonpos((vmul(xt[u][k], c.inv_t) - c.mt) - c.log_zt);
          inner -= c.g_kl * lq;
        }
        Acc gj = pj > Acc(0) ? pj * inner : Acc(0);
        gj += (j0 + u * kStride + k == c.y) ? c.g_lp : Acc(0);
        out[k] = gj * c.inv_t;
      }
      store_chunk<K>(g + j0 + u * kStride, out);
    }
  }
};

// Constant gradient row: 0 for masked rows, NaN for rows whose gradient is
// undefined (see bwd_row_part). No logits are read.
template <typename G, typename Acc> struct ConstRow {
  G* g;
  Acc value;
  template <int K, int N, int kStride> PYOPD_HD void run(int j0) {
    Acc z[K];
PYOPD_UNROLL
    for (int k = 0; k < K; ++k) z[k] = value;
PYOPD_UNROLL
    for (int u = 0; u < N; ++u) store_chunk<K>(g + j0 + u * kStride, z);
  }
};

// ---- splitting a row among TPR threads ------------------------------------------------
// Thread `tid` of TPR visits chunks tid, tid + TPR, ...: neighbouring threads
// touch neighbouring 16-byte words, so every warp access is coalesced. U
// chunks per step are loaded before any is used (bytes in flight).
template <int K, int U, int TPR, typename Op>
PYOPD_HD void walk_chunks(Op& op, int begin, int n_chunks, int tid) {
  int c = tid;
  for (; c + (U - 1) * TPR < n_chunks; c += U * TPR) op.template run<K, U, TPR * K>(begin + c * K);
  for (; c < n_chunks; c += TPR) op.template run<K, 1, TPR * K>(begin + c * K);
}

// Visits ids [0, n) once each. With `vec`: ids [0, head) one element per
// thread (head < K <= TPR, which aligns the lead pointer to 16 bytes), then
// K-wide chunks, then the < K leftover ids one per thread. Without: scalar.
template <int K, int U, int TPR, typename Op>
PYOPD_HD void walk_row(Op& op, int n, int head, bool vec, int tid) {
  static_assert(K <= TPR, "head and tail take one id per thread");
  if (!vec) {
    walk_chunks<1, 4, TPR>(op, 0, n, tid);
    return;
  }
  head = head < n ? head : n;
  if (tid < head) op.template run<1, 1, TPR>(tid);
  const int n_vec = (n - head) / K;
  walk_chunks<K, U, TPR>(op, head, n_vec, tid);
  const int j = head + n_vec * K + tid;
  if (j < n) op.template run<1, 1, TPR>(j);
}

// ---- per-row outputs ------------------------------------------------------------------------

template <typename Acc> PYOPD_HD Acc nonneg(Acc v) { return v < Acc(0) ? Acc(0) : v; }  // keeps NaN

template <typename Acc> PYOPD_HD void write_fwd_zeros(const VocabStatsFwdParams& p, int64_t r,
                                                     bool teacher) {
  static_cast<Acc*>(p.student_entropy)[r] = Acc(0);
  static_cast<Acc*>(p.student_logprob)[r] = Acc(0);
  static_cast<Acc*>(p.student_lse)[r] = Acc(0);
  for (int k = 0; k < 4; ++k) static_cast<Acc*>(p.stats)[4 * r + k] = Acc(0);
  if (teacher) {
    static_cast<Acc*>(p.kl)[r] = Acc(0);
    static_cast<Acc*>(p.teacher_entropy)[r] = Acc(0);
    static_cast<Acc*>(p.teacher_logprob)[r] = Acc(0);
    static_cast<Acc*>(p.teacher_lse)[r] = Acc(0);
  }
}

// Sampled id of row r: -1 when there are no tokens or the id is negative (log-prob 0,
// as on the CPU); ids >= V give a NaN log-prob instead of an out-of-bounds read.
PYOPD_HD int64_t token_of(const int64_t* tokens, int64_t r) {
  return tokens != nullptr && tokens[r] >= 0 ? tokens[r] : -1;
}

template <typename T, typename P> PYOPD_HD const T* teacher_row(const P& p, int64_t r) {
  if constexpr (std::is_same<T, NoTeacher>::value) {
    (void)p;
    (void)r;
    return nullptr;
  } else {
    return static_cast<const T*>(p.teacher) + r * p.teacher_row_stride;
  }
}
template <typename S, typename P> PYOPD_HD const S* student_row(const P& p, int64_t r) {
  return static_cast<const S*>(p.student) + r * p.student_row_stride;
}

// ---- one thread's share of a row ---------------------------------------------------------
// The kernels run these on TPR threads per row; thread `tid` returns (forward)
// the state of the ids it visited, to be merged with the other threads'. A
// row may also be split into slices [jb, je) of its ids, each done by its own
// block (few rows); the slices' states merge like the threads' do.

// Walks ids [0, n) of a lead stream at `lead`, K-element chunks aligned on it.
// `others_ok`: the other streams are element-aligned (else all scalar).
template <int K, int U, int TPR, typename Lead, typename Op>
PYOPD_HD void walk_led_by(Op& op, const Lead* lead, int n, bool others_ok, int tid) {
  const int head = head_to<kChunkAlign<K, Lead>>(lead);
  walk_row<K, U, TPR>(op, n, head, head >= 0 && others_ok, tid);
}

template <typename S, typename T, int TPR>
PYOPD_HD RowState<acc_t<S>> fwd_row_part(const VocabStatsFwdParams& p, int64_t r, int tid,
                                         int64_t jb, int64_t je) {
  using Acc = acc_t<S>;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  const int64_t V = p.vocab;
  RowState<Acc> st = empty_state<Acc>();
  const int64_t jv = je < V ? je : V;  // end of the ids < V in the slice
  if constexpr (std::is_same<T, NoTeacher>::value) {
    constexpr int K = 16 / sizeof(S);
    const S* srow = student_row<S>(p, r) + jb;
    FwdStudentOnly<S> op{srow, inv_t, st.s};
    walk_led_by<K, 4, TPR>(op, srow, static_cast<int>(jv - jb), true, tid);
  } else {
    if (jb < V) {
      // Student and teacher advance together in chunks of one 16-byte student
      // word; the teacher's chunks may sit at another offset (load_chunk_at).
      constexpr int K = 16 / sizeof(S);
      const S* srow = student_row<S>(p, r) + jb;
      const T* trow = teacher_row<T>(p, r) + jb;
      const int head = head_to<16>(srow);
      const int ob_t = head >= 0 ? chunk_offset<K>(trow + head) : -1;
      FwdJoint<S, T> op{srow, trow, ob_t, inv_t, st};
      walk_row<K, 2, TPR>(op, static_cast<int>(jv - jb), head, head >= 0 && ob_t >= 0, tid);
    }
    const int64_t tb = jb > V ? jb : V;  // teacher-only ids [tb, je)
    if (tb < je) {
      constexpr int K = 16 / sizeof(T);
      const T* tail = teacher_row<T>(p, r) + tb;
      FwdTeacherTail<T, Acc> op{tail, inv_t, st};
      walk_led_by<K, 4, TPR>(op, tail, static_cast<int>(je - tb), true, tid);
    }
  }
  return st;
}

// Writes the outputs of row r from the merged state of all its ids. Once per
// row, so in double like the CPU kernel's final sums: KL and log-probs near
// 1e4 would otherwise collect several float roundings.
template <typename S, typename T>
PYOPD_HD void finalize_fwd(const VocabStatsFwdParams& p, int64_t r, const RowState<acc_t<S>>& st) {
  using Acc = acc_t<S>;
  constexpr bool kTeacher = !std::is_same<T, NoTeacher>::value;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  const int64_t y = token_of(p.tokens, r);
  if (p.token_ok != nullptr && p.tokens != nullptr && (p.tokens[r] < 0 || p.tokens[r] >= p.vocab)) {
    *p.token_ok = 0;  // unmasked rows only reach here; every writer stores the same 0
  }
  auto out = [r](void* v, double x) { static_cast<Acc*>(v)[r] = static_cast<Acc>(x); };
  // A row whose lse is not finite (a NaN or +inf logit, or every logit -inf)
  // has no distribution: NaN entropy, log-prob (for a sampled id) and KL, as
  // log_softmax gives in PyTorch. lse itself is NaN, +inf or -inf.
  // Log-probs are <= 0 (nonpos): the rounding of z - m - log Z may give +1 ulp.
  const double zs = st.s.Z, log_zs = log(zs);
  const double lse_s = double(st.s.m) + log_zs;
  const bool fin_s = finite(lse_s);
  out(p.student_entropy, fin_s ? nonneg(log_zs - double(st.s.A) / zs) : double(NAN));
  out(p.student_lse, lse_s);
  double lp_s = 0.0;  // no sampled id
  if (y >= p.vocab || (y >= 0 && !fin_s)) {
    lp_s = NAN;
  } else if (y >= 0) {
    const Acc z = vmul(to_acc(load_elem(student_row<S>(p, r) + y), Acc()), inv_t);
    lp_s = nonpos(double(z - st.s.m) - log_zs);
  }
  out(p.student_logprob, lp_s);
  Acc* stats = static_cast<Acc*>(p.stats) + 4 * r;
  stats[0] = st.s.m;
  stats[1] = static_cast<Acc>(log_zs);
  stats[2] = Acc(0);
  stats[3] = Acc(0);
  if constexpr (kTeacher) {
    const double zt = st.t.Z, log_zt = log(zt);
    const double lse_t = double(st.t.m) + log_zt;
    const bool fin_t = finite(lse_t);
    out(p.teacher_entropy, fin_t ? nonneg(log_zt - double(st.t.A) / zt) : double(NAN));
    out(p.teacher_lse, lse_t);
    double lp_t = 0.0;
    if (y >= p.vocab || (y >= 0 && !fin_t)) {
      lp_t = NAN;
    } else if (y >= 0) {
      const Acc z = vmul(to_acc(load_elem(teacher_row<T>(p, r) + y), Acc()), inv_t);
      lp_t = nonpos(double(z - st.t.m) - log_zt);
    }
    out(p.teacher_logprob, lp_t);
    // KL: +inf when the teacher has a hole under a finite student logit (even
    // one whose p underflows to 0; an all -inf teacher is all hole); NaN when
    // the student has no distribution or the teacher's lse is NaN or +inf.
    double kl = NAN;
    if (fin_s && !is_nan(lse_t) && lse_t != double(INFINITY)) {
      kl = st.H == -neg_inf<Acc>() ? double(INFINITY) : nonneg(double(st.D) / zs - log_zs + log_zt);
    }
    out(p.kl, kl);
    stats[2] = st.t.m;
    stats[3] = static_cast<Acc>(log_zt);
  }
}

// Gradient of ids [jb, jb + n) of a row, the teacher read (T) or not (NoTeacher).
// The gradient leads; student and teacher loads follow at their own offsets.
template <typename S, typename T, typename G, int TPR>
PYOPD_HD void bwd_walk(const S* srow, const T* trow, G* grow, int n, const BwdCoeffs<acc_t<S>>& c,
                       int tid) {
  constexpr int K = 16 / sizeof(S);
  constexpr bool kTeacher = !std::is_same<T, NoTeacher>::value;
  const int head = head_to<kChunkAlign<K, G>>(grow);
  const int ob_s = head >= 0 ? chunk_offset<K>(srow + head) : -1;
  int ob_t = 0;
  if constexpr (kTeacher) ob_t = head >= 0 ? chunk_offset<K>(trow + head) : -1;
  BwdRow<S, T, G> op{srow, trow, grow, ob_s, ob_t, c};
  // Two chunks per step in flight, except where the teacher or gradient is
  // wider than the student (32-byte chunks), or a float16 student is read with
  // a teacher (its conversions): those spill registers at the 64-register
  // budget with two (ptxas -v, sm_80 / sm_90).
  constexpr bool kWide = sizeof(G) > sizeof(S) || (kTeacher && sizeof(T) > sizeof(S)) ||
                         (kTeacher && std::is_same<S, __half>::value);
  walk_row<K, kWide ? 1 : 2, TPR>(op, n, head, head >= 0 && ob_s >= 0 && ob_t >= 0, tid);
}

// Thread tid's share of the gradient of ids [jb, je) of row r (no cross-thread
// state, so slices need no merge).
template <typename S, typename T, typename G, int TPR>
PYOPD_HD void bwd_row_part(const VocabStatsBwdParams& p, int64_t r, int tid, int64_t jb, int64_t je) {
  using Acc = acc_t<S>;
  const int n = static_cast<int>(je - jb);
  G* grow = static_cast<G*>(p.grad_student) + r * p.vocab + jb;
  if (p.mask != nullptr && !p.mask[r]) {
    ConstRow<G, Acc> op{grow, Acc(0)};
    walk_led_by<16 / sizeof(G), 4, TPR>(op, grow, n, true, tid);
    return;
  }
  // Per-row inputs are float (double for float64 logits), like the forward's
  // outputs. Same formulas and operation order as the CPU kernel.
  auto at = [r](const void* v) -> Acc { return v != nullptr ? static_cast<const Acc*>(v)[r] : Acc(0); };
  const int64_t y = token_of(p.tokens, r);
  const Acc g_kl = at(p.grad_kl), g_h = at(p.grad_entropy), g_lse = at(p.grad_lse);
  // Without a sampled id the log-prob is the constant 0: its upstream gradient
  // contributes nothing (not -g_lp p).
  const Acc g_lp = y >= 0 ? at(p.grad_logprob) : Acc(0);
  const Acc kl = p.grad_kl != nullptr ? at(p.kl) : Acc(0);
  const Acc hs = p.grad_entropy != nullptr ? at(p.student_entropy) : Acc(0);
  const Acc* stats = static_cast<const Acc*>(p.stats) + 4 * r;
  BwdCoeffs<Acc> c;
  c.inv_t = static_cast<Acc>(p.inv_temperature);
  c.ms = stats[0];
  c.log_zs = stats[1];
  c.mt = stats[2];
  c.log_zt = stats[3];
  // The gradient is undefined (all NaN) where the student has no distribution
  // (lse NaN or +-inf), or where an output with a nonzero upstream gradient is
  // not finite (a +inf KL from a teacher hole, a NaN entropy).
  const bool undefined = !finite(c.ms + c.log_zs) || (g_kl != Acc(0) && !finite(kl)) ||
                         (g_h != Acc(0) && !finite(hs));
  if (undefined) {
    ConstRow<G, Acc> op{grow, static_cast<Acc>(NAN)};
    walk_led_by<16 / sizeof(G), 4, TPR>(op, grow, n, true, tid);
    return;
  }
  c.a = g_kl - g_h;
  // A zero upstream gradient contributes nothing, not 0 * value: the KL is +inf
  // on a row with a teacher hole, and 0 * inf would make the row NaN.
  c.b = (g_kl != Acc(0) ? -g_kl * kl : Acc(0)) - g_lp - (g_h != Acc(0) ? g_h * hs : Acc(0)) + g_lse;
  c.g_kl = g_kl;
  c.g_lp = g_lp;
  // The one-hot term's id relative to the slice; -1 (never matched) outside it.
  c.y = y >= jb && y < je ? static_cast<int>(y - jb) : -1;
  const S* srow = student_row<S>(p, r) + jb;
  // The teacher is read only where the KL has a nonzero upstream gradient
  // (the launch picks T = NoTeacher when grad_kl is null), as on the CPU.
  if constexpr (!std::is_same<T, NoTeacher>::value) {
    if (g_kl != Acc(0)) {
      bwd_walk<S, T, G, TPR>(srow, teacher_row<T>(p, r) + jb, grow, n, c, tid);
      return;
    }
  }
  bwd_walk<S, NoTeacher, G, TPR>(srow, nullptr, grow, n, c, tid);
}

}  // namespace vs_cuda
}  // namespace pyopd
