// Multi-task LoRA kernels: the forward grouped-expand epilogue and the backward
// row kernel. Raw CUDA only (no torch headers): the ATen glue that runs the
// GEMMs on cuBLAS and calls these launchers is lora_bind.cpp.
//
// Both kernels work on the parts of the op that cuBLAS would otherwise do as
// G separate, memory-bound passes over (M, N) arrays. The rank dimension is
// small, so the math runs on CUDA cores with fp32 accumulation for every
// element type, and the win is in touching each (M, N) element once.
#include "lora.h"

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.cuh"

namespace fastdense {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Forward tiling. A block owns a BM x 128 tile of (M, N): warp w owns rows
// w*TM .. w*TM+TM-1, lane l owns columns l, l+32, l+64, l+96 of the tile, so
// every load of base and store of out is 32 consecutive elements per warp.
// The rank dimension of one adapter is walked in chunks of kFwdBK staged in
// shared memory (as float): hs[BM][kFwdBK] is read with a warp-uniform row
// (broadcast), bs[128][kFwdBK + 4] by 32 different rows whose stride of 20
// floats puts the 8 lanes of each 128-bit load phase in distinct banks.
constexpr int kFwdTN = 4;
constexpr int kFwdBN = 32 * kFwdTN;
constexpr int kFwdBK = 16;
constexpr int kFwdLdB = kFwdBK + 4;

// Backward tiling. A block owns kBwdBM rows of (M, N) and walks its slice of N
// in chunks of kBwdBN columns. Per chunk it stages all G gradient tiles
// (each element read from global memory once; their sum is grad_base) and
// the chunk's kBwdBN rows of lora_b in shared memory. dh for the block's rows
// lives in registers: warp w owns rows w*4 .. w*4+3, lane l owns the
// 4-column groups l, l+32, ... of the *padded* rank space, in which every
// adapter starts at a multiple of 4 so that one group never straddles two
// adapters (one float4 read of the right gradient tile serves all 4 columns).
constexpr int kBwdTM = 4;
constexpr int kBwdBM = kWarps * kBwdTM;
constexpr int kBwdBN = 16;
// +4 floats between tiles: lanes reading different adapters' tiles at the
// same (row, col) would otherwise hit the same banks.
constexpr int kBwdTileStride = kBwdBM * kBwdBN + 4;
// Each N-slice of the split backward is at least this many chunks long, so
// that restaging lora_b per chunk and the partial-sum pass stay cheap.
constexpr int kBwdMinChunksPerSplit = 8;

struct Segments {
  int count;                             // G
  int off[kLoraMaxAdapters + 1];         // first column of adapter a in h / lora_b
  int poff[kLoraMaxAdapters + 1];        // same in the padded rank space
  float scale[kLoraMaxAdapters];
};

__device__ __forceinline__ float4 lds4(const float* p) { return *reinterpret_cast<const float4*>(p); }

__device__ __forceinline__ float comp(const float4& v, int e) {
  return e == 0 ? v.x : (e == 1 ? v.y : (e == 2 ? v.z : v.w));
}

// ----------------------------------------------------------------------------- forward

template <typename T, int TM>
__global__ void __launch_bounds__(kThreads)
mt_lora_fwd_expand_kernel(const T* __restrict__ base, const T* __restrict__ h, const T* __restrict__ lora_b,
                          T* __restrict__ out, int M, int N, int R, Segments seg, bool shared_in_tasks) {
  constexpr int BM = kWarps * TM;
  __shared__ __align__(16) float hs[BM * kFwdBK];
  __shared__ __align__(16) float bs[kFwdBN * kFwdLdB];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int m0 = blockIdx.x * BM;
  const int n0 = blockIdx.y * kFwdBN;
  const int row0 = m0 + warp * TM;

  // base, and in 'matrixv2' base + the shared LoRA once adapter 0 is done:
  // what every remaining output adds its own LoRA term to.
  float rest[TM][kFwdTN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < kFwdTN; ++j) {
      const int m = row0 + i, n = n0 + lane + 32 * j;
      rest[i][j] = (m < M && n < N) ? Elem<T>::load(base[static_cast<int64_t>(m) * N + n]) : 0.f;
    }
  }

