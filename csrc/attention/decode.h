// The decode regime of the CPU flash attention: few query rows per K/V head against a long
// key sequence (token-by-token generation, speculative decoding, chunked prefill).
//
// There the work is reading K and V, not multiplying: each key row feeds only R = G * Lq
// dot products (the G query heads that share a K/V head, times the Lq query rows), so
//   - the R rows are one tile and every K/V row is read once per group, not once per head;
//   - the products run on register tiles, no BLAS call (whose fixed cost dwarfs a one-row
//     tile): up to 8 query rows x 2-8 keys of dot products, each chunk of a key row loaded
//     (and widened) once for every row of the tile, and an output band of up to 8 rows x
//     128 columns that stays in registers for a whole key block of the PV product (AVX-512
//     intrinsics; smaller at::vec tiles for 16 registers in the avx2 build and for float64);
//   - keys are split into chunks across threads when batch x kv heads alone cannot keep
//     every thread busy (split-K, "flash-decoding"): each chunk writes a partial output,
//     row max and sum, merged in chunk order, so the result does not depend on scheduling;
//   - K/V may be stored in bf16 or fp16 (half the bytes of the bandwidth-bound loop), widened
//     in registers with fp32 accumulation; on AVX512-BF16, bf16 queries and K/V multiply as
//     bf16 pairs (vdpbf16ps, fp32 accumulation) and P is rounded to bf16 for the PV product,
//     as the general bf16 kernel and the GPU flash kernels do;
//   - the value rows of a block are prefetched into L2 while its scores are computed, and the
//     next block's key rows while its values are read, so memory is busy in both halves;
//   - K/V rows are found through a KVRows view: a contiguous (B, Hk, L, D) tensor or a
//     paged pool (num_blocks, Hk, block_size, D) with a block table (vLLM's layout).
// Visibility and masks are those of masking.h (causal, key lengths, boolean or additive
// masks), applied to each row of a key block.
#pragma once

#include <cstdint>

#include "masking.h"

namespace seqkernels::attention {

// Query rows per K/V head up to which flash_attention takes the decode kernel (more rows
// make the tile products worth a GEMM).
constexpr int64_t kDecodeMaxRows = 16;
// Keys per block of the decode loop: the block's scores for every row stay in L1.
constexpr int64_t kDecodeBlock = 256;

// Where the key and value rows of (batch b, kv head hk, position p) live.
template <typename T>
struct KVRows {
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t Hk = 1, D = 1, Dv = 1;
  int64_t rows = 1;                     // L (contiguous) or block_size (paged)
  const int32_t* block_table = nullptr;  // (B, max_blocks) when paged
  int64_t max_blocks = 0;

  int64_t row_index(int64_t b, int64_t hk, int64_t p) const {
    if (block_table == nullptr) return (b * Hk + hk) * rows + p;
    const int64_t block = block_table[b * max_blocks + p / rows];
    return (block * Hk + hk) * rows + p % rows;
  }
  const T* k_row(int64_t b, int64_t hk, int64_t p) const { return k + row_index(b, hk, p) * D; }
  const T* v_row(int64_t b, int64_t hk, int64_t p) const { return v + row_index(b, hk, p) * Dv; }
};

struct DecodeDims {
  int64_t B, H, Hk, G, Lq, D, Dv;
  int64_t Lk;  // keys a chunk split is planned over (the longest sequence)
};

// out[b, h, i] and lse[b, h, i] for every query row; q (B, H, Lq, D) contiguous in T, out
// (B, H, Lq, Dv) in T, lse in A. mk gives the visibility of key j for row i of batch b.
// T is float or double (A = T), or BFloat16 / Half (A = float). Defined in decode_cpu.cpp.
template <typename T, typename A>
void decode_forward(const DecodeDims& d, const Masking<A>& mk, const KVRows<T>& kv, const T* q, A scale, T* out,
                    A* lse);

}  // namespace seqkernels::attention
