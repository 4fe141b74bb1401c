// Persistent weight-streaming probe for the verify pass (issue 7, docs/ROOFLINE.md "megakernel").
//
//   nvcc -O3 -std=c++17 -arch=sm_90 scripts/megakernel_stream_probe.cu -o /tmp/probe && /tmp/probe [layers]
//
// Question: can ONE persistent kernel per verify pass keep HBM streaming weights through the latency-bound
// phases between a decoder layer's GEMMs (attention ~12 us, norms / stores ~2-3 us each: ~27 us per layer in
// the engine today, docs/bench/ncu_verify_action_h100_session12.txt), by loading the next GEMM's weights into
// shared memory while those phases run? In a chain of kernels the weight stream stops at every boundary.
//
// Stand-in pass: `layers` x 4 GEMMs of 8 token rows, K = 4096, N = 6144 (q|k|v), 4096 (o), 24576 (gate|up),
// 12288 (down; the real one is K = 12288, N = 4096: the same 100.7 MB), i.e. the verify layer's 386 MB.
// One CTA per SM; CTA c owns a contiguous row range of every weight (rows are contiguous in memory), which a
// producer warp streams through a ring of STAGES x 16 KB shared-memory slots with bulk async copies
// (cp.async.bulk + mbarrier transaction counts); 8 consumer warps compute y = x W^T with fp32 FMAs, x held in
// registers (each lane a 16-wide K slice of all 8 rows). Between GEMMs a grid barrier (atomic counter) stands
// for the data dependency, and the consumers then spin for the latency phase's duration (attention after
// q|k|v, norm after o). The producer never waits for either: it runs ahead as far as the ring allows.
//
// Printed per configuration: us per layer, weight TB/s, and the max relative error of layer 0 against a
// naive fp32 reference (compute variant only).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "megakernel_common.cuh"

constexpr int K = 4096;
constexpr int M = 8;
constexpr int ROW_BYTES = K * 2;
constexpr int CHUNK_ROWS = 2;
constexpr int CHUNK_BYTES = CHUNK_ROWS * ROW_BYTES;  // 16 KB per ring slot
constexpr int CONSUMER_WARPS = 8;
constexpr int CONSUMERS = CONSUMER_WARPS * 32;
constexpr int THREADS = CONSUMERS + 32;  // + the producer warp
constexpr int SLICE = K / CONSUMERS;     // 16 K-elements per consumer lane
constexpr int MAX_ROWS_PER_CTA = 192;    // 24576 / 132 = 186.2
constexpr int GEMMS_PER_LAYER = 4;

struct Phase {
  const __nv_bfloat16* w;
  const __nv_bfloat16* x;
  float* y;
  int n;
  int spin_cycles;  // latency phase after this GEMM's barrier (0: none)
  int barrier;      // 1: grid barrier after this GEMM (0: the CTAs run on independently)
};

__device__ unsigned int g_arrived;
__device__ long long g_clock[2];  // CTA 0's SM cycles and global-timer ns over the whole kernel

__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory"); }