  for (int a = 0; a < seg.count; ++a) {
    float acc[TM][kFwdTN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < kFwdTN; ++j) acc[i][j] = 0.f;

    const int k_end = seg.off[a + 1];
    for (int k0 = seg.off[a]; k0 < k_end; k0 += kFwdBK) {
      const int kc = min(kFwdBK, k_end - k0);
      __syncthreads();  // the previous chunk's readers are done with hs / bs
      // Columns past this adapter's segment are zero-filled, so the float4
      // steps below may run up to kc rounded up to 4.
      for (int l = threadIdx.x; l < BM * kFwdBK; l += kThreads) {
        const int mm = l / kFwdBK, kk = l % kFwdBK, m = m0 + mm;
        hs[l] = (m < M && kk < kc) ? Elem<T>::load(h[static_cast<int64_t>(m) * R + k0 + kk]) : 0.f;
      }
      for (int l = threadIdx.x; l < kFwdBN * kFwdBK; l += kThreads) {
        const int nn = l / kFwdBK, kk = l % kFwdBK, n = n0 + nn;
        bs[nn * kFwdLdB + kk] =
            (n < N && kk < kc) ? Elem<T>::load(lora_b[static_cast<int64_t>(n) * R + k0 + kk]) : 0.f;
      }
      __syncthreads();

      for (int k = 0; k < kc; k += 4) {
        float4 hv[TM], bv[kFwdTN];
#pragma unroll
        for (int i = 0; i < TM; ++i) hv[i] = lds4(&hs[(warp * TM + i) * kFwdBK + k]);
#pragma unroll
        for (int j = 0; j < kFwdTN; ++j) bv[j] = lds4(&bs[(lane + 32 * j) * kFwdLdB + k]);
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int j = 0; j < kFwdTN; ++j) {
            float s = acc[i][j];
            s = fmaf(hv[i].x, bv[j].x, s);
            s = fmaf(hv[i].y, bv[j].y, s);
            s = fmaf(hv[i].z, bv[j].z, s);
            s = fmaf(hv[i].w, bv[j].w, s);
            acc[i][j] = s;
          }
        }
      }
    }

    const float scale = seg.scale[a];
    T* out_a = out + static_cast<int64_t>(a) * M * N;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < kFwdTN; ++j) {
        const int m = row0 + i, n = n0 + lane + 32 * j;
        if (m < M && n < N) out_a[static_cast<int64_t>(m) * N + n] = Elem<T>::store(fmaf(scale, acc[i][j], rest[i][j]));
      }
    }
    if (a == 0 && shared_in_tasks) {
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < kFwdTN; ++j) rest[i][j] = fmaf(scale, acc[i][j], rest[i][j]);
    }
  }
}

// ----------------------------------------------------------------------------- backward

// Adapter owning padded column pc (< poff[G]).
__device__ __forceinline__ int padded_adapter(int pc, const Segments& seg) {
  int a = 0;
  while (pc >= seg.poff[a + 1]) ++a;
  return a;
}

