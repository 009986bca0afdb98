// Attention of a few queries a sequence against a KV cache, for MLX's CPU backend.
//
// MLX's CPU attention is a chain of small BLAS products (about 4 GB/s for three query rows) and
// a scalar exp (26 ns an element here); a decode step at depth is bound by them, not by memory.
// This primitive reads each key and value row once for all the query heads that share it, with
// a vectorised exp2, in two threads (the calling one and a helper: what a 2-core box has): the
// arithmetic of MLX's own (float32 products, softmax with the maximum subtracted, a hidden
// position scored as the lowest float), in another order. It sits in the lazy graph like any
// MLX op, so a step needs no evaluation in the middle (NumPy's attention does).
//
// Inputs: queries (B, H, L, D); keys and values (B, Hkv, S, D), any strides with the last axis
// contiguous (a view of a KV cache); optionally a mask broadcastable to (B, 1, L, S): boolean
// (true sees the key) or additive float32. `causal` puts query l at position S - L + l.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr int64_t kMinKeysPerSplit = 256;

// exp(x) for x <= 0 (scores minus their maximum), as 2^n * 2^f with |f| <= 1/2 and 2^f from a
// degree-6 polynomial fitted on Chebyshev nodes (relative error about 1e-7 in float32).
// Branch-free, so the compiler vectorises the loop.
inline void exp_shifted(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // Below 2^-126 a weight is zero to float32: clamped there, the scale below comes out 0.
    const float t = std::max(x[i] * kLog2E, -127.0f);
    const float whole = (t + kRound) - kRound;  // nearest integer, in float arithmetic
    const float f = t - whole;
    float p = 0.00015469732f;
    p = p * f + 0.0013400432f;
    p = p * f + 0.0096180256f;
    p = p * f + 0.055503272f;
    p = p * f + 0.24022651f;
    p = p * f + 0.69314721f;
    p = p * f + 1.0f;
    const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;  // 2^whole, or 0
    x[i] = p * __builtin_bit_cast(float, bits);
  }
}

enum class MaskKind : int { none = 0, causal = 1, boolean = 2, additive = 3 };

struct Layout {
  int64_t batch, heads, length, dims, kv_heads, context;
  int64_t q_strides[4], k_strides[4], v_strides[4];
  int64_t m_batch, m_query, m_key;  // mask strides (elements), 0 where broadcast
  MaskKind mask;
  float scale;
};

// One sequence's key/value head over keys [begin, end): every query row that shares it (row j
// is head kv_head * group + j / length, position j % length). Leaves each row's weighted sum
// of values unnormalised in `acc` (rows x dims), with its score maximum and weight total.
struct Part {
  int64_t b, kv_head, begin, end;
  std::vector<float> acc, top, total;
};

void attend_part(const Layout& t, const float* q, const float* k, const float* v,
                 const void* mask, Part& part, std::vector<float>& scratch) {
  const int64_t D = t.dims, L = t.length, b = part.b;
  const int64_t group = t.heads / t.kv_heads, rows = group * L;
  const int64_t first = part.begin, n = part.end - part.begin;
  scratch.resize(rows * (D + n));
  float* qs = scratch.data();     // rows x D, scaled queries
  float* scores = qs + rows * D;  // rows x n
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t head = part.kv_head * group + j / L, pos = j % L;
    const float* src = q + b * t.q_strides[0] + head * t.q_strides[1] + pos * t.q_strides[2];
    for (int64_t d = 0; d < D; ++d) qs[j * D + d] = src[d * t.q_strides[3]] * t.scale;
  }
  const float* kb = k + b * t.k_strides[0] + part.kv_head * t.k_strides[1];
  const float* vb = v + b * t.v_strides[0] + part.kv_head * t.v_strides[1];
  // Each key row is read once for all the query rows.
  for (int64_t s = 0; s < n; ++s) {
    const float* key = kb + (first + s) * t.k_strides[2];
    for (int64_t j = 0; j < rows; ++j) {
      const float* qj = qs + j * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qj[d] * key[d];
      scores[j * n + s] = dot;
    }
  }
  part.acc.assign(rows * D, 0.0f);
  part.top.resize(rows);
  part.total.resize(rows);
  for (int64_t j = 0; j < rows; ++j) {
    float* row = scores + j * n;
    const int64_t pos = j % L;
    if (t.mask == MaskKind::causal) {
      // Query `pos` sits at position context - length + pos and sees keys up to it.
      for (int64_t s = std::max<int64_t>(t.context - L + pos + 1 - first, 0); s < n; ++s)
        row[s] = kLowest;
    } else if (t.mask == MaskKind::boolean) {
      const bool* m = static_cast<const bool*>(mask) + b * t.m_batch + pos * t.m_query +
                      first * t.m_key;
      for (int64_t s = 0; s < n; ++s)
        if (!m[s * t.m_key]) row[s] = kLowest;
    } else if (t.mask == MaskKind::additive) {
      const float* m = static_cast<const float*>(mask) + b * t.m_batch + pos * t.m_query +
                       first * t.m_key;
      for (int64_t s = 0; s < n; ++s) row[s] += m[s * t.m_key];
    }
    float top = kLowest;
#pragma omp simd reduction(max : top)
    for (int64_t s = 0; s < n; ++s) top = std::max(top, row[s]);
#pragma omp simd
    for (int64_t s = 0; s < n; ++s) row[s] -= top;
    exp_shifted(row, n);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < n; ++s) total += row[s];
    part.top[j] = top;
    part.total[j] = total;
  }
  for (int64_t s = 0; s < n; ++s) {
    const float* value = vb + (first + s) * t.v_strides[2];
    for (int64_t j = 0; j < rows; ++j) {
      const float w = scores[j * n + s];
      float* a = part.acc.data() + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += w * value[d];
    }
  }
}