// SLICE bf16 values (16-byte vectors) -> fp32: a bf16 is the top half of the float with the same bits
__device__ __forceinline__ void unpack_bf16(const uint4* src, float* dst) {
#pragma unroll
  for (int h = 0; h < SLICE / 8; ++h) {
    const uint4 v = src[h];
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      dst[h * 8 + 2 * j] = __uint_as_float(u[j] << 16);
      dst[h * 8 + 2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
  }
}

__device__ __forceinline__ void row_range(int n, int cta, int ctas, int& r0, int& r1) {
  r0 = static_cast<int>((static_cast<long long>(n) * cta) / ctas);
  r1 = static_cast<int>((static_cast<long long>(n) * (cta + 1)) / ctas);
}

template <int STAGES, bool COMPUTE>
__global__ void __launch_bounds__(THREADS, 1) stream_pass(const Phase* __restrict__ phases, int n_phases) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  float* out = reinterpret_cast<float*>(smem + STAGES * CHUNK_BYTES);  // [MAX_ROWS_PER_CTA][M]
  uint64_t* full = reinterpret_cast<uint64_t*>(out + MAX_ROWS_PER_CTA * M);
  uint64_t* empty = full + STAGES;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int cta = blockIdx.x, ctas = gridDim.x;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CONSUMER_WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  for (int i = tid; i < MAX_ROWS_PER_CTA * M; i += THREADS) out[i] = 0.f;
  long long c0 = clock64(), g0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));
  __syncthreads();

  if (warp == CONSUMER_WARPS) {  // producer: stream every phase's rows, never waiting on the consumers' phases
    if (lane == 0) {
      int stage = 0;
      uint32_t parity = 1;  // a fresh barrier counts its (virtual) previous phase as complete
      for (int p = 0; p < n_phases; ++p) {
        int r0, r1;
        row_range(phases[p].n, cta, ctas, r0, r1);
        const unsigned char* w = reinterpret_cast<const unsigned char*>(phases[p].w);
        for (int r = r0; r < r1; r += CHUNK_ROWS) {
          const int rows = min(CHUNK_ROWS, r1 - r);
          mbar_wait(&empty[stage], parity);
          mbar_expect_tx(&full[stage], rows * ROW_BYTES);
          bulk_load(ring + stage * CHUNK_BYTES, w + static_cast<size_t>(r) * ROW_BYTES, rows * ROW_BYTES, &full[stage]);
          if (++stage == STAGES) {
            stage = 0;
            parity ^= 1;
          }
        }
      }
    }
    return;
  }

  // consumers
  const int k0 = tid * SLICE;  // this lane's K slice, the same for every row and phase
  float xr[M][SLICE];
  int stage = 0;
  uint32_t parity = 0;
  unsigned int barriers = 0;
  for (int p = 0; p < n_phases; ++p) {
    const Phase ph = phases[p];
    if (COMPUTE) {
#pragma unroll
      for (int t = 0; t < M; ++t) {
        unpack_bf16(reinterpret_cast<const uint4*>(ph.x + t * K + k0), xr[t]);
      }
    }
    int r0, r1;
    row_range(ph.n, cta, ctas, r0, r1);
    for (int r = r0; r < r1; r += CHUNK_ROWS) {
      const int rows = min(CHUNK_ROWS, r1 - r);
      mbar_wait(&full[stage], parity);
      if (COMPUTE) {
        for (int rr = 0; rr < rows; ++rr) {
          const uint4* wv = reinterpret_cast<const uint4*>(ring + stage * CHUNK_BYTES + rr * ROW_BYTES + k0 * 2);
          float wf[SLICE];
          unpack_bf16(wv, wf);
          float acc[M];
#pragma unroll
          for (int t = 0; t < M; ++t) {
            float a = 0.f;
#pragma unroll
            for (int e = 0; e < SLICE; ++e) a = fmaf(wf[e], xr[t][e], a);
            acc[t] = a;
          }
#pragma unroll
          for (int off = 16; off > 0; off >>= 1)
#pragma unroll
            for (int t = 0; t < M; ++t) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], off);
          if (lane < M) {
            float mine = acc[0];
#pragma unroll
            for (int t = 1; t < M; ++t)
              if (lane == t) mine = acc[t];
            atomicAdd(&out[(r - r0 + rr) * M + lane], mine);
          }
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[stage]);
      if (++stage == STAGES) {
        stage = 0;
        parity ^= 1;
      }
    }
    consumers_sync();
    if (COMPUTE) {
      for (int i = tid; i < (r1 - r0) * M; i += CONSUMERS) {
        const int row = i / M, t = i % M;
        ph.y[static_cast<size_t>(t) * ph.n + r0 + row] = out[i];
        out[i] = 0.f;
      }
    }
    // the next GEMM depends on every CTA's output: grid barrier, then the latency phase
    if (ph.barrier && tid == 0) {
      ++barriers;
      __threadfence();
      atomicAdd(&g_arrived, 1u);
      const unsigned int target = barriers * ctas;
      unsigned int seen;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(&g_arrived) : "memory");
      } while (seen < target);
    }
    if (ph.barrier) consumers_sync();
    if (ph.spin_cycles > 0) {
      const long long t0 = clock64();
      while (clock64() - t0 < ph.spin_cycles) {
      }
    }
  }
  if (cta == 0 && tid == 0) {
    long long g1;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1));
    g_clock[0] = clock64() - c0;
    g_clock[1] = g1 - g0;
  }
}

