// pybind11 module fedrac_kernels._cpu: the fk_cpu_* C ABI, with pointers passed as Python ints.
//
// Aggregation entry points take the fk_accum_args fields as one tuple
//   (K, P, dtype, rows: list[int], weights, g, out, init_num, init_den, acc_num, acc_den, flags)
// where 0 stands for NULL. The GIL is released around every native call. Errors raise ValueError
// (FK_EINVAL), MemoryError (FK_ENOMEM) or RuntimeError, with fk_last_error()'s message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../cpu/fk_cpu_internal.h"
#include "fedrac_kernels.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(int rc) {
  if (rc == FK_OK) return;
  const std::string msg = fk_last_error();
  if (rc == FK_EINVAL) throw py::value_error(msg);
  if (rc == FK_ENOMEM) throw std::bad_alloc();
  throw std::runtime_error(msg);
}

struct ArgsHolder {
  fk_accum_args a{};
  std::vector<const void*> rows;
};

void unpack_args(const py::tuple& t, ArgsHolder& h) {
  if (t.size() != 12)
    throw py::value_error("accum args must be (K, P, dtype, rows, weights, g, out, init_num, init_den, acc_num, acc_den, flags)");
  fk_accum_args& a = h.a;
  a.K = t[0].cast<int64_t>();
  a.P = t[1].cast<int64_t>();
  a.dtype = t[2].cast<int32_t>();
  const std::vector<uintptr_t> rows = t[3].cast<std::vector<uintptr_t>>();
  if ((int64_t)rows.size() != a.K) throw py::value_error("accum args: len(rows) != K");
  h.rows.resize(rows.size());
  for (size_t k = 0; k < rows.size(); ++k) h.rows[k] = ptr<const void>(rows[k]);
  a.rows = h.rows.data();
  a.weights = ptr<const float>(t[4].cast<uintptr_t>());
  a.g = ptr<const float>(t[5].cast<uintptr_t>());
  a.out = ptr<float>(t[6].cast<uintptr_t>());
  a.init_num = ptr<const float>(t[7].cast<uintptr_t>());
  a.init_den = ptr<const float>(t[8].cast<uintptr_t>());
  a.acc_num = ptr<float>(t[9].cast<uintptr_t>());
  a.acc_den = ptr<float>(t[10].cast<uintptr_t>());
  a.flags = ptr<int32_t>(t[11].cast<uintptr_t>());
}

void dense(const py::tuple& args, std::optional<std::vector<uintptr_t>> masks, int nthreads) {
  ArgsHolder h;
  unpack_args(args, h);
  std::vector<const uint8_t*> m;
  if (masks) {
    if ((int64_t)masks->size() != h.a.K) throw py::value_error("masks: length != K");
    for (uintptr_t p : *masks) m.push_back(ptr<const uint8_t>(p));
  }
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = fk_cpu_dense(&h.a, masks ? m.data() : nullptr, nthreads);
  }
  check(rc);
}

void structured(const py::tuple& args, uintptr_t segs, int64_t S, int64_t N, uintptr_t neuron_masks,
                uintptr_t rank, uintptr_t sizes, bool nonzero, int nthreads) {
  ArgsHolder h;
  unpack_args(args, h);
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = fk_cpu_structured(&h.a, ptr<const fk_segment>(segs), S, N, ptr<const uint8_t>(neuron_masks),
                           ptr<const int32_t>(rank), ptr<const int32_t>(sizes), nonzero ? 1 : 0, nthreads);
  }
  check(rc);
}

void compact(const py::tuple& args, uintptr_t segs, int64_t S, int64_t N, uintptr_t inv, uintptr_t seg_off,
             uintptr_t seg_cols, int nthreads) {
  ArgsHolder h;
  unpack_args(args, h);
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = fk_cpu_compact(&h.a, ptr<const fk_segment>(segs), S, N, ptr<const int32_t>(inv),
                        ptr<const int64_t>(seg_off), ptr<const int64_t>(seg_cols), nthreads);
  }
  check(rc);
}

void frequency_update(uintptr_t freq, int32_t freq_dtype, uintptr_t masks, uintptr_t rank, uintptr_t sizes,
                      int64_t K, int64_t N, int nthreads) {
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = fk_cpu_frequency_update(ptr<void>(freq), freq_dtype, ptr<const uint8_t>(masks), ptr<const int32_t>(rank),
                                 ptr<const int32_t>(sizes), K, N, nthreads);
  }
  check(rc);
}

void stable_argsort(uintptr_t keys, int32_t key_dtype, uintptr_t order, int64_t N, int nthreads) {
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = fk_cpu_stable_argsort(ptr<const void>(keys), key_dtype, ptr<int64_t>(order), N, nthreads);
  }
  check(rc);
}