// Shared memory, in floats unless noted:
//   ds    G tiles of kBwdBM x kBwdBN (stride kBwdTileStride): the gradient
//         chunk of every output; tile 0 is replaced by grad_base in 'matrixv2'
//   bs    kBwdBN x Rp: the chunk's rows of lora_b in padded columns, pad = 0
//   pcol  R ints: padded column of each real column
// QK = number of 4-column groups per lane, padded-rank capacity 128 * QK.
template <typename T, int QK>
__global__ void __launch_bounds__(kThreads)
mt_lora_bwd_rows_kernel(const T* __restrict__ grad, const T* __restrict__ lora_b, T* __restrict__ grad_base,
                        T* __restrict__ dh, float* __restrict__ dh_partial, int M, int N, int R,
                        int n_per_split, Segments seg, bool shared_in_tasks) {
  extern __shared__ __align__(16) float smem[];
  const int G = seg.count;
  const int Rp = seg.poff[G];
  float* ds = smem;
  float* bs = ds + G * kBwdTileStride;
  int* pcol = reinterpret_cast<int*>(bs + kBwdBN * Rp);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int m0 = blockIdx.x * kBwdBM;
  const int n_begin = blockIdx.y * n_per_split;
  const int n_end = min(N, n_begin + n_per_split);
  const int64_t MN = static_cast<int64_t>(M) * N;

  for (int k = tid; k < R; k += kThreads) {
    int a = 0;
    while (k >= seg.off[a + 1]) ++a;
    pcol[k] = k + seg.poff[a] - seg.off[a];
  }
  // Pad columns are never written again, so they stay zero for every chunk.
  for (int l = tid; l < kBwdBN * Rp; l += kThreads) bs[l] = 0.f;

  // Offset of the gradient tile each of this lane's column groups reads, -1
  // for groups past the padded rank. Only this stays live through the main
  // loop; the rest of a group's bookkeeping is recomputed for the final store.
  int tile[QK];
#pragma unroll
  for (int q = 0; q < QK; ++q) {
    const int pc = 4 * (lane + 32 * q);
    tile[q] = pc < Rp ? padded_adapter(pc, seg) * kBwdTileStride : -1;
  }

  float acc[kBwdTM][QK][4];
#pragma unroll
  for (int i = 0; i < kBwdTM; ++i)
#pragma unroll
    for (int q = 0; q < QK; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][q][e] = 0.f;

  __syncthreads();  // pcol and the zeroed bs are visible to every thread

  for (int n0 = n_begin; n0 < n_end; n0 += kBwdBN) {
    // Each (row, col) of the chunk is owned by one thread, which reads it from
    // all G gradients, keeps the sum in a register and writes grad_base.
    for (int l = tid; l < kBwdBM * kBwdBN; l += kThreads) {
      const int mm = l / kBwdBN, nn = l % kBwdBN;
      const int m = m0 + mm, n = n0 + nn;
      const bool ok = m < M && n < n_end;
      const int64_t idx = static_cast<int64_t>(m) * N + n;
      float sum = 0.f;
      for (int g = 0; g < G; ++g) {
        const float v = ok ? Elem<T>::load(grad[g * MN + idx]) : 0.f;
        ds[g * kBwdTileStride + l] = v;
        sum += v;
      }
      if (ok && grad_base != nullptr) grad_base[idx] = Elem<T>::store(sum);
      if (shared_in_tasks) ds[l] = sum;
    }
    // The chunk's rows of lora_b are one contiguous run of kBwdBN * R elements.
    for (int l = tid; l < kBwdBN * R; l += kThreads) {
      const int nn = l / R, k = l - nn * R;
      const int n = n0 + nn;
      bs[nn * Rp + pcol[k]] = n < n_end ? Elem<T>::load(lora_b[static_cast<int64_t>(n) * R + k]) : 0.f;
    }
    __syncthreads();

#pragma unroll
    for (int q = 0; q < QK; ++q) {
      if (tile[q] < 0) continue;
      const float* dq = ds + tile[q] + warp * kBwdTM * kBwdBN;
      const float* bq = bs + 4 * (lane + 32 * q);
      for (int nn = 0; nn < kBwdBN; nn += 4) {
        float4 d[kBwdTM];
#pragma unroll
        for (int i = 0; i < kBwdTM; ++i) d[i] = lds4(dq + i * kBwdBN + nn);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float4 b = lds4(bq + (nn + e) * Rp);
#pragma unroll
          for (int i = 0; i < kBwdTM; ++i) {
            const float de = comp(d[i], e);
            acc[i][q][0] = fmaf(de, b.x, acc[i][q][0]);
            acc[i][q][1] = fmaf(de, b.y, acc[i][q][1]);
            acc[i][q][2] = fmaf(de, b.z, acc[i][q][2]);
            acc[i][q][3] = fmaf(de, b.w, acc[i][q][3]);
          }
        }
      }
    }
    __syncthreads();  // ds / bs are restaged by the next chunk
  }

#pragma unroll
  for (int q = 0; q < QK; ++q) {
    if (tile[q] < 0) continue;
    const int pc = 4 * (lane + 32 * q);
    const int a = padded_adapter(pc, seg);
    // pc - poff[a] is a multiple of 4 below round_up(rank_a, 4), so the group
    // holds 1 to 4 real columns starting at col.
    const int col = seg.off[a] + (pc - seg.poff[a]);
    const int width = min(4, seg.off[a + 1] - col);
    const float scale = seg.scale[a];
#pragma unroll
    for (int i = 0; i < kBwdTM; ++i) {
      const int m = m0 + warp * kBwdTM + i;
      if (m >= M) continue;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (e >= width) continue;
        const float v = scale * acc[i][q][e];
        const int64_t at = static_cast<int64_t>(m) * R + col + e;
        if (dh_partial != nullptr)
          dh_partial[static_cast<int64_t>(blockIdx.y) * M * R + at] = v;
        else
          dh[at] = Elem<T>::store(v);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
mt_lora_sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ dh, int64_t count, int splits) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = 0.f;
    for (int p = 0; p < splits; ++p) s += partial[p * count + i];
    dh[i] = Elem<T>::store(s);
  }
}

