/*
 * fk_cuda_common.cuh -- host/device helpers shared by the CUDA back end (csrc/cuda/ (the .cu files)).
 *
 * Torch-free on purpose: CUDA runtime + CUB only. Everything here is internal to the _cuda
 * module (hidden visibility); the public surface is csrc/include/fedrac_kernels.h.
 */
#ifndef FK_CUDA_COMMON_CUH
#define FK_CUDA_COMMON_CUH

#ifdef FK_HOST_EMU
#include "fk_host_emu.cuh"
#else
#include <cuda_runtime.h>
#endif
#include <stddef.h>
#include <stdint.h>

#include <utility>

#include "fedrac_kernels.h"

/* Dynamic shared memory of a kernel (a per-launch host buffer in the host emulation). */
#ifdef FK_HOST_EMU
#define FK_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(fk_emu_dynamic_smem())
#else
#define FK_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

namespace fk {

/* Every kernel launch of the back end goes through here: kernel<<<grid, block, smem, s>>>(args),
 * or, in the host emulation (tests), the same kernel run by host threads. */
template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                   Args&&... args) {
#ifdef FK_HOST_EMU
  (void)s;
  fk_emu_launch(grid, block, smem, [&] { kernel(static_cast<KArgs>(args)...); });
#else
  kernel<<<grid, block, smem, s>>>(std::forward<Args>(args)...);
#endif
}

/* ---- error reporting (thread-local message, see fk_last_error) ---------------------------- */

/* printf-style; stores the message for fk_last_error() and returns `code`. */
int fail(int code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Records "<what>: <cudaGetErrorString(e)>" and returns FK_ECUDA (FK_ENOMEM for out of memory). */
int cuda_fail(cudaError_t e, const char* what);

/* Call right after a launch: FK_OK, or FK_ECUDA with the launch error. */
int check_launch(const char* what);

/* Clears a stale (non-sticky) error left in this runtime by an earlier call, then makes the
 * stream's device current for this runtime (the module links cudart statically, so its notion of
 * the current device is its own, independent of torch's). stream may be NULL (legacy default
 * stream): the current device is kept. */
int enter(void* stream, const char* what);

/* Multiprocessor count of the current device (cached per device). */
int sm_count();

/* Whether the stream is being captured into a CUDA graph (then no host synchronisation). */
bool stream_capturing(cudaStream_t s);

/* Stream-ordered temporary device memory: cudaMallocAsync/cudaFreeAsync where memory pools are
 * supported (no synchronisation, capturable), else cudaMalloc / synchronise + cudaFree. */
class TempBuffer {
 public:
  TempBuffer() = default;
  TempBuffer(const TempBuffer&) = delete;
  TempBuffer& operator=(const TempBuffer&) = delete;
  ~TempBuffer();
  int alloc(size_t bytes, cudaStream_t s, const char* what);
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool async_ = false;
};

/* ---- small arithmetic helpers ------------------------------------------------------------- */

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* Alignment class (16, 8, 4, 2 or 1 bytes) of an address. */
__host__ __device__ inline int align_class(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if ((a & 15) == 0) return 16;
  if ((a & 7) == 0) return 8;
  if ((a & 3) == 0) return 4;
  if ((a & 1) == 0) return 2;
  return 1;
}

}  // namespace fk

#define FK_TRY(expr)               \
  do {                             \
    const int fk_rc_ = (expr);     \
    if (fk_rc_ != FK_OK) return fk_rc_; \
  } while (0)

#endif /* FK_CUDA_COMMON_CUH */
