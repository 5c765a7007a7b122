// cuda_module.cpp -- pybind11 module fedrac_kernels._cuda over the fk_cuda_* C ABI.
//
// Torch-free: device pointers and the CUDA stream arrive as Python ints (tensor.data_ptr(),
// torch.cuda.current_stream(dev).cuda_stream), so the module builds without torch and serves every
// torch version. Every entry point first makes `device` current for this module's runtime (cudart
// is linked statically, so its current device is independent of torch's), releases the GIL for the
// call, and turns a failure into an exception carrying fk_last_error():
//   FK_EINVAL -> ValueError, FK_ENOMEM -> MemoryError, FK_ECUDA -> RuntimeError.
// Importing never touches the GPU; runtime_info() is safe without a driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../cuda/fk_cuda_extra.cuh"
#include "fedrac_kernels.h"

namespace py = pybind11;

namespace {

void raise_for(int rc, const char* what) {
  if (rc == FK_OK) return;
  std::string msg = std::string(what) + ": " + fk_last_error();
  if (rc == FK_EINVAL) throw py::value_error(msg);
  if (rc == FK_ENOMEM) {
    PyErr_SetString(PyExc_MemoryError, msg.c_str());
    throw py::error_already_set();
  }
  throw std::runtime_error(msg);
}

template <typename T>
T* P(uint64_t v) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(v));
}

void* S(uint64_t stream) { return reinterpret_cast<void*>(static_cast<uintptr_t>(stream)); }

// acc = [K, P, dtype, rows, weights, g, out, init_num, init_den, acc_num, acc_den, flags]
fk_accum_args make_args(const std::vector<int64_t>& acc) {
  if (acc.size() != 12) throw py::value_error("accum args: expected 12 integers");
  fk_accum_args a;
  a.K = acc[0];
  a.P = acc[1];
  a.dtype = static_cast<int32_t>(acc[2]);
  a.rows = P<const void* const>(static_cast<uint64_t>(acc[3]));
  a.weights = P<const float>(static_cast<uint64_t>(acc[4]));
  a.g = P<const float>(static_cast<uint64_t>(acc[5]));
  a.out = P<float>(static_cast<uint64_t>(acc[6]));
  a.init_num = P<const float>(static_cast<uint64_t>(acc[7]));
  a.init_den = P<const float>(static_cast<uint64_t>(acc[8]));
  a.acc_num = P<float>(static_cast<uint64_t>(acc[9]));
  a.acc_den = P<float>(static_cast<uint64_t>(acc[10]));
  a.flags = P<int32_t>(static_cast<uint64_t>(acc[11]));
  return a;
}