// ----------------------------------------------------------------------------- host side

bool make_segments(const int64_t* ranks, const double* scales, int num_adapters, Segments* seg) {
  if (ranks == nullptr || scales == nullptr || num_adapters < 1 || num_adapters > kLoraMaxAdapters) return false;
  seg->count = num_adapters;
  int64_t off = 0, poff = 0;
  seg->off[0] = 0;
  seg->poff[0] = 0;
  for (int a = 0; a < num_adapters; ++a) {
    if (ranks[a] < 1) return false;
    off += ranks[a];
    poff += ceil_div(ranks[a], 4) * 4;
    if (poff > std::numeric_limits<int>::max()) return false;
    seg->off[a + 1] = static_cast<int>(off);
    seg->poff[a + 1] = static_cast<int>(poff);
    seg->scale[a] = static_cast<float>(scales[a]);
  }
  return true;
}

int bwd_chunks_per_split(int64_t N, int splits) { return static_cast<int>(ceil_div(ceil_div(N, kBwdBN), splits)); }

template <typename T>
cudaError_t launch_fwd(const void* base, const void* h, const void* lora_b, void* out, int M, int N,
                       const Segments& seg, bool shared_in_tasks, int sm_count, cudaStream_t stream) {
  const int R = seg.off[seg.count];
  const int64_t n_blocks = ceil_div(N, kFwdBN);
  if (n_blocks > kMaxGridY) return cudaErrorInvalidValue;
  // Taller tiles reuse each staged lora_b chunk for more rows; shorter ones
  // keep the GPU busy when M is small.
  const bool tall = ceil_div(M, kWarps * 8) * n_blocks >= 2 * static_cast<int64_t>(sm_count);
  const dim3 block(kThreads);
  const T* b = static_cast<const T*>(base);
  const T* hh = static_cast<const T*>(h);
  const T* lb = static_cast<const T*>(lora_b);
  T* o = static_cast<T*>(out);
  if (tall) {
    const dim3 grid(static_cast<unsigned>(ceil_div(M, kWarps * 8)), static_cast<unsigned>(n_blocks));
    mt_lora_fwd_expand_kernel<T, 8><<<grid, block, 0, stream>>>(b, hh, lb, o, M, N, R, seg, shared_in_tasks);
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(M, kWarps * 4)), static_cast<unsigned>(n_blocks));
    mt_lora_fwd_expand_kernel<T, 4><<<grid, block, 0, stream>>>(b, hh, lb, o, M, N, R, seg, shared_in_tasks);
  }
  return cudaGetLastError();
}

template <typename T, int QK>
cudaError_t launch_bwd_qk(const T* grad, const T* lora_b, T* grad_base, T* dh, float* partial, int M, int N,
                          int n_per_split, int splits, const Segments& seg, bool shared_in_tasks,
                          size_t smem, cudaStream_t stream) {
  auto kernel = mt_lora_bwd_rows_kernel<T, QK>;
  if (smem > 48 * 1024) {
    FASTDENSE_CUDA_TRY(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int R = seg.off[seg.count];
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kBwdBM)), static_cast<unsigned>(splits));
  kernel<<<grid, dim3(kThreads), smem, stream>>>(grad, lora_b, grad_base, dh, partial, M, N, R, n_per_split, seg,
                                                 shared_in_tasks);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* grad, const void* lora_b, void* grad_base, void* dh, float* workspace,
                       int splits, int M, int N, const Segments& seg, bool shared_in_tasks, cudaStream_t stream) {
  const int R = seg.off[seg.count];
  const int Rp = seg.poff[seg.count];
  const int chunks = bwd_chunks_per_split(N, splits);
  const int n_per_split = chunks * kBwdBN;
  // Rounding the chunk count up may leave fewer non-empty slices than asked.
  const int used = static_cast<int>(ceil_div(N, n_per_split));
  if (used > kMaxGridY) return cudaErrorInvalidValue;
  float* partial = used > 1 ? workspace : nullptr;
  if (used > 1 && workspace == nullptr) return cudaErrorInvalidValue;

  const T* g = static_cast<const T*>(grad);
  const T* lb = static_cast<const T*>(lora_b);
  T* gb = static_cast<T*>(grad_base);
  T* d = static_cast<T*>(dh);
  const size_t smem = mt_lora_bwd_smem_bytes(seg.count, R, Rp);
  // QK 4-column groups per lane: 32 lanes x 4 x QK padded columns.
  static_assert(kLoraMaxPaddedRank <= 32 * 4 * 4, "the backward kernel's widest instance is QK = 4");
  if (Rp <= 128)
    FASTDENSE_CUDA_TRY(
        launch_bwd_qk<T, 1>(g, lb, gb, d, partial, M, N, n_per_split, used, seg, shared_in_tasks, smem, stream));
  else if (Rp <= 256)
    FASTDENSE_CUDA_TRY(
        launch_bwd_qk<T, 2>(g, lb, gb, d, partial, M, N, n_per_split, used, seg, shared_in_tasks, smem, stream));
  else
    FASTDENSE_CUDA_TRY(
        launch_bwd_qk<T, 4>(g, lb, gb, d, partial, M, N, n_per_split, used, seg, shared_in_tasks, smem, stream));
  if (partial == nullptr) return cudaSuccess;

  const int64_t count = static_cast<int64_t>(M) * R;
  const int64_t blocks = std::min<int64_t>(ceil_div(count, kThreads), kMaxGridY);
  mt_lora_sum_splits_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partial, d, count, used);
  return cudaGetLastError();
}

}  // namespace