// Splits the work in (sequence, key/value head) parts, and with fewer than four of them each
// part's keys in two so both cores have work; the halves' sums are rescaled to a common
// maximum and added (the merge of flash-decoding).
void attend(const Layout& t, const float* q, const float* k, const float* v, const void* mask,
            float* out) {
  const int64_t D = t.dims, L = t.length, group = t.heads / t.kv_heads, rows = group * L;
  const int64_t units = t.batch * t.kv_heads;
  const int64_t splits = units < 4 && t.context >= 2 * kMinKeysPerSplit ? 2 : 1;
  std::vector<Part> parts;
  for (int64_t b = 0; b < t.batch; ++b)
    for (int64_t h = 0; h < t.kv_heads; ++h)
      for (int64_t i = 0; i < splits; ++i)
        parts.push_back({b, h, t.context * i / splits, t.context * (i + 1) / splits, {}, {}, {}});
  auto run = [&](size_t begin, size_t end) {
    std::vector<float> scratch;
    for (size_t i = begin; i < end; ++i) attend_part(t, q, k, v, mask, parts[i], scratch);
  };
  const size_t half = parts.size() / 2;
  if (half == 0) {
    run(0, parts.size());
  } else {
    std::thread helper(run, 0, half);
    run(half, parts.size());
    helper.join();
  }
  for (size_t i = 0; i < parts.size(); i += splits) {
    const int64_t b = parts[i].b, kv_head = parts[i].kv_head;
    for (int64_t j = 0; j < rows; ++j) {
      float top = kLowest;
      for (int64_t p = 0; p < splits; ++p) top = std::max(top, parts[i + p].top[j]);
      float total = 0.0f;
      float weights[2];
      for (int64_t p = 0; p < splits; ++p) {
        weights[p] = std::exp(parts[i + p].top[j] - top);
        total += weights[p] * parts[i + p].total[j];
      }
      const int64_t head = kv_head * group + j / L, pos = j % L;
      float* dst = out + ((b * t.heads + head) * L + pos) * D;
      for (int64_t d = 0; d < D; ++d) {
        float sum = 0.0f;
        for (int64_t p = 0; p < splits; ++p) sum += weights[p] * parts[i + p].acc[j * D + d];
        dst[d] = sum / total;
      }
    }
  }
}