__global__ void reference(const __nv_bfloat16* w, const __nv_bfloat16* x, float* y, int n) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= n) return;
  for (int t = 0; t < M; ++t) {
    float a = 0.f;
    for (int k = 0; k < K; ++k) a += __bfloat162float(w[static_cast<size_t>(row) * K + k]) * __bfloat162float(x[t * K + k]);
    y[static_cast<size_t>(t) * n + row] = a;
  }
}

template <int STAGES, bool COMPUTE>
float run(const std::vector<Phase>& host_phases, Phase* dev_phases, int ctas, int reps) {
  const size_t smem = STAGES * CHUNK_BYTES + MAX_ROWS_PER_CTA * M * sizeof(float) + 2 * STAGES * sizeof(uint64_t);
  CK(cudaFuncSetAttribute(stream_pass<STAGES, COMPUTE>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stream_pass<STAGES, COMPUTE>, THREADS, smem));
  if (per_sm < 1) {
    std::printf("does not fit: %zu B shared memory\n", smem);
    return -1.f;
  }
  CK(cudaMemcpy(dev_phases, host_phases.data(), host_phases.size() * sizeof(Phase), cudaMemcpyHostToDevice));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> times;
  const unsigned int zero = 0;
  for (int i = 0; i < reps + 2; ++i) {
    CK(cudaMemcpyToSymbol(g_arrived, &zero, sizeof(zero)));
    CK(cudaEventRecord(a));
    stream_pass<STAGES, COMPUTE><<<ctas, THREADS, smem>>>(dev_phases, static_cast<int>(host_phases.size()));
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    CK(cudaGetLastError());
    float ms = 0.f;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (i >= 2) times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

int main(int argc, char** argv) {
  const int layers = argc > 1 ? std::atoi(argv[1]) : 36;
  const Gpu gpu = gpu_info();
  const cudaDeviceProp& prop = gpu.prop;
  const int ctas = gpu.ctas;
  const double cycles_per_us = gpu.cycles_per_us;
  std::printf("%s, %d SMs, clock attribute %.0f MHz, %d layers x 4 GEMMs (M=8, K=4096)\n", prop.name, ctas,
              cycles_per_us, layers);

  std::vector<__nv_bfloat16*> w(layers * GEMMS_PER_LAYER);
  size_t weight_bytes = 0;
  const int ns[GEMMS_PER_LAYER] = {6144, 4096, 24576, 12288};
  for (int l = 0; l < layers; ++l)
    for (int g = 0; g < GEMMS_PER_LAYER; ++g) {
      const size_t n = static_cast<size_t>(ns[g]) * K;
      CK(cudaMalloc(&w[l * 4 + g], n * 2));
      fill_bf16<<<1024, 256>>>(w[l * 4 + g], n, 1234u + l * 4 + g, 0.02f);
      weight_bytes += n * 2;
    }
  __nv_bfloat16* x;
  CK(cudaMalloc(&x, M * K * 2));
  fill_bf16<<<64, 256>>>(x, M * K, 99u, 1.f);
  std::vector<float*> y(GEMMS_PER_LAYER), yref(GEMMS_PER_LAYER);
  for (int g = 0; g < GEMMS_PER_LAYER; ++g) {
    CK(cudaMalloc(&y[g], static_cast<size_t>(M) * ns[g] * 4));
    CK(cudaMalloc(&yref[g], static_cast<size_t>(M) * ns[g] * 4));
    reference<<<(ns[g] + 127) / 128, 128>>>(w[g], x, yref[g], ns[g]);
  }
  CK(cudaDeviceSynchronize());
  Phase* dev_phases;
  CK(cudaMalloc(&dev_phases, sizeof(Phase) * layers * GEMMS_PER_LAYER));

  auto phases_with = [&](double attn_us, double norm_us, int barrier = 1) {
    std::vector<Phase> ph;
    for (int l = 0; l < layers; ++l)
      for (int g = 0; g < GEMMS_PER_LAYER; ++g) {
        // outputs of layer 0 kept for the check; later layers overwrite their own scratch (same buffers)
        const double spin = g == 0 ? attn_us : (g == 1 ? norm_us : (g == 3 ? norm_us : 0.0));
        ph.push_back({w[l * 4 + g], x, y[g], ns[g], static_cast<int>(spin * cycles_per_us), barrier});
      }
    return ph;
  };
  const double floor_us = weight_bytes / 3.0e12 * 1e6 / layers;
  std::printf("weights %.2f GB; 3.0 TB/s floor %.1f us per layer\n", weight_bytes / 1e9, floor_us);
  std::printf("%-44s %10s %8s %10s\n", "configuration", "us/layer", "TB/s", "rel.err");

  auto check = [&]() {  // the y buffers hold the last layer run: the check runs layer 0 alone
    double worst = 0.0;
    for (int g = 0; g < GEMMS_PER_LAYER; ++g) {
      std::vector<float> a(static_cast<size_t>(M) * ns[g]), b(a.size());
      CK(cudaMemcpy(a.data(), y[g], a.size() * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(b.data(), yref[g], b.size() * 4, cudaMemcpyDeviceToHost));
      double num = 0, den = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
      }
      worst = std::fmax(worst, std::sqrt(num / den));
    }
    return worst;
  };
  auto report = [&](const char* name, float ms, double err) {
    const double us = ms * 1000.0 / layers;
    std::printf("%-44s %10.1f %8.2f %10s\n", name, us, weight_bytes / (ms * 1e-3) / 1e12,
                err < 0 ? "-" : (std::to_string(err).c_str()));
  };

  const int reps = 5;
  // correctness: one layer, compute variant, no spins
  {
    const std::vector<Phase> all = phases_with(0, 0);
    const std::vector<Phase> one(all.begin(), all.begin() + GEMMS_PER_LAYER);
    run<12, true>(one, dev_phases, ctas, 1);
    std::printf("one layer vs fp32 reference: rel. L2 error %.2e\n", check());
  }
  auto clock_mhz = [&]() {
    long long c[2];
    CK(cudaMemcpyFromSymbol(c, g_clock, sizeof(c)));
    return c[1] > 0 ? 1e3 * c[0] / c[1] : 0.0;
  };
  const double spins[][2] = {{0, 0}, {4, 2}, {8, 2}, {12, 3}, {16, 3}};
  for (auto& sp : spins) {
    char name[96];
    std::vector<Phase> ph = phases_with(sp[0], sp[1]);
    std::snprintf(name, sizeof(name), "stream only, 12 x 16 KB, attn %g + norms 2x%g us", sp[0], sp[1]);
    report(name, run<12, false>(ph, dev_phases, ctas, reps), -1);
    std::printf("    (SM clock over the kernel: %.0f MHz)\n", clock_mhz());
    std::snprintf(name, sizeof(name), "stream only,  4 x 16 KB, attn %g + norms 2x%g us", sp[0], sp[1]);
    report(name, run<4, false>(ph, dev_phases, ctas, reps), -1);
    std::snprintf(name, sizeof(name), "stream only,  2 x 16 KB, attn %g + norms 2x%g us", sp[0], sp[1]);
    report(name, run<2, false>(ph, dev_phases, ctas, reps), -1);
    std::snprintf(name, sizeof(name), "fp32 FMA,    12 x 16 KB, attn %g + norms 2x%g us", sp[0], sp[1]);
    report(name, run<12, true>(ph, dev_phases, ctas, reps), -1);
    std::snprintf(name, sizeof(name), "no barriers, 12 x 16 KB, attn %g + norms 2x%g us", sp[0], sp[1]);
    report(name, run<12, false>(phases_with(sp[0], sp[1], 0), dev_phases, ctas, reps), -1);
    std::snprintf(name, sizeof(name), "no barriers,  2 x 16 KB, attn %g + norms 2x%g us", sp[0], sp[1]);
    report(name, run<2, false>(phases_with(sp[0], sp[1], 0), dev_phases, ctas, reps), -1);
  }
  std::printf("latency phases per layer in the engine today (ncu, standalone): attention ~12, norms ~4 each\n");
  return 0;
}