int64_t mt_lora_padded_rank(const int64_t* ranks, int num_adapters) {
  int64_t total = 0;
  for (int a = 0; a < num_adapters; ++a) total += ceil_div(ranks[a], 4) * 4;
  return total;
}

int mt_lora_bwd_num_splits(int64_t M, int64_t N, int sm_count) {
  if (M <= 0 || N <= 0) return 1;
  const int64_t m_blocks = ceil_div(M, kBwdBM);
  const int64_t chunks = ceil_div(N, kBwdBN);
  const int64_t want = ceil_div(2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1), m_blocks);
  const int64_t most = std::max<int64_t>(1, chunks / kBwdMinChunksPerSplit);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, most, kMaxGridY}));
  // Report what launch_bwd will really use after rounding the slice length.
  return static_cast<int>(ceil_div(N, bwd_chunks_per_split(N, static_cast<int>(splits)) * int64_t{kBwdBN}));
}

size_t mt_lora_bwd_smem_bytes(int num_adapters, int64_t total_rank, int64_t padded_rank) {
  return (static_cast<size_t>(num_adapters) * kBwdTileStride + static_cast<size_t>(kBwdBN) * padded_rank) *
             sizeof(float) +
         static_cast<size_t>(total_rank) * sizeof(int);
}

cudaError_t mt_lora_fwd_expand(Dtype dtype, const void* base, const void* h, const void* lora_b, void* out,
                               int64_t M, int64_t N, const int64_t* ranks, const double* scales, int num_adapters,
                               bool shared_in_tasks, int sm_count, cudaStream_t stream) {
  Segments seg;
  if (!make_segments(ranks, scales, num_adapters, &seg)) return cudaErrorInvalidValue;
  if (M < 0 || N < 0 || M > kLoraMaxDim || N > kLoraMaxDim) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  const int m = static_cast<int>(M), n = static_cast<int>(N);
  return with_element_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return launch_fwd<T>(base, h, lora_b, out, m, n, seg, shared_in_tasks, sm_count, stream);
  });
}

cudaError_t mt_lora_bwd_rows(Dtype dtype, const void* grad, const void* lora_b, void* grad_base, void* dh,
                             float* workspace, int splits, int64_t M, int64_t N, const int64_t* ranks,
                             const double* scales, int num_adapters, bool shared_in_tasks, cudaStream_t stream) {
  Segments seg;
  if (!make_segments(ranks, scales, num_adapters, &seg)) return cudaErrorInvalidValue;
  if (seg.poff[num_adapters] > kLoraMaxPaddedRank) return cudaErrorInvalidValue;
  if (M < 0 || N < 0 || M > kLoraMaxDim || N > kLoraMaxDim || splits < 1) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int m = static_cast<int>(M), n = static_cast<int>(N);
  return with_element_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    // dh is a sum over an empty N: zero, and all-zero bits are 0.0 in every element type.
    if (n == 0) return cudaMemsetAsync(dh, 0, static_cast<size_t>(m) * seg.off[num_adapters] * sizeof(T), stream);
    return launch_bwd<T>(grad, lora_b, grad_base, dh, workspace, splits, m, n, seg, shared_in_tasks, stream);
  });
}

}  // namespace cuda
}  // namespace fastdense
