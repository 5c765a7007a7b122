/*
 * common.cu -- error handling, device selection and temporary memory for the CUDA back end.
 */
#include <stdarg.h>
#include <stdio.h>

#include <string>

#include "fk_cuda_common.cuh"
#include "fk_cuda_extra.cuh"

namespace fk {

namespace {
thread_local std::string g_last_error;

constexpr int kMaxDevices = 64;
int g_sm_count[kMaxDevices] = {0};  // benign race: every writer stores the same value
int g_pools[kMaxDevices] = {0};     // 0 unknown, 1 memory pools supported, 2 not supported
}  // namespace

int fail(int code, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  g_last_error.assign(buf);
  return code;
}

int cuda_fail(cudaError_t e, const char* what) {
  const int code = (e == cudaErrorMemoryAllocation) ? FK_ENOMEM : FK_ECUDA;
  return fail(code, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

int check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_fail(e, what);
  return FK_OK;
}

int enter(void* stream, const char* what) {
  (void)cudaGetLastError();  // drop a stale, non-sticky error of an earlier call
  if (stream == nullptr) return FK_OK;
  int dev = -1;
  cudaError_t e = cudaStreamGetDevice(static_cast<cudaStream_t>(stream), &dev);
  if (e != cudaSuccess) return cuda_fail(e, what);
  int cur = -1;
  e = cudaGetDevice(&cur);
  if (e != cudaSuccess) return cuda_fail(e, what);
  if (cur != dev) {
    e = cudaSetDevice(dev);
    if (e != cudaSuccess) return cuda_fail(e, what);
  }
  return FK_OK;
}

int sm_count() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 132;
  if (dev < kMaxDevices && g_sm_count[dev] > 0) return g_sm_count[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 132;
  }
  if (dev < kMaxDevices) g_sm_count[dev] = n;
  return n;
}

bool stream_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &st) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // be conservative: never synchronise when unsure
  }
  return st != cudaStreamCaptureStatusNone;
}

static bool pools_supported() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev >= 0 && dev < kMaxDevices && g_pools[dev] != 0) return g_pools[dev] == 1;
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMemoryPoolsSupported, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    v = 0;
  }
  if (dev >= 0 && dev < kMaxDevices) g_pools[dev] = v ? 1 : 2;
  return v != 0;
}

TempBuffer::~TempBuffer() {
  if (ptr_ == nullptr) return;
  if (async_) {
    (void)cudaFreeAsync(ptr_, stream_);
  } else {
    (void)cudaStreamSynchronize(stream_);
    (void)cudaFree(ptr_);
  }
  ptr_ = nullptr;
}

int TempBuffer::alloc(size_t bytes, cudaStream_t s, const char* what) {
  stream_ = s;
  if (bytes == 0) bytes = 16;
  cudaError_t e;
  if (pools_supported()) {
    async_ = true;
    e = cudaMallocAsync(&ptr_, bytes, s);
  } else {
    async_ = false;
    e = cudaMalloc(&ptr_, bytes);
  }
  if (e != cudaSuccess) {
    ptr_ = nullptr;
    return cuda_fail(e, what);
  }
  return FK_OK;
}

/* A trivial kernel whose attributes tell whether this build has an image for the device. */
__global__ void probe_kernel(int* p) {
  if (p != nullptr) *p = 0;
}

}  // namespace fk

extern "C" {

const char* fk_last_error(void) { return fk::g_last_error.c_str(); }

int fk_cuda_runtime_info(int* device_count, int* runtime_version, int* driver_version) {
  int rt = 0, drv = 0, n = 0;
  (void)cudaRuntimeGetVersion(&rt);
  (void)cudaDriverGetVersion(&drv);  // 0 when no driver is installed
  if (runtime_version) *runtime_version = rt;
  if (driver_version) *driver_version = drv;
  if (device_count) *device_count = 0;
  if (drv == 0) return fk::fail(FK_ECUDA, "no CUDA driver found (cudaDriverGetVersion returned 0)");
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fk::cuda_fail(e, "cudaGetDeviceCount");
  }
  if (device_count) *device_count = n;
  if (n == 0) return fk::fail(FK_ECUDA, "no CUDA device");
  return FK_OK;
}

int fk_cuda_set_device(int device) {
  (void)cudaGetLastError();
  const cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return fk::cuda_fail(e, "cudaSetDevice");
  return FK_OK;
}

int fk_cuda_device_check(int device, int* cc_major, int* cc_minor) {
  FK_TRY(fk_cuda_set_device(device));
  int ma = 0, mi = 0;
  cudaError_t e = cudaDeviceGetAttribute(&ma, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&mi, cudaDevAttrComputeCapabilityMinor, device);
  if (e != cudaSuccess) return fk::cuda_fail(e, "cudaDeviceGetAttribute");
  if (cc_major) *cc_major = ma;
  if (cc_minor) *cc_minor = mi;
  cudaFuncAttributes attr;
  e = cudaFuncGetAttributes(&attr, fk::probe_kernel);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fk::fail(FK_ECUDA, "no kernel image for device %d (compute capability %d.%d; built for %s): %s",
                    device, ma, mi, fk_cuda_built_archs(), cudaGetErrorString(e));
  }
  return FK_OK;
}

const char* fk_cuda_built_archs(void) {
#if defined(__CUDA_ARCH_LIST__)
#define FK_STR2(x) #x
#define FK_STR(x) FK_STR2(x)
  return FK_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // extern "C"
