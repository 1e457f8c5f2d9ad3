// torch.ops.vllm_ampere_flashmla.{sparse_decode_fwd, sparse_prefill_fwd}: every shape, dtype,
// device, stride and alignment check happens here; the kernels only see flashmla_params.h.
// Importing vllm_ampere._flashmla_C runs the TORCH_LIBRARY registration below.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "flashmla_config.h"
#include "flashmla_params.h"
#include "torch_strings.h"

namespace flashmla_ampere {
namespace {

using at::Tensor;
using vllm_ampere::device_name;
using vllm_ampere::dtype_name;
using vllm_ampere::shape;
using vllm_ampere::strides;

void check_cuda(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", device_name(t));
  TORCH_CHECK(t.device() == like.device(), name, " is on ", device_name(t), " but q is on ", device_name(like));
}

void check_aligned16(const Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void check_lengths(const std::optional<Tensor>& len, int64_t n, const Tensor& q, const char* name) {
  if (!len) return;
  check_cuda(*len, q, name);
  TORCH_CHECK(len->scalar_type() == at::kInt, name, " must be int32, got ", dtype_name(*len));
  TORCH_CHECK(len->dim() == 1 && len->size(0) == n && len->is_contiguous(), name, " must be contiguous [",
              std::to_string(n), "], got ", shape(*len));
}

PagedStream make_stream(const Tensor& cache, const Tensor& indices, const std::optional<Tensor>& lengths,
                        const Tensor& q, const char* cache_name, const char* idx_name, const char* len_name) {
  const int64_t b = q.size(0), s_q = q.size(1);
  check_cuda(cache, q, cache_name);
  check_cuda(indices, q, idx_name);
  TORCH_CHECK(cache.scalar_type() == at::kByte, cache_name, " must be uint8 (fp8_ds_mla), got ",
              dtype_name(cache));
  TORCH_CHECK(cache.dim() >= 3, cache_name, " must be [num_blocks, block_size, (1,) ",
              std::to_string(kTokenBytes), "], got ", shape(cache));
  TORCH_CHECK(cache.size(-1) == kTokenBytes && cache.stride(-1) == 1, cache_name, ": last dim must be ",
              std::to_string(kTokenBytes), " contiguous bytes per token, got ", shape(cache));
  const int64_t num_blocks = cache.size(0), block_size = cache.size(1);
  TORCH_CHECK(block_size > 0, cache_name, ": block_size must be positive");
  TORCH_CHECK(num_blocks <= 1 || cache.stride(0) >= block_size * kTokenBytes, cache_name,
              ": block stride ", std::to_string(cache.stride(0)), " B is smaller than block_size * ",
              std::to_string(kTokenBytes));
  TORCH_CHECK(cache.stride(0) % 16 == 0, cache_name, ": block stride must be a multiple of 16 bytes, got ",
              std::to_string(cache.stride(0)));
  check_aligned16(cache, cache_name);
  TORCH_CHECK(num_blocks * block_size <= INT32_MAX, cache_name, " has more slots than int32 indices address");
  TORCH_CHECK(indices.scalar_type() == at::kInt, idx_name, " must be int32, got ", dtype_name(indices));
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == b && indices.size(1) == s_q && indices.stride(2) == 1,
              idx_name, " must be [", std::to_string(b), ", ", std::to_string(s_q),
              ", topk] with a contiguous last dim, got ", shape(indices));
  TORCH_CHECK(indices.size(2) <= INT32_MAX / 2, idx_name, " is too wide");
  check_lengths(lengths, b, q, len_name);
  PagedStream s{};
  s.cache = cache.data_ptr<uint8_t>();
  s.block_stride = cache.stride(0);
  s.block_size = static_cast<int>(block_size);
  s.num_slots = num_blocks * block_size;
  s.indices = indices.data_ptr<int32_t>();
  s.idx_stride_b = indices.stride(0);
  s.idx_stride_s = indices.stride(1);
  s.width = static_cast<int>(indices.size(2));
  s.lengths = lengths ? lengths->data_ptr<int32_t>() : nullptr;
  return s;
}

void check_sink(const std::optional<Tensor>& sink, int64_t h_q, const Tensor& q) {
  if (!sink) return;
  check_cuda(*sink, q, "attn_sink");
  TORCH_CHECK(sink->scalar_type() == at::kFloat && sink->dim() == 1 && sink->size(0) == h_q &&
                  sink->is_contiguous(),
              "attn_sink must be contiguous float32 [", std::to_string(h_q), "], got ", dtype_name(*sink), " ",
              shape(*sink));
}

void check_q_like(const Tensor& q, int64_t dims, const char* name) {
  TORCH_CHECK(q.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ", dtype_name(q));
  TORCH_CHECK(q.dim() == dims && q.size(-1) == kHeadDim && q.stride(-1) == 1, name, " must have ",
              std::to_string(dims), " dims ending in a contiguous ", std::to_string(kHeadDim), ", got ", shape(q));
  TORCH_CHECK(q.size(-2) % kHeadsPerCta == 0, name, ": head count must be a multiple of ",
              std::to_string(kHeadsPerCta), " (pad heads as vLLM does), got ", std::to_string(q.size(-2)));
  for (int64_t d = 0; d < dims - 1; ++d)
    TORCH_CHECK(q.stride(d) % 8 == 0, name, ": strides must keep rows 16-byte aligned, got ", strides(q));
  check_aligned16(q, name);
}

void sparse_decode_fwd(const Tensor& q, const Tensor& k_cache, const Tensor& indices,
                       const std::optional<Tensor>& topk_length, const std::optional<Tensor>& attn_sink,
                       const std::optional<Tensor>& extra_k_cache, const std::optional<Tensor>& extra_indices,
                       const std::optional<Tensor>& extra_topk_length, double softmax_scale, Tensor& out,
                       Tensor& lse) {
  check_q_like(q, 4, "q");
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(extra_k_cache.has_value() == extra_indices.has_value(),
              "extra_k_cache and extra_indices_in_kvcache come together");
  TORCH_CHECK(!extra_topk_length || extra_k_cache, "extra_topk_length given without extra_k_cache");
  DecodeParams p{};
  p.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  p.q_stride_b = q.stride(0);
  p.q_stride_s = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.b = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be positive, got ",
              std::to_string(softmax_scale));
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.streams[0] = make_stream(k_cache, indices, topk_length, q, "k_cache", "indices", "topk_length");
  if (extra_k_cache)
    p.streams[1] = make_stream(*extra_k_cache, *extra_indices, extra_topk_length, q, "extra_k_cache",
                               "extra_indices_in_kvcache", "extra_topk_length");
  else
    p.streams[1] = PagedStream{p.streams[0].cache, 16, 1, 0, p.streams[0].indices, 0, 0, 0, nullptr};
  check_sink(attn_sink, h_q, q);
  p.attn_sink = attn_sink ? attn_sink->data_ptr<float>() : nullptr;

  check_cuda(out, q, "out");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.sizes() == q.sizes() && out.stride(-1) == 1,
              "out must be bfloat16 ", shape(q), " with a contiguous last dim, got ", dtype_name(out), " ",
              shape(out));
  for (int64_t d = 0; d < 3; ++d) TORCH_CHECK(out.stride(d) % 8 == 0, "out strides must keep rows 16-byte aligned");
  check_aligned16(out, "out");
  check_cuda(lse, q, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == b && lse.size(1) == h_q &&
                  lse.size(2) == s_q && lse.is_contiguous(),
              "lse must be contiguous float32 [", std::to_string(b), ", ", std::to_string(h_q), ", ",
              std::to_string(s_q), "], got ", shape(lse));
  p.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  p.out_stride_b = out.stride(0);
  p.out_stride_s = out.stride(1);
  p.out_stride_h = out.stride(2);
  p.lse = lse.data_ptr<float>();

