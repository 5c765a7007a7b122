/*
 * fk_cuda_extra.cuh -- module-internal helpers of the CUDA back end, used by the pybind11 binding
 * (csrc/bind/cuda_module.cpp). Plain C declarations (no CUDA syntax), so a .cpp may include it.
 * Not part of the public ABI in csrc/include/fedrac_kernels.h.
 */
#ifndef FK_CUDA_EXTRA_CUH
#define FK_CUDA_EXTRA_CUH

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Device count, runtime version and driver version (0 when no driver is installed). Returns FK_OK,
 * or FK_ECUDA with the reason (e.g. no driver, no device) in fk_last_error(). Never launches. */
int fk_cuda_runtime_info(int* device_count, int* runtime_version, int* driver_version);

/* FK_OK when this build has a kernel image that runs on `device` (sm_90 SASS / compute_90 PTX),
 * else FK_ECUDA with the reason. Writes the compute capability. Makes `device` current for this
 * module's runtime (initialising its primary context, shared with torch). */
int fk_cuda_device_check(int device, int* cc_major, int* cc_minor);

/* Makes `device` current for this module's (statically linked) runtime. */
int fk_cuda_set_device(int device);

/* Comma-separated list of the architectures this module was compiled for (e.g. "900"). */
const char* fk_cuda_built_archs(void);

#ifdef __cplusplus
}
#endif
#endif /* FK_CUDA_EXTRA_CUH */