// Makes `device` current for this module's runtime, then runs the call (GIL released by caller).
template <typename F>
int on_device(int device, F&& call) {
  const int rc = fk_cuda_set_device(device);
  return rc != FK_OK ? rc : call();
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fedrac_kernels CUDA back end (torch-free; pointers and streams as ints)";

  m.def("built_archs", []() { return std::string(fk_cuda_built_archs()); },
        "Architectures this module was compiled for (nvcc __CUDA_ARCH_LIST__).");

  m.def(
      "runtime_info",
      []() {
        int n = 0, rt = 0, drv = 0;
        const int rc = fk_cuda_runtime_info(&n, &rt, &drv);
        raise_for(rc, "runtime_info");
        return std::make_tuple(n, rt, drv);
      },
      "(device_count, runtime_version, driver_version); raises RuntimeError without a usable driver/GPU.");

  m.def(
      "device_check",
      [](int device) {
        int ma = 0, mi = 0, rc;
        {
          py::gil_scoped_release nogil;
          rc = fk_cuda_device_check(device, &ma, &mi);
        }
        raise_for(rc, "device_check");
        return std::make_tuple(ma, mi);
      },
      py::arg("device"), "Compute capability of `device`; raises RuntimeError if no kernel image runs on it.");

  m.def(
      "dense",
      [](int device, uint64_t stream, const std::vector<int64_t>& acc, uint64_t masks) {
        const fk_accum_args a = make_args(acc);
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = on_device(device, [&] {
            return fk_cuda_dense(&a, P<const uint8_t* const>(masks), S(stream));
          });
        }
        raise_for(rc, "fk_cuda_dense");
      },
      py::arg("device"), py::arg("stream"), py::arg("acc"), py::arg("masks"));

  m.def(
      "structured",
      [](int device, uint64_t stream, const std::vector<int64_t>& acc, uint64_t segs, int64_t S_, int64_t N,
         uint64_t neuron_masks, uint64_t rank, uint64_t sizes, bool nonzero) {
        const fk_accum_args a = make_args(acc);
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = on_device(device, [&] {
            return fk_cuda_structured(&a, P<const fk_segment>(segs), S_, N, P<const uint8_t>(neuron_masks),
                                      P<const int32_t>(rank), P<const int32_t>(sizes), nonzero ? 1 : 0, S(stream));
          });
        }
        raise_for(rc, "fk_cuda_structured");
      },
      py::arg("device"), py::arg("stream"), py::arg("acc"), py::arg("segs"), py::arg("S"), py::arg("N"),
      py::arg("neuron_masks"), py::arg("rank"), py::arg("sizes"), py::arg("nonzero"));

  m.def(
      "compact",
      [](int device, uint64_t stream, const std::vector<int64_t>& acc, uint64_t segs, int64_t S_, int64_t N,
         uint64_t inv, uint64_t seg_off, uint64_t seg_cols) {
        const fk_accum_args a = make_args(acc);
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = on_device(device, [&] {
            return fk_cuda_compact(&a, P<const fk_segment>(segs), S_, N, P<const int32_t>(inv),
                                   P<const int64_t>(seg_off), P<const int64_t>(seg_cols), S(stream));
          });
        }
        raise_for(rc, "fk_cuda_compact");
      },
      py::arg("device"), py::arg("stream"), py::arg("acc"), py::arg("segs"), py::arg("S"), py::arg("N"),
      py::arg("inv"), py::arg("seg_off"), py::arg("seg_cols"));

  m.def(
      "frequency_update",
      [](int device, uint64_t stream, uint64_t freq, int freq_dtype, uint64_t masks, uint64_t rank,
         uint64_t sizes, int64_t K, int64_t N) {
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = on_device(device, [&] {
            return fk_cuda_frequency_update(P<void>(freq), freq_dtype, P<const uint8_t>(masks),
                                            P<const int32_t>(rank), P<const int32_t>(sizes), K, N, S(stream));
          });
        }
        raise_for(rc, "fk_cuda_frequency_update");
      },
      py::arg("device"), py::arg("stream"), py::arg("freq"), py::arg("freq_dtype"), py::arg("masks"),
      py::arg("rank"), py::arg("sizes"), py::arg("K"), py::arg("N"));

  m.def(
      "argsort_workspace",
      [](int device, uint64_t stream, uint64_t keys, int key_dtype, uint64_t order, int64_t N) {
        size_t bytes = 0;
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = on_device(device, [&] {
            return fk_cuda_stable_argsort(P<const void>(keys), key_dtype, P<int64_t>(order), N, nullptr,
                                          &bytes, S(stream));
          });
        }
        raise_for(rc, "fk_cuda_stable_argsort (workspace query)");
        return static_cast<uint64_t>(bytes);
      },
      py::arg("device"), py::arg("stream"), py::arg("keys"), py::arg("key_dtype"), py::arg("order"), py::arg("N"));

  m.def(
      "stable_argsort",
      [](int device, uint64_t stream, uint64_t keys, int key_dtype, uint64_t order, int64_t N, uint64_t workspace,
         uint64_t workspace_bytes) {
        if (workspace == 0) throw py::value_error("stable_argsort: workspace must be a device pointer");
        size_t bytes = static_cast<size_t>(workspace_bytes);
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = on_device(device, [&] {
            return fk_cuda_stable_argsort(P<const void>(keys), key_dtype, P<int64_t>(order), N,
                                          P<void>(workspace), &bytes, S(stream));
          });
        }
        raise_for(rc, "fk_cuda_stable_argsort");
      },
      py::arg("device"), py::arg("stream"), py::arg("keys"), py::arg("key_dtype"), py::arg("order"), py::arg("N"),
      py::arg("workspace"), py::arg("workspace_bytes"));

  m.def(
      "nested_masks",
      [](int device, uint64_t stream, uint64_t out, uint64_t order, uint64_t sizes, int64_t S_, int64_t N) {
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = on_device(device, [&] {
            return fk_cuda_nested_masks(P<uint8_t>(out), P<const int64_t>(order), P<const int64_t>(sizes),
                                        S_, N, S(stream));
          });
        }
        raise_for(rc, "fk_cuda_nested_masks");
      },
      py::arg("device"), py::arg("stream"), py::arg("out"), py::arg("order"), py::arg("sizes"), py::arg("S"),
      py::arg("N"));
}