class CacheAttention : public mx::UnaryPrimitive {
 public:
  CacheAttention(mx::Stream stream, float scale, MaskKind mask)
      : mx::UnaryPrimitive(stream), scale_(scale), mask_(mask) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& q = inputs[0];
    const auto& k = inputs[1];
    const auto& v = inputs[2];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    Layout t{};
    t.batch = q.shape(0);
    t.heads = q.shape(1);
    t.length = q.shape(2);
    t.dims = q.shape(3);
    t.kv_heads = k.shape(1);
    t.context = k.shape(2);
    for (int i = 0; i < 4; ++i) {
      t.q_strides[i] = q.strides()[i];
      t.k_strides[i] = k.strides()[i];
      t.v_strides[i] = v.strides()[i];
    }
    t.mask = mask_;
    t.scale = scale_;
    const void* mask_data = nullptr;
    if (inputs.size() > 3) {
      const auto& m = inputs[3];  // (B or 1, 1, L, S), as attention_cpu checks
      t.m_batch = m.shape(0) == 1 ? 0 : m.strides()[0];
      t.m_query = m.shape(2) == 1 ? 0 : m.strides()[2];
      t.m_key = m.strides()[3];
      mask_data = m.data<void>();
    }
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& input : inputs) encoder.set_input_array(input);
    encoder.set_output_array(out);
    encoder.dispatch([t, q = q.data<float>(), k = k.data<float>(), v = v.data<float>(),
                      mask_data, o = out.data<float>()]() { attend(t, q, k, v, mask_data, o); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("cache_attention runs on the CPU only");
  }

  const char* name() const override { return "CacheAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CacheAttention&>(other);
    return scale_ == o.scale_ && mask_ == o.mask_;
  }

 private:
  float scale_;
  MaskKind mask_;
};

mx::array attention(const mx::array& queries, const mx::array& keys, const mx::array& values,
                    float scale, const std::optional<mx::array>& mask, bool causal) {
  if (queries.ndim() != 4 || keys.ndim() != 4 || values.ndim() != 4)
    throw std::invalid_argument("cache_attention: queries, keys and values must be 4-D");
  if (queries.dtype() != mx::float32 || keys.dtype() != mx::float32 ||
      values.dtype() != mx::float32)
    throw std::invalid_argument("cache_attention: float32 only");
  const int B = queries.shape(0), H = queries.shape(1), L = queries.shape(2),
            D = queries.shape(3);
  const int Hkv = keys.shape(1), S = keys.shape(2);
  if (keys.shape() != values.shape() || keys.shape(0) != B || keys.shape(3) != D ||
      Hkv == 0 || H % Hkv != 0 || S < L)
    throw std::invalid_argument("cache_attention: shapes do not match");
  auto stream = mx::to_stream(std::monostate{});
  if (stream.device != mx::Device::cpu)
    throw std::invalid_argument("cache_attention: the CPU stream only");
  // Strides are read as they are, but the last axis must be contiguous.
  auto last_contiguous = [&](const mx::array& a) {
    return a.strides().empty() || a.strides().back() == 1 ? a : mx::contiguous(a, false, stream);
  };
  std::vector<mx::array> inputs{last_contiguous(queries), last_contiguous(keys),
                                last_contiguous(values)};
  MaskKind kind = causal ? MaskKind::causal : MaskKind::none;
  if (mask) {
    if (causal) throw std::invalid_argument("cache_attention: a mask or causal, not both");
    auto m = *mask;
    if (m.ndim() == 2) m = mx::reshape(m, {1, 1, m.shape(0), m.shape(1)}, stream);
    if (m.ndim() != 4 || m.shape(1) != 1 || (m.shape(0) != 1 && m.shape(0) != B) ||
        (m.shape(2) != 1 && m.shape(2) != L) || m.shape(3) != S)
      throw std::invalid_argument("cache_attention: the mask must broadcast to (B, 1, L, S)");
    if (m.dtype() == mx::bool_) {
      kind = MaskKind::boolean;
    } else {
      kind = MaskKind::additive;
      m = mx::astype(m, mx::float32, stream);
    }
    inputs.push_back(m);
  }
  return mx::array({B, H, L, D}, mx::float32,
                   std::make_shared<CacheAttention>(stream, scale, kind), std::move(inputs));
}

}  // namespace

NB_MODULE(_cache_attention, m) {
  nb::module_::import_("mlx.core");
  m.def("cache_attention", &attention, nb::arg("queries"), nb::arg("keys"), nb::arg("values"),
        nb::kw_only(), nb::arg("scale"), nb::arg("mask") = nb::none(),
        nb::arg("causal") = false,
        "Attention of (B, H, L, D) float32 queries against (B, Hkv, S, D) keys and values on "
        "the CPU; mask boolean (true sees) or additive, broadcastable to (B, 1, L, S).");
}
