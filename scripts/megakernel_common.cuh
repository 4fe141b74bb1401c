// Helpers shared by the persistent-kernel probes (scripts/megakernel_*.cu; issue 7, docs/ROOFLINE.md).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);      \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

// ---- shared-memory barriers and bulk async copies (sm_90) ----
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
// The producer side of a ring of shared-memory slots: wait until the slot is free, record the unit's header for
// the consumers, then bulk-copy the slot (or, with no source, complete it empty: an end marker or a unit without data).
struct RingProducer {
  unsigned char* ring;
  int* hdr;
  uint64_t* full;
  uint64_t* empty;
  int stages, slot_bytes;
  int stage = 0;
  uint32_t parity = 1;  // a fresh barrier counts its (virtual) previous phase as complete
  __device__ void push(int header, const unsigned char* src) {
    mbar_wait(&empty[stage], parity);
    hdr[stage] = header;
    if (src) {
      mbar_expect_tx(&full[stage], slot_bytes);
      bulk_load(ring + static_cast<size_t>(stage) * slot_bytes, src, slot_bytes, &full[stage]);
    } else {
      mbar_arrive(&full[stage]);
    }
    if (++stage == stages) {
      stage = 0;
      parity ^= 1;
    }
  }
};
__device__ __forceinline__ unsigned int load_acquire(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---- tensor cores: y^T (16 weight rows x 8 tokens) += W (16 x 16) x^T (16 x 8) ----
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// index of x[token t][k] (8 tokens) in the packed B-operand layout [k/16][lane][4]: a lane's fragment of one
// 16-wide K tile is 8 contiguous bytes
__host__ __device__ __forceinline__ size_t packed_x_index(int t, int k) {
  const int kt = k / 16, kk = k % 16;
  const int lane = t * 4 + (kk % 8) / 2;
  return (static_cast<size_t>(kt) * 32 + lane) * 4 + (kk / 8) * 2 + kk % 2;
}
// element e (0..7) of `lane`'s A fragment of a 16 x 16 tile is A[row][col] (m16n8k16 order)
__host__ __device__ __forceinline__ int a_frag_row(int lane, int e) { return lane / 4 + 8 * ((e / 2) % 2); }
__host__ __device__ __forceinline__ int a_frag_col(int lane, int e) { return (lane % 4) * 2 + e % 2 + 8 * (e / 4); }

// ---- the GPU: its name, SM count (one persistent CTA each) and the SM clock for spin lengths ----
struct Gpu {
  cudaDeviceProp prop;
  int ctas;
  double cycles_per_us;
};
inline Gpu gpu_info() {
  Gpu g{};
  CK(cudaGetDeviceProperties(&g.prop, 0));
  g.ctas = g.prop.multiProcessorCount;
  int clock_khz = 0;
  CK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  g.cycles_per_us = clock_khz / 1000.0;
  return g;
}

// ---- deterministic fills ----
__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16(scale * (static_cast<float>(h & 0xffffu) / 32768.f - 1.f));
  }
}
__global__ void fill_f32(float* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2246822519u ^ seed;
    h ^= h >> 15;
    h *= 0x2c1b3c6du;
    h ^= h >> 12;
    p[i] = static_cast<float>(h & 0xffffu) / 32768.f - 1.f;
  }
}

