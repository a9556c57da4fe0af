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

// Checks shared by forward and backward; `P` is either params struct.
template <typename P>
void check_common(const P& p) {
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
  py::gil_scoped_release nogil;
  raise_if(cuda());
}

// ---- signals bindings (trajectory_scores, fire_token_weights, group_advantages)
void bind_signals(py::module_& m) { (void)m; }
// ---- end signals bindings

}  // namespace

#ifdef PYOPD_WITH_CUDA
#define PYOPD_CUDA_CALL(expr) [&]() -> const char* { return expr; }
#else
#define PYOPD_CUDA_CALL(expr) []() -> const char* { return nullptr; }
#endif

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

  // ---- vocabulary statistics (token_stats, reverse_kl) ----------------------
  py::enum_<DType>(m, "DType")
      .value("float32", DType::kFloat32)
      .value("bfloat16", DType::kBFloat16)
      .value("float16", DType::kFloat16)
      .value("float64", DType::kFloat64);

  auto fwd = py::class_<VocabStatsFwdParams>(m, "VocabStatsFwdParams").def(py::init<>());
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, student);
  fwd.def_readwrite("student_dtype", &VocabStatsFwdParams::student_dtype)
      .def_readwrite("student_row_stride", &VocabStatsFwdParams::student_row_stride);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, teacher);
  fwd.def_readwrite("teacher_dtype", &VocabStatsFwdParams::teacher_dtype)
      .def_readwrite("teacher_row_stride", &VocabStatsFwdParams::teacher_row_stride);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, tokens);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, mask);
  fwd.def_readwrite("n_rows", &VocabStatsFwdParams::n_rows)
      .def_readwrite("vocab", &VocabStatsFwdParams::vocab)
      .def_readwrite("teacher_vocab", &VocabStatsFwdParams::teacher_vocab)
      .def_readwrite("inv_temperature", &VocabStatsFwdParams::inv_temperature);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, kl);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, student_entropy);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, teacher_entropy);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, student_logprob);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, teacher_logprob);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, student_lse);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, teacher_lse);
  PYOPD_PTR_FIELD(fwd, VocabStatsFwdParams, stats);

  auto bwd = py::class_<VocabStatsBwdParams>(m, "VocabStatsBwdParams").def(py::init<>());
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, student);
  bwd.def_readwrite("student_dtype", &VocabStatsBwdParams::student_dtype)
      .def_readwrite("student_row_stride", &VocabStatsBwdParams::student_row_stride);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, teacher);
  bwd.def_readwrite("teacher_dtype", &VocabStatsBwdParams::teacher_dtype)
      .def_readwrite("teacher_row_stride", &VocabStatsBwdParams::teacher_row_stride);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, tokens);
  PYOPD_PTR_FIELD(bwd, VocabStatsBwdParams, mask);
  bwd.def_readwrite("n_rows", &VocabStatsBwdParams::n_rows)
      .def_readwrite("vocab", &VocabStatsBwdParams::vocab)
      .def_readwrite("teacher_vocab", &VocabStatsBwdParams::teacher_vocab)
      .def_readwrite("inv_temperature", &VocabStatsBwdParams::inv_temperature);
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