  p.num_splits = decode_num_splits(p.streams[0].width, p.streams[1].width);
  const int64_t parts = b * s_q * p.num_splits * h_q;
  Tensor o_partial = at::empty({parts * kHeadDim}, q.options().dtype(at::kFloat));
  Tensor lse_partial = at::empty({parts}, q.options().dtype(at::kFloat));
  p.o_partial = o_partial.data_ptr<float>();
  p.lse_partial = lse_partial.data_ptr<float>();
  // Grids: the split kernel's b*s_q*num_splits CTAs, the combine's one per (query, head).
  TORCH_CHECK(b * s_q * std::max<int64_t>(p.num_splits, h_q) <= INT32_MAX, "decode grid too large: ",
              std::to_string(b * s_q), " queries x ", std::to_string(p.num_splits), " splits or ",
              std::to_string(h_q), " heads");
  const cudaError_t err = sparse_decode(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "vllm_ampere sparse decode launch failed: ", cudaGetErrorString(err));
}

void sparse_prefill_fwd(const Tensor& q, const Tensor& kv, const Tensor& indices,
                        const std::optional<Tensor>& topk_length, const std::optional<Tensor>& attn_sink,
                        double sm_scale, Tensor& out, Tensor& max_logits, Tensor& lse) {
  check_q_like(q, 3, "q");
  const int64_t s_q = q.size(0), h_q = q.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  check_cuda(kv, q, "kv");
  TORCH_CHECK(kv.scalar_type() == at::kBFloat16, "kv must be bfloat16, got ", dtype_name(kv));
  TORCH_CHECK((kv.dim() == 2 || (kv.dim() == 3 && kv.size(1) == 1)) && kv.size(-1) == kHeadDim &&
                  kv.stride(-1) == 1,
              "kv must be [s_kv, (1,) ", std::to_string(kHeadDim), "] with a contiguous last dim, got ", shape(kv));
  TORCH_CHECK(kv.stride(0) % 8 == 0, "kv rows must be 16-byte aligned (stride ", std::to_string(kv.stride(0)), ")");
  check_aligned16(kv, "kv");
  check_cuda(indices, q, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "indices must be int32, got ", dtype_name(indices));
  TORCH_CHECK((indices.dim() == 2 || (indices.dim() == 3 && indices.size(1) == 1)) && indices.size(0) == s_q &&
                  indices.stride(-1) == 1,
              "indices must be [", std::to_string(s_q), ", (1,) topk] with a contiguous last dim, got ",
              shape(indices));
  TORCH_CHECK(indices.size(-1) <= INT32_MAX / 2, "indices is too wide");
  check_lengths(topk_length, s_q, q, "topk_length");
  check_sink(attn_sink, h_q, q);
  TORCH_CHECK(std::isfinite(sm_scale) && sm_scale > 0, "sm_scale must be positive, got ", std::to_string(sm_scale));
  check_cuda(out, q, "out");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.sizes() == q.sizes() && out.stride(-1) == 1 &&
                  out.stride(0) % 8 == 0 && out.stride(1) % 8 == 0,
              "out must be bfloat16 ", shape(q), " with 16-byte aligned rows, got ", shape(out));
  check_aligned16(out, "out");
  for (const auto* t : {&max_logits, &lse}) {
    check_cuda(*t, q, "max_logits/lse");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == s_q && t->size(1) == h_q &&
                    t->is_contiguous(),
                "max_logits and lse must be contiguous float32 [", std::to_string(s_q), ", ", std::to_string(h_q),
                "], got ", shape(*t));
  }
  PrefillParams p{};
  p.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.kv = reinterpret_cast<const uint16_t*>(kv.data_ptr());
  p.kv_stride = kv.stride(0);
  p.s_kv = kv.size(0);
  p.indices = indices.data_ptr<int32_t>();
  p.idx_stride = indices.stride(0);
  p.width = static_cast<int>(indices.size(-1));
  p.lengths = topk_length ? topk_length->data_ptr<int32_t>() : nullptr;
  p.attn_sink = attn_sink ? attn_sink->data_ptr<float>() : nullptr;
  TORCH_CHECK(s_q <= INT32_MAX, "too many queries: ", std::to_string(s_q));
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.scale_log2 = static_cast<float>(sm_scale * M_LOG2E);
  p.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  p.out_stride_t = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.max_logits = max_logits.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  const cudaError_t err = sparse_prefill(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "vllm_ampere sparse prefill launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace flashmla_ampere

TORCH_LIBRARY(vllm_ampere_flashmla, m) {
  m.def(
      "sparse_decode_fwd(Tensor q, Tensor k_cache, Tensor indices, Tensor? topk_length, Tensor? attn_sink, "
      "Tensor? extra_k_cache, Tensor? extra_indices, Tensor? extra_topk_length, float softmax_scale, "
      "Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def(
      "sparse_prefill_fwd(Tensor q, Tensor kv, Tensor indices, Tensor? topk_length, Tensor? attn_sink, "
      "float sm_scale, Tensor(a!) out, Tensor(b!) max_logits, Tensor(c!) lse) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_ampere_flashmla, CUDA, m) {
  m.impl("sparse_decode_fwd", &flashmla_ampere::sparse_decode_fwd);
  m.impl("sparse_prefill_fwd", &flashmla_ampere::sparse_prefill_fwd);
}

extern "C" PyMODINIT_FUNC PyInit__flashmla_C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flashmla_C", "vllm_ampere sm80 sparse MLA", -1, nullptr};
  return PyModule_Create(&module);
}