// ---- the verify layer without attention, and a naive reference chain for it ----
namespace layer {
constexpr int M = 8;          // token rows of a verify pass
constexpr int H = 4096;       // hidden width
constexpr int QKV = 6144;     // 32 q heads + 2 x 8 kv heads of 128
constexpr int INTER = 12288;  // SwiGLU width
constexpr float EPS = 1e-6f;

struct Weights {  // logical (checkpoint) layouts, row-major [out][in]
  __nv_bfloat16 *qkv, *o, *gate, *up, *down;
};
inline Weights alloc_weights() {
  Weights w{};
  CK(cudaMalloc(&w.qkv, static_cast<size_t>(QKV) * H * 2));
  CK(cudaMalloc(&w.o, static_cast<size_t>(H) * H * 2));
  CK(cudaMalloc(&w.gate, static_cast<size_t>(INTER) * H * 2));
  CK(cudaMalloc(&w.up, static_cast<size_t>(INTER) * H * 2));
  CK(cudaMalloc(&w.down, static_cast<size_t>(H) * INTER * 2));
  return w;
}
inline void fill_weights(const Weights& w, int layer_index) {
  const uint32_t seed = 1000u + 16u * layer_index;
  const float sh = std::sqrt(3.f / H), si = std::sqrt(3.f / INTER);
  fill_bf16<<<1024, 256>>>(w.qkv, static_cast<size_t>(QKV) * H, seed + 0, sh);
  fill_bf16<<<1024, 256>>>(w.o, static_cast<size_t>(H) * H, seed + 1, sh);
  fill_bf16<<<1024, 256>>>(w.gate, static_cast<size_t>(INTER) * H, seed + 2, sh);
  fill_bf16<<<1024, 256>>>(w.up, static_cast<size_t>(INTER) * H, seed + 3, sh);
  fill_bf16<<<1024, 256>>>(w.down, static_cast<size_t>(H) * INTER, seed + 4, si);
}

__global__ void ref_rms(const float* r, __nv_bfloat16* out) {  // one block of 256 per token
  __shared__ float part[256];
  const int t = blockIdx.x;
  float ss = 0.f;
  for (int k = threadIdx.x; k < H; k += 256) ss += r[t * H + k] * r[t * H + k];
  part[threadIdx.x] = ss;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  const float inv = rsqrtf(part[0] / H + EPS);
  for (int k = threadIdx.x; k < H; k += 256) out[t * H + k] = __float2bfloat16(r[t * H + k] * inv);
}
__global__ void ref_gemm(const __nv_bfloat16* w, const __nv_bfloat16* x, float* y, int n, int k_dim) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= n) return;
  for (int t = 0; t < M; ++t) {
    float a = 0.f;
    for (int k = 0; k < k_dim; ++k)
      a += __bfloat162float(w[static_cast<size_t>(row) * k_dim + k]) * __bfloat162float(x[t * k_dim + k]);
    y[static_cast<size_t>(t) * n + row] = a;
  }
}
__global__ void ref_q_to_bf16(const float* y, __nv_bfloat16* a) {  // a[t][k] = y[t][k], k < H
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < M * H) a[i] = __float2bfloat16(y[(i / H) * QKV + i % H]);
}
__global__ void ref_add(const float* x, const float* y, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < M * H) out[i] = x[i] + y[i];
}
__global__ void ref_swiglu(const float* g, const float* u, __nv_bfloat16* s) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < M * INTER) s[i] = __float2bfloat16(g[i] / (1.f + __expf(-g[i])) * u[i]);
}

// x (fp32 [M][H], device) through `n` layers of the reference chain; the result is copied to `out` (host)
inline void reference_chain(const Weights* w, int n, const float* x, float* out) {
  float *r0, *r1, *yq, *yo, *yg, *yu, *yd;
  __nv_bfloat16 *xn, *ab, *sb;
  CK(cudaMalloc(&r0, M * H * 4));
  CK(cudaMalloc(&r1, M * H * 4));
  CK(cudaMalloc(&yq, M * QKV * 4));
  CK(cudaMalloc(&yo, M * H * 4));
  CK(cudaMalloc(&yg, M * INTER * 4));
  CK(cudaMalloc(&yu, M * INTER * 4));
  CK(cudaMalloc(&yd, M * H * 4));
  CK(cudaMalloc(&xn, M * H * 2));
  CK(cudaMalloc(&ab, M * H * 2));
  CK(cudaMalloc(&sb, M * INTER * 2));
  CK(cudaMemcpy(r0, x, M * H * 4, cudaMemcpyDeviceToDevice));
  for (int l = 0; l < n; ++l) {
    ref_rms<<<M, 256>>>(r0, xn);
    ref_gemm<<<(QKV + 127) / 128, 128>>>(w[l].qkv, xn, yq, QKV, H);
    ref_q_to_bf16<<<(M * H + 255) / 256, 256>>>(yq, ab);
    ref_gemm<<<(H + 127) / 128, 128>>>(w[l].o, ab, yo, H, H);
    ref_add<<<(M * H + 255) / 256, 256>>>(r0, yo, r1);
    ref_rms<<<M, 256>>>(r1, xn);
    ref_gemm<<<(INTER + 127) / 128, 128>>>(w[l].gate, xn, yg, INTER, H);
    ref_gemm<<<(INTER + 127) / 128, 128>>>(w[l].up, xn, yu, INTER, H);
    ref_swiglu<<<(M * INTER + 255) / 256, 256>>>(yg, yu, sb);
    ref_gemm<<<(H + 127) / 128, 128>>>(w[l].down, sb, yd, H, INTER);
    ref_add<<<(M * H + 255) / 256, 256>>>(r1, yd, r0);
  }
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(out, r0, M * H * 4, cudaMemcpyDeviceToHost));
  for (void* p : {static_cast<void*>(r0), static_cast<void*>(r1), static_cast<void*>(yq), static_cast<void*>(yo),
                  static_cast<void*>(yg), static_cast<void*>(yu), static_cast<void*>(yd), static_cast<void*>(xn),
                  static_cast<void*>(ab), static_cast<void*>(sb)})
    CK(cudaFree(p));
}
}  // namespace layer
