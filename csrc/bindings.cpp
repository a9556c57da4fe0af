// The only pybind11 file: exposes the framework-free kernel interface as the
// extension module pyopd._C. Tensors cross as integer data pointers, element
// strides and dtype tags inside plain params structs; the Python wrappers in
// pyopd/ops/ allocate outputs with torch and validate user arguments first.
// The checks here are a second line of defence against a wrapper bug: they
// name the offending params field and never let a kernel read out of bounds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pyopd/runtime.h"
#include "pyopd/signals.h"
#include "pyopd/vocab_stats.h"
#ifdef PYOPD_WITH_CUDA
#include "cuda/cuda_status.h"  // csrc/cuda, next to this file
#endif

namespace py = pybind11;
using namespace pyopd;

namespace {

// Pointer fields are exchanged with Python as plain integers (data_ptr()).
#define PYOPD_PTR_FIELD(cls, Struct, field)                                                      \
  cls.def_property(                                                                              \
      #field, [](const Struct& s) { return reinterpret_cast<uintptr_t>(s.field); },              \
      [](Struct& s, uintptr_t v) {                                                               \
        s.field = reinterpret_cast<decltype(s.field)>(v);                                        \
      })

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

void check_dtype(DType d, const char* field) {
  const int v = static_cast<int>(d);
  require(v >= 0 && v <= 3, std::string(field) + ": unknown dtype tag " + std::to_string(v));
}

// Checks of the inputs, shared by forward and backward.
void check_common(const VocabStatsInputs& p) {
  require(p.n_rows > 0, "n_rows must be > 0");
  require(p.vocab > 0, "vocab must be > 0");
  require(p.student != nullptr, "student must not be null");
  check_dtype(p.student_dtype, "student_dtype");
  require(p.student_row_stride >= p.vocab, "student_row_stride must be >= vocab");
  require(p.inv_temperature > 0.0, "inv_temperature must be > 0");
  if (p.teacher != nullptr) {
    check_dtype(p.teacher_dtype, "teacher_dtype");
    require(p.teacher_vocab >= p.vocab, "teacher_vocab must be >= vocab");
    require(p.teacher_row_stride >= p.teacher_vocab, "teacher_row_stride must be >= teacher_vocab");
    require((p.student_dtype == DType::kFloat64) == (p.teacher_dtype == DType::kFloat64),
            "float64 logits need both student and teacher in float64");
  }
}

void check_fwd(const VocabStatsFwdParams& p) {
  check_common(p);
  require(p.student_entropy && p.student_logprob && p.student_lse && p.stats,
          "student outputs (student_entropy, student_logprob, student_lse, stats) must not be null");
  if (p.teacher != nullptr) {
    require(p.kl && p.teacher_entropy && p.teacher_logprob && p.teacher_lse,
            "teacher outputs (kl, teacher_entropy, teacher_logprob, teacher_lse) must not be null");
  }
}

void check_bwd(const VocabStatsBwdParams& p) {
  check_common(p);
  require(p.stats != nullptr, "stats must not be null");
  require(p.grad_student != nullptr, "grad_student must not be null");
  check_dtype(p.grad_dtype, "grad_dtype");
  require(p.grad_kl == nullptr || (p.teacher != nullptr && p.kl != nullptr),
          "grad_kl needs teacher and kl");
  require(p.grad_entropy == nullptr || p.student_entropy != nullptr,
          "grad_entropy needs student_entropy");
  if (p.student_dtype == DType::kFloat64) {
    require(p.grad_dtype == DType::kFloat64, "grad_dtype must be float64 for float64 logits");
  }
}

void raise_if(const char* err) {
  if (err != nullptr) throw std::runtime_error(err);
}

bool cuda_compiled() {
#ifdef PYOPD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Runs `cpu` for device < 0, else `cuda` on that ordinal; a CPU-only build
// says so instead of crashing.
template <typename Cpu, typename Cuda>
void on_device(int device, Cpu&& cpu, Cuda&& cuda) {
  if (device < 0) {
    py::gil_scoped_release nogil;
    raise_if(cpu());
    return;
  }
  if (!cuda_compiled()) {
    throw std::runtime_error("This build of pyopd has no CUDA kernels (built without nvcc); "
                             "reinstall with PYOPD_CUDA=ON on a machine with the CUDA toolkit");
  }
  const char* err = nullptr;
  {
    py::gil_scoped_release nogil;
    err = cuda();
  }
#ifdef PYOPD_WITH_CUDA
  if (err != nullptr) {
    // A CUDA error on a machine where the kernels cannot run at all (no or an
    // old driver, no device) says why, instead of only the runtime's message.
    const CudaStatus st = cuda_status();
    if (!st.available) {
      throw std::runtime_error(std::string("pyopd CUDA kernels cannot run: ") + st.reason +
                               " (CUDA error: " + err + ")");
    }
  }
#endif
  raise_if(err);
}

// The one way a binding reaches a CUDA launcher: a callable that returns its error
// message, or (CPU-only build) nothing to call.
#ifdef PYOPD_WITH_CUDA
#define PYOPD_CUDA_CALL(expr) [&]() -> const char* { return expr; }
#else
#define PYOPD_CUDA_CALL(expr) []() -> const char* { return nullptr; }
#endif

// ---- signals bindings (trajectory_scores, fire_token_weights, group_advantages)

void check_float_dtype(DType d, const char* field) {
  check_dtype(d, field);
  require(d == DType::kFloat32 || d == DType::kFloat64,
          std::string(field) + " must be float32 or float64");
}

// Shape and optional-input checks common to the three signal kernels.
template <typename P>
void check_signal_shape(const P& p) {
  require(p.rows >= 0, "rows must be >= 0");
  require(p.cols >= 0, "cols must be >= 0");
  check_float_dtype(p.dtype, "dtype");
  if (p.mask != nullptr) require(p.mask_row_stride >= p.cols, "mask_row_stride must be >= cols");
}

void check_row_input(const void* ptr, int64_t stride, int64_t cols, const char* field,
                     bool required) {
  if (ptr == nullptr) {
    require(!required, std::string(field) + " must not be null");
    return;
  }
  require(stride >= cols, std::string(field) + "_row_stride must be >= cols");
}

void check_trajectory_stats(const TrajectoryStatsParams& p) {
  check_signal_shape(p);
  require(p.length != nullptr, "length must not be null");
  check_row_input(p.teacher_logprob, p.teacher_logprob_row_stride, p.cols, "teacher_logprob", false);
  check_row_input(p.kl, p.kl_row_stride, p.cols, "kl", false);
  check_row_input(p.teacher_entropy, p.teacher_entropy_row_stride, p.cols, "teacher_entropy", false);
  check_row_input(p.student_entropy, p.student_entropy_row_stride, p.cols, "student_entropy", false);
  require(p.score == nullptr || p.teacher_logprob != nullptr, "score needs teacher_logprob");
  require(p.mean_kl == nullptr || p.kl != nullptr, "mean_kl needs kl");
  require((p.mean_teacher_entropy == nullptr && p.max_teacher_entropy == nullptr) ||
              p.teacher_entropy != nullptr,
          "mean_teacher_entropy / max_teacher_entropy need teacher_entropy");
  require((p.mean_student_entropy == nullptr && p.max_student_entropy == nullptr) ||
              p.student_entropy != nullptr,
          "mean_student_entropy / max_student_entropy need student_entropy");
}

void check_fire_weights(const FireWeightsParams& p) {
  check_signal_shape(p);
  check_row_input(p.teacher_entropy, p.teacher_entropy_row_stride, p.cols, "teacher_entropy", true);
  check_row_input(p.student_entropy, p.student_entropy_row_stride, p.cols, "student_entropy", true);
  require(p.teacher_entropy_max != nullptr, "teacher_entropy_max must not be null");
  require(p.student_entropy_max != nullptr, "student_entropy_max must not be null");
  require(p.weight != nullptr, "weight must not be null");
  require(p.alpha >= 0.0, "alpha must be >= 0");
  require(p.beta >= 0.0, "beta must be >= 0");
}

void check_group_adv(const GroupAdvParams& p, bool apply) {
  check_signal_shape(p);
  check_row_input(p.teacher_logprob, p.teacher_logprob_row_stride, p.cols, "teacher_logprob", true);
  check_row_input(p.student_logprob, p.student_logprob_row_stride, p.cols, "student_logprob", true);
  require(p.clip_low < p.clip_high, "clip_low must be < clip_high");
  if (apply) {
    require(p.group_mean != nullptr && p.group_std != nullptr,
            "group_mean and group_std must not be null");
    require(p.advantage != nullptr, "advantage must not be null");
    require(p.eps > 0.0, "eps must be > 0");
  } else {
    require(p.row_count != nullptr && p.row_mean != nullptr && p.row_m2 != nullptr,
            "row_count, row_mean and row_m2 must not be null");
  }
}

void bind_signals(py::module_& m) {
  auto ts = py::class_<TrajectoryStatsParams>(m, "TrajectoryStatsParams").def(py::init<>());
  ts.def_readwrite("rows", &TrajectoryStatsParams::rows)
      .def_readwrite("cols", &TrajectoryStatsParams::cols)
      .def_readwrite("dtype", &TrajectoryStatsParams::dtype)
      .def_readwrite("mask_row_stride", &TrajectoryStatsParams::mask_row_stride)
      .def_readwrite("teacher_logprob_row_stride", &TrajectoryStatsParams::teacher_logprob_row_stride)
      .def_readwrite("kl_row_stride", &TrajectoryStatsParams::kl_row_stride)
      .def_readwrite("teacher_entropy_row_stride", &TrajectoryStatsParams::teacher_entropy_row_stride)
      .def_readwrite("student_entropy_row_stride", &TrajectoryStatsParams::student_entropy_row_stride);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, mask);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, teacher_logprob);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, kl);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, teacher_entropy);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, student_entropy);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, length);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, score);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, mean_kl);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, mean_teacher_entropy);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, mean_student_entropy);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, max_teacher_entropy);
  PYOPD_PTR_FIELD(ts, TrajectoryStatsParams, max_student_entropy);

  auto fw = py::class_<FireWeightsParams>(m, "FireWeightsParams").def(py::init<>());
  fw.def_readwrite("rows", &FireWeightsParams::rows)
      .def_readwrite("cols", &FireWeightsParams::cols)
      .def_readwrite("dtype", &FireWeightsParams::dtype)
      .def_readwrite("mask_row_stride", &FireWeightsParams::mask_row_stride)
      .def_readwrite("teacher_entropy_row_stride", &FireWeightsParams::teacher_entropy_row_stride)
      .def_readwrite("student_entropy_row_stride", &FireWeightsParams::student_entropy_row_stride)
      .def_readwrite("alpha", &FireWeightsParams::alpha)
      .def_readwrite("beta", &FireWeightsParams::beta)
      .def_readwrite("normalize_rows", &FireWeightsParams::normalize_rows);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, mask);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, teacher_entropy);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, student_entropy);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, keep);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, teacher_entropy_max);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, student_entropy_max);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, weight);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, row_sum);
  PYOPD_PTR_FIELD(fw, FireWeightsParams, row_count);

  auto ga = py::class_<GroupAdvParams>(m, "GroupAdvParams").def(py::init<>());
  ga.def_readwrite("rows", &GroupAdvParams::rows)
      .def_readwrite("cols", &GroupAdvParams::cols)
      .def_readwrite("dtype", &GroupAdvParams::dtype)
      .def_readwrite("mask_row_stride", &GroupAdvParams::mask_row_stride)
      .def_readwrite("teacher_logprob_row_stride", &GroupAdvParams::teacher_logprob_row_stride)
      .def_readwrite("student_logprob_row_stride", &GroupAdvParams::student_logprob_row_stride)
      .def_readwrite("clip_low", &GroupAdvParams::clip_low)
      .def_readwrite("clip_high", &GroupAdvParams::clip_high)
      .def_readwrite("bonus", &GroupAdvParams::bonus)
      .def_readwrite("eps", &GroupAdvParams::eps);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, mask);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, teacher_logprob);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, student_logprob);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, row_count);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, row_mean);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, row_m2);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, group_mean);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, group_std);
  PYOPD_PTR_FIELD(ga, GroupAdvParams, advantage);

  m.def(
      "trajectory_stats",
      [](const TrajectoryStatsParams& p, int device, uintptr_t stream) {
        check_trajectory_stats(p);
        (void)stream;
        on_device(
            device, [&]() { return trajectory_stats_cpu(p); },
            PYOPD_CUDA_CALL(trajectory_stats_cuda(p, device, reinterpret_cast<void*>(stream))));
      },
      py::arg("params"), py::arg("device") = -1, py::arg("stream") = 0,
      "Per-row masked means / entropy maxima of [B, T] signals. device < 0 is the CPU.");
  m.def(
      "fire_weights",
      [](const FireWeightsParams& p, int device, uintptr_t stream) {
        check_fire_weights(p);
        (void)stream;
        on_device(
            device, [&]() { return fire_weights_cpu(p); },
            PYOPD_CUDA_CALL(fire_weights_cuda(p, device, reinterpret_cast<void*>(stream))));
      },
      py::arg("params"), py::arg("device") = -1, py::arg("stream") = 0,
      "FiRe-OPD token weights (optionally mean-1 per row). device < 0 is the CPU.");
  m.def(
      "group_reward_moments",
      [](const GroupAdvParams& p, int device, uintptr_t stream) {
        check_group_adv(p, /*apply=*/false);
        (void)stream;
        on_device(
            device, [&]() { return group_reward_moments_cpu(p); },
            PYOPD_CUDA_CALL(
                group_reward_moments_cuda(p, device, reinterpret_cast<void*>(stream))));
      },
      py::arg("params"), py::arg("device") = -1, py::arg("stream") = 0,
      "COPSD pass 1: per-row count, mean, M2 of the clipped reward. device < 0 is the CPU.");
  m.def(
      "group_advantages_apply",
      [](const GroupAdvParams& p, int device, uintptr_t stream) {
        check_group_adv(p, /*apply=*/true);
        (void)stream;
        on_device(
            device, [&]() { return group_advantages_apply_cpu(p); },
            PYOPD_CUDA_CALL(
                group_advantages_apply_cuda(p, device, reinterpret_cast<void*>(stream))));
      },
      py::arg("params"), py::arg("device") = -1, py::arg("stream") = 0,
      "COPSD pass 2: (r - group mean) / (group std + eps). device < 0 is the CPU.");
}
// ---- end signals bindings

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyopd kernels (framework-free; see pyopd.ops for the torch API)";

  // ---- build information ---------------------------------------------------
  m.def("build_info", []() {
    py::dict d;
#ifdef PYOPD_VERSION
    d["version"] = PYOPD_VERSION;
#endif
    d["cuda"] = cuda_compiled();
#ifdef PYOPD_CUDA_ARCHS
    d["cuda_archs"] = std::string(PYOPD_CUDA_ARCHS);
#else
    d["cuda_archs"] = std::string();
#endif
#ifdef PYOPD_WITH_OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["cpu_isa"] = std::string(cpu_isa_in_use());
    d["cpu_isa_compiled"] = std::string(cpu_isa_compiled());
    return d;
  });
  m.def("cuda_device_count", []() -> int {
#ifdef PYOPD_WITH_CUDA
    return cuda_device_count();
#else
    return 0;
#endif
  });
  m.def(
      "cuda_status",
      []() -> py::tuple {
#ifdef PYOPD_WITH_CUDA
        const CudaStatus st = cuda_status();
        return py::make_tuple(st.available, st.reason, st.driver_version, st.runtime_version);
#else
        return py::make_tuple(false,
                              std::string("this build of pyopd has no CUDA kernels (built without "
                                          "nvcc); reinstall with PYOPD_CUDA=ON"),
                              0, 0);
#endif
      },
      "(available, reason, driver_version, runtime_version): whether the CUDA kernels can run "
      "here and, if not, why. Versions are CUDA versions as 1000 * major + 10 * minor, 0 if none.");

  // ---- vocabulary statistics (token_stats, reverse_kl) ----------------------
  py::enum_<DType>(m, "DType")
      .value("float32", DType::kFloat32)
      .value("bfloat16", DType::kBFloat16)
      .value("float16", DType::kFloat16)
      .value("float64", DType::kFloat64);

  // The inputs, shared by both passes, are fields of the base class.
  auto in = py::class_<VocabStatsInputs>(m, "VocabStatsInputs");
  PYOPD_PTR_FIELD(in, VocabStatsInputs, student);
  in.def_readwrite("student_dtype", &VocabStatsInputs::student_dtype)
      .def_readwrite("student_row_stride", &VocabStatsInputs::student_row_stride);
  PYOPD_PTR_FIELD(in, VocabStatsInputs, teacher);
  in.def_readwrite("teacher_dtype", &VocabStatsInputs::teacher_dtype)
      .def_readwrite("teacher_row_stride", &VocabStatsInputs::teacher_row_stride);
  PYOPD_PTR_FIELD(in, VocabStatsInputs, tokens);
  PYOPD_PTR_FIELD(in, VocabStatsInputs, mask);
  in.def_readwrite("n_rows", &VocabStatsInputs::n_rows)
      .def_readwrite("vocab", &VocabStatsInputs::vocab)
      .def_readwrite("teacher_vocab", &VocabStatsInputs::teacher_vocab)
      .def_readwrite("inv_temperature", &VocabStatsInputs::inv_temperature);

  auto fwd = py::class_<VocabStatsFwdParams, VocabStatsInputs>(m, "VocabStatsFwdParams").def(py::init<>());
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, kl);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, student_entropy);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, teacher_entropy);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, student_logprob);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, teacher_logprob);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, student_lse);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, teacher_lse);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, stats);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, token_ok);

  auto bwd = py::class_<VocabStatsBwdParams, VocabStatsInputs>(m, "VocabStatsBwdParams").def(py::init<>());
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, stats);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, kl);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, student_entropy);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, grad_kl);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, grad_logprob);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, grad_entropy);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, grad_lse);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, grad_student);
  bwd.def_readwrite("grad_dtype", &VocabStatsBwdParams::grad_dtype);

  m.def(
      "vocab_stats_fwd",
      [](const VocabStatsFwdParams& p, int device, uintptr_t stream) {
        check_fwd(p);
        (void)stream;
        on_device(
            device, [&]() { return vocab_stats_fwd_cpu(p); },
            PYOPD_CUDA_CALL(vocab_stats_fwd_cuda(p, device, reinterpret_cast<void*>(stream))));
      },
      py::arg("params"), py::arg("device") = -1, py::arg("stream") = 0,
      "Forward of token_stats / reverse_kl. device < 0 is the CPU.");
  m.def(
      "vocab_stats_bwd",
      [](const VocabStatsBwdParams& p, int device, uintptr_t stream) {
        check_bwd(p);
        (void)stream;
        on_device(
            device, [&]() { return vocab_stats_bwd_cpu(p); },
            PYOPD_CUDA_CALL(vocab_stats_bwd_cuda(p, device, reinterpret_cast<void*>(stream))));
      },
      py::arg("params"), py::arg("device") = -1, py::arg("stream") = 0,
      "Backward of token_stats / reverse_kl w.r.t. the student logits.");

  // ---- signals (trajectory_scores, fire_token_weights, group_advantages) ----
  bind_signals(m);
  // ---- end signals -----------------------------------------------------------
}
