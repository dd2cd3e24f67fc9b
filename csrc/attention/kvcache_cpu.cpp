// seqkernels::flash_attention_kvcache on the CPU: append the new keys and values to a KV
// cache in place, then attend the query rows to each sequence's cached keys, with
// flash-attn's semantics (flash_attn_with_kvcache), in this library's (B, H, L, D) layout.
//
//   q (B, H, Lq, D); k, v (B, Hk, Lnew, D / Dv) or absent; cache_seqlens (B,) int32/int64.
//   Contiguous caches: k_cache (B, Hk, Lmax, D), v_cache (B, Hk, Lmax, Dv).
//   Paged caches (block_table (B, max_blocks) int32): pools (num_blocks, Hk, block_size, D),
//   position p of sequence b in block block_table[b, p / block_size] (vLLM's layout).
// Row b of k / v is written at positions cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1;
// query i of sequence b then sees keys j < cache_seqlens[b] + Lnew, and with `causal`
// j <= i + cache_seqlens[b] + Lnew - Lq (bottom-right on its own length). Every argument is
// checked before anything is written, so a failed call leaves the caches unchanged.
// The attention is the decode kernel (decode.h).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../common.h"
#include "decode.h"

namespace seqkernels {
namespace {

constexpr const char* kOp = "flash_attention_kvcache";

struct CacheLayout {
  bool paged;
  int64_t B, H, Hk, Lq, D, Dv, Lnew;
  int64_t rows;        // Lmax, or block_size when paged
  int64_t capacity;    // positions a sequence can hold
  int64_t num_blocks;  // paged only
  int64_t max_blocks;  // paged only
};

CacheLayout check_kvcache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                               const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q.dim() == 4, kOp, ": q must be (B, H, Lq, D), got shape ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, kOp,
              ": q must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(q.device().is_cpu(), kOp, " (CPU kernel): q must be a CPU tensor");
  for (const auto* c : {&k_cache, &v_cache}) {
    const char* name = c == &k_cache ? "k_cache" : "v_cache";
    TORCH_CHECK(c->dim() == 4, kOp, ": ", name, " must be 4-D, got shape ", c->sizes());
    TORCH_CHECK(c->scalar_type() == dt, kOp, ": ", name, " must have q's dtype ", dt, ", got ", c->scalar_type());
    TORCH_CHECK(c->device() == q.device(), kOp, ": ", name, " must be on ", q.device());
    TORCH_CHECK(c->is_contiguous(), kOp, ": ", name, " must be contiguous (it is written in place)");
  }
  CacheLayout L{};
  L.B = q.size(0), L.H = q.size(1), L.Lq = q.size(2), L.D = q.size(3);
  L.Hk = k_cache.size(1), L.Dv = v_cache.size(3), L.rows = k_cache.size(2);
  L.paged = block_table.has_value() && block_table->defined();
  TORCH_CHECK(L.D > 0 && L.Dv > 0, kOp, ": head dims must be positive");
  TORCH_CHECK(k_cache.size(3) == L.D, kOp, ": k_cache's head dim ", k_cache.size(3), " must be q's ", L.D);
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == L.Hk && v_cache.size(2) == L.rows, kOp,
              ": k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(), " must agree but for the head dim");
  TORCH_CHECK(L.Hk > 0 && L.H % L.Hk == 0, kOp, ": the query heads (", L.H, ") must be a multiple of the cache's kv heads (",
              L.Hk, ")");
  if (L.paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == L.B && bt.device() == q.device(), kOp,
                ": block_table must be an int32 (B, max_blocks) tensor with B = ", L.B, ", got ", bt.scalar_type(),
                " of shape ", bt.sizes());
    TORCH_CHECK(L.rows > 0, kOp, ": the block size must be at least 1");
    L.num_blocks = k_cache.size(0);
    L.max_blocks = bt.size(1);
    L.capacity = L.max_blocks * L.rows;
  } else {
    TORCH_CHECK(k_cache.size(0) == L.B, kOp, ": k_cache's batch ", k_cache.size(0), " must be q's ", L.B,
                " (pass block_table for a paged cache)");
    L.capacity = L.rows;
  }
  const bool has_k = k.has_value() && k->defined(), has_v = v.has_value() && v->defined();
  TORCH_CHECK(has_k == has_v, kOp, ": k and v must be given together");
  L.Lnew = 0;
  if (has_k) {
    TORCH_CHECK(k->dim() == 4 && k->size(0) == L.B && k->size(1) == L.Hk && k->size(3) == L.D, kOp,
                ": k must be (B, Hk, Lnew, D) = (", L.B, ", ", L.Hk, ", Lnew, ", L.D, "), got ", k->sizes());
    L.Lnew = k->size(2);
    check_arg(*v, kOp, "v", {L.B, L.Hk, L.Lnew, L.Dv}, q);
    TORCH_CHECK(k->scalar_type() == dt && k->device() == q.device(), kOp, ": k must have q's dtype and device");
  }
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == L.B &&
                  (cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong) &&
                  cache_seqlens.device() == q.device(),
              kOp, ": cache_seqlens must be an int32 or int64 tensor of shape (B,) = (", L.B, ",), got ",
              cache_seqlens.scalar_type(), " of shape ", cache_seqlens.sizes());
  return L;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_kvcache_cpu(
    const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k_,
    const std::optional<at::Tensor>& v_, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    bool causal, double scale, double softcap, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes) {
  const CacheLayout L = check_kvcache_args(q_, k_cache, v_cache, k_, v_, cache_seqlens, block_table);
  const at::Tensor alibi = attention::checked_alibi_slopes(alibi_slopes, L.B, L.H, q_, kOp);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, kOp, ": softcap must be a finite number >= 0, got ",
                    softcap);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, kOp, ": window sizes must be >= -1 (-1 = unbounded), got (",
                    window_left, ", ", window_right, ")");
  // The values: every write must land inside the cache, every block id used must exist.
  // (read through the stride in either integer type: no converted copy for a decode step)
  std::vector<int64_t> sl(L.B), lens(L.B);
  const int64_t sl_stride = cache_seqlens.stride(0);
  for (int64_t b = 0; b < L.B; ++b) {
    sl[b] = cache_seqlens.scalar_type() == at::kInt ? cache_seqlens.const_data_ptr<int32_t>()[b * sl_stride]
                                                    : cache_seqlens.const_data_ptr<int64_t>()[b * sl_stride];
    TORCH_CHECK_VALUE(sl[b] >= 0 && sl[b] + L.Lnew <= L.capacity, kOp, ": cache_seqlens[", b, "] = ", sl[b],
                      " plus ", L.Lnew, " new keys must fit the cache's ", L.capacity, " positions");
    lens[b] = sl[b] + L.Lnew;
  }
  at::Tensor bt;
  if (L.paged) {
    bt = block_table->contiguous();
    const int32_t* t = bt.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < L.B; ++b) {
      for (int64_t blk = 0; blk * L.rows < lens[b]; ++blk) {
        const int32_t id = t[b * L.max_blocks + blk];
        TORCH_CHECK_VALUE(id >= 0 && id < L.num_blocks, kOp, ": block_table[", b, ", ", blk, "] = ", id,
                          " is not a block of the pool (0 .. ", L.num_blocks - 1, ")");
      }
    }
  }
  const at::Tensor q = q_.contiguous();
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = new_output({L.B, L.H, L.Lq, L.Dv}, q.options());
  at::Tensor lse = new_output({L.B, L.H, L.Lq}, q.options().dtype(lse_dtype));
  if (out.numel() == 0 && L.Lnew == 0) return {out, lse};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), kOp, [&] {
    using T = scalar_t;
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    attention::KVRows<T> kv;
    kv.k = k_cache.const_data_ptr<T>();
    kv.v = v_cache.const_data_ptr<T>();
    kv.Hk = L.Hk, kv.D = L.D, kv.Dv = L.Dv, kv.rows = L.rows;
    if (L.paged) {
      kv.block_table = bt.const_data_ptr<int32_t>();
      kv.max_blocks = L.max_blocks;
    }
    if (L.Lnew > 0) {  // append, in place
      const at::Tensor k = k_->contiguous(), v = v_->contiguous();
      const T* ks = k.const_data_ptr<T>();
      const T* vs = v.const_data_ptr<T>();
      T* kd = k_cache.mutable_data_ptr<T>();
      T* vd = v_cache.mutable_data_ptr<T>();
      // a decode step's few rows are copied on this thread: waking the pool costs more
      const int64_t task_bytes = L.Lnew * (L.D + L.Dv) * int64_t(sizeof(T));
      at::parallel_for(0, L.B * L.Hk, std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(task_bytes, 1)),
                       [&](int64_t begin, int64_t end) {
        for (int64_t bhk = begin; bhk < end; ++bhk) {
          const int64_t b = bhk / L.Hk, hk = bhk % L.Hk;
          for (int64_t t = 0; t < L.Lnew; ++t) {
            const int64_t row = kv.row_index(b, hk, sl[b] + t);
            std::memcpy(kd + row * L.D, ks + (bhk * L.Lnew + t) * L.D, L.D * sizeof(T));
            std::memcpy(vd + row * L.Dv, vs + (bhk * L.Lnew + t) * L.Dv, L.Dv * sizeof(T));
          }
        }
      });
    }
    if (out.numel() == 0) return;
    attention::Masking<A> mk;
    mk.H = L.H, mk.Lq = L.Lq, mk.Lk = L.capacity;
    mk.causal = causal;
    mk.causal_from_length = true;  // causal and the window on each sequence's own length
    mk.key_lengths = lens.data();
    mk.softcap = static_cast<A>(softcap);
    mk.window_left = window_left, mk.window_right = window_right;
    attention::set_alibi(mk, alibi);
    int64_t longest = 0;
    for (int64_t b = 0; b < L.B; ++b) longest = std::max(longest, lens[b]);
    const attention::DecodeDims dd{L.B, L.H, L.Hk, L.H / L.Hk, L.Lq, L.D, L.Dv, std::max<int64_t>(longest, 1)};
    attention::decode_forward<T, A>(dd, mk, kv, q.const_data_ptr<T>(), static_cast<A>(scale), out.mutable_data_ptr<T>(),
                                    lse.mutable_data_ptr<A>());
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("flash_attention_kvcache", &flash_attention_kvcache_cpu);
}

}  // namespace seqkernels