void nested_masks(uintptr_t out, uintptr_t order, uintptr_t sizes, int64_t S, int64_t N, int nthreads) {
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = fk_cpu_nested_masks(ptr<uint8_t>(out), ptr<const int64_t>(order), ptr<const int64_t>(sizes), S, N, nthreads);
  }
  check(rc);
}

int isa_level(const std::string& name) {
  for (int l = 0; l <= 2; ++l)
    if (name == fk_cpu_isa_name(l)) return l;
  throw py::value_error("isa: expected 'base', 'avx2' or 'avx512', got '" + name + "'");
}

std::string set_isa(const std::string& name) {
  const int prev = fk_cpu_set_isa(isa_level(name));
  if (prev < 0)
    throw py::value_error("isa: '" + name + "' is not supported by this CPU (detected '" +
                          fk_cpu_isa_name(fk_cpu_detected_isa()) + "')");
  return fk_cpu_isa_name(prev);
}

py::list supported_isas() {
  py::list out;
  for (int l = 0; l <= fk_cpu_detected_isa(); ++l) out.append(fk_cpu_isa_name(l));
  return out;
}

py::dict build_info() {
  py::dict d;
  d["compiler"] = std::string(
#if defined(__clang__)
      "clang "
#elif defined(__GNUC__)
      "gcc "
#endif
      __VERSION__);
#ifdef _OPENMP
  d["openmp"] = (int)_OPENMP;
#else
  d["openmp"] = 0;
#endif
  d["cplusplus"] = (long)__cplusplus;
  d["isa"] = std::string(fk_cpu_isa_name(fk_cpu_get_isa()));
  d["isa_detected"] = std::string(fk_cpu_isa_name(fk_cpu_detected_isa()));
  d["fp_contract_off"] = (bool)fk_cpu_fp_contract_off();
#ifdef __AVX512F__
  d["baseline_march"] = std::string("avx512");
#elif defined(__AVX2__)
  d["baseline_march"] = std::string("avx2");
#else
  d["baseline_march"] = std::string("default");
#endif
  d["abi_header"] = std::string("fedrac_kernels.h");
  return d;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fedrac_kernels C++/OpenMP back end (fk_cpu_* of csrc/include/fedrac_kernels.h)";
  m.attr("F32") = FK_F32;
  m.attr("BF16") = FK_BF16;
  m.attr("F16") = FK_F16;
  m.attr("KEY_F32") = FK_KEY_F32;
  m.attr("KEY_F64") = FK_KEY_F64;
  m.attr("KEY_I32") = FK_KEY_I32;
  m.attr("KEY_I64") = FK_KEY_I64;
  m.def("dense", &dense, py::arg("args"), py::arg("masks"), py::arg("nthreads") = 0,
        "fk_cpu_dense; masks=None -> non-zero rule, else K uint8/bool row pointers");
  m.def("structured", &structured, py::arg("args"), py::arg("segs"), py::arg("S"), py::arg("N"),
        py::arg("neuron_masks"), py::arg("rank"), py::arg("sizes"), py::arg("nonzero"), py::arg("nthreads") = 0,
        "fk_cpu_structured (neuron_masks, or rank + sizes; the other pointer(s) 0)");
  m.def("compact", &compact, py::arg("args"), py::arg("segs"), py::arg("S"), py::arg("N"), py::arg("inv"),
        py::arg("seg_off"), py::arg("seg_cols"), py::arg("nthreads") = 0, "fk_cpu_compact");
  m.def("frequency_update", &frequency_update, py::arg("freq"), py::arg("freq_dtype"), py::arg("masks"),
        py::arg("rank"), py::arg("sizes"), py::arg("K"), py::arg("N"), py::arg("nthreads") = 0,
        "fk_cpu_frequency_update");
  m.def("stable_argsort", &stable_argsort, py::arg("keys"), py::arg("key_dtype"), py::arg("order"), py::arg("N"),
        py::arg("nthreads") = 0, "fk_cpu_stable_argsort");
  m.def("nested_masks", &nested_masks, py::arg("out"), py::arg("order"), py::arg("sizes"), py::arg("S"),
        py::arg("N"), py::arg("nthreads") = 0, "fk_cpu_nested_masks");
  m.def("build_info", &build_info, "compiler, OpenMP, instruction-set level, FP-contraction self-check");
  m.def("set_isa", &set_isa, py::arg("name"),
        "force the span-kernel level ('base', 'avx2', 'avx512', <= detected); returns the previous one");
  m.def("get_isa", []() { return std::string(fk_cpu_isa_name(fk_cpu_get_isa())); });
  m.def("supported_isas", &supported_isas);
  m.def("set_gate_table_limit", &fk_cpu_set_gate_table_limit, py::arg("bytes"),
        "structured kernel: budget of the per-call gate table (bytes; -1 = just query); returns the previous");
}
