// Fused CPU step of FP8AdamW (see kernels/_fp8_cpu.py for how it is built and used).
//
// One pass per group of G values: decode both E4M3 moments (COAT range expansion), run the AdamW update
// in fp32, re-encode the moments with a fresh per-group (amax, 16k). Each step mirrors the torch
// reference (kernels.fp8_adamw / kernels.fp8) operation for operation, in the same order and fp32
// rounding: the only differences are the log2/exp2 implementations (SLEEF here, MKL/SLEEF in torch),
// which may differ in the last bit. Groups run in parallel with at::parallel_for (torch's threads).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

constexpr float kTiny = std::numeric_limits<float>::min();  // fp32's smallest normal, see kernels.fp8._TINY

struct Constants {
  float log2_448;      // float(math.log2(448))
  float log2_range;    // float(log2(448^2 / 2)), COAT's target range for |x|^k
  float log2_code[128];  // log2 of the E4M3 magnitude with bits i (log2(tiny) for 0, which is masked)
};

Constants make_constants() {
  Constants c;
  c.log2_448 = static_cast<float>(std::log2(448.0));
  c.log2_range = static_cast<float>(std::log2(448.0 * 448.0 / 2.0));
  for (int i = 0; i < 128; ++i) {
    const int exponent = i >> 3, mantissa = i & 7;
    const double value = exponent == 0 ? std::ldexp(mantissa / 8.0, -6)
                                       : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
    c.log2_code[i] = static_cast<float>(std::log2(i == 0 ? static_cast<double>(kTiny) : value));
  }
  return c;
}

const Constants kC = make_constants();

inline uint32_t bits_of(float x) { uint32_t b; std::memcpy(&b, &x, 4); return b; }
inline float float_of(uint32_t b) { float x; std::memcpy(&x, &b, 4); return x; }

// fp32 -> E4M3 (fn) with round-to-nearest-even, as c10::Float8_e4m3fn does, written without branches
// so the loop vectorises. Inputs are finite with |x| < 480 (codes are at most 448 by construction).
inline uint8_t encode_e4m3(float x) {
  const uint32_t b = bits_of(x);
  const uint32_t sign = (b >> 24) & 0x80u;
  const uint32_t mag = b & 0x7FFFFFFFu;
  // Subnormal codes (|x| < 2^-6): adding 2^14 lets the fp32 adder round the mantissa for us.
  const uint32_t sub = bits_of(float_of(mag) + 16384.0f) - (141u << 23);
  // Normal codes: rebias the exponent, round half to even on the 20 dropped mantissa bits.
  const uint32_t norm = (mag + (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + ((mag >> 20) & 1u)) >> 20;
  return static_cast<uint8_t>((mag < (121u << 23) ? sub : norm) | sign);
}

// out[i] = f(in[i]) for i < n using torch's vectorised SLEEF routines (n is a multiple of Vec::size()).
template <typename F>
inline void vec_map(const float* in, float* out, int64_t n, F f) {
  for (int64_t i = 0; i < n; i += Vec::size()) f(Vec::loadu(in + i)).store(out + i);
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 codes at once: log2|q| from the 128-entry table with four two-table permutes and two blends (GCC
// turns the plain table loop into scalar loads), the sign bit, and a mask of the non-zero magnitudes.
struct CodeLanes {
  __m512 log2_q;
  __m512i sign;
  __mmask16 nonzero;
};

inline CodeLanes load_codes(const uint8_t* codes, int64_t n, const __m512* table) {
  // Lanes past the group's end (n < 16, or none at all in the zero padding) read no memory.
  const __mmask16 valid = n >= 16 ? static_cast<__mmask16>(0xFFFF)
                                  : static_cast<__mmask16>(n <= 0 ? 0u : (1u << n) - 1);
  const __m512i code = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, codes));
  const __m512i mag = _mm512_and_si512(code, _mm512_set1_epi32(0x7F));
  const __m512 low = _mm512_mask_blend_ps(_mm512_test_epi32_mask(mag, _mm512_set1_epi32(32)),
                                          _mm512_permutex2var_ps(table[0], mag, table[1]),
                                          _mm512_permutex2var_ps(table[2], mag, table[3]));
  const __m512 high = _mm512_mask_blend_ps(_mm512_test_epi32_mask(mag, _mm512_set1_epi32(32)),
                                           _mm512_permutex2var_ps(table[4], mag, table[5]),
                                           _mm512_permutex2var_ps(table[6], mag, table[7]));
  return {_mm512_mask_blend_ps(_mm512_test_epi32_mask(mag, _mm512_set1_epi32(64)), low, high),
          _mm512_slli_epi32(_mm512_and_si512(code, _mm512_set1_epi32(0x80)), 24),
          _mm512_test_epi32_mask(mag, mag)};
}
#endif

// The SLEEF routines are calls that clobber every vector register, so each stage below is its own loop
// over a group (L1-resident) and the calls run in a tight loop of their own, over both moments at once.

// Exponents t = log2|q|/k + log2(amax) - log2(448)/k of codes[0:count] into t[0:padded] (the dequantised
// magnitude is 2^t, as kernels.fp8.dequantize_fp8_expanded_torch computes it).
void dequantize_exponents(const uint8_t* codes, float amax, uint8_t k16, int64_t count, int64_t padded, float* t) {
  const float inv_k = 16.0f / static_cast<float>(k16);
  const float offset = std::log2(std::max(amax, kTiny)) - kC.log2_448 * inv_k;
#if defined(CPU_CAPABILITY_AVX512)
  __m512 table[8];
  for (int j = 0; j < 8; ++j) table[j] = _mm512_loadu_ps(kC.log2_code + 16 * j);
  for (int64_t i = 0; i < padded; i += 16)
    (Vec(load_codes(codes + i, count - i, table).log2_q) * Vec(inv_k) + Vec(offset)).store(t + i);
#else
  for (int64_t i = 0; i < padded; ++i) t[i] = kC.log2_code[i < count ? codes[i] & 0x7F : 0] * inv_k + offset;
#endif
}

// x = sign(q) * 2^t, zero for zero codes (x holds 2^t on entry).
void apply_signs(const uint8_t* codes, int64_t count, int64_t padded, float* x) {
  for (int64_t i = 0; i < padded; ++i) {
    const uint8_t code = i < count ? codes[i] : 0;
    const float magnitude = (code & 0x7F) ? x[i] : 0.0f;
    x[i] = (code & 0x80) ? -magnitude : magnitude;
  }
}

// Decode both moments' codes into mv[0:2*padded] (m then v, zeros past count).
void dequantize_pair(const uint8_t* const codes[2], const float* amax, const uint8_t* const k16[2], int64_t count,
                     int64_t padded, float* mv) {
  for (int j = 0; j < 2; ++j) dequantize_exponents(codes[j], amax[j], *k16[j], count, padded, mv + j * padded);
  vec_map(mv, mv, 2 * padded, [](Vec t) { return t.exp2(); });
  for (int j = 0; j < 2; ++j) apply_signs(codes[j], count, padded, mv + j * padded);
}

// Encode both moments mv[0:2*padded] into their codes[0:count], amax and k16, as
// kernels.fp8.quantize_fp8_expanded_torch does; scratch holds 2*padded floats.
void quantize_pair(const float* mv, int64_t count, int64_t padded, uint8_t* const codes[2], float* const amax_out[2],
                   uint8_t* const k16_out[2], float* scratch) {
  for (int64_t i = 0; i < 2 * padded; ++i) scratch[i] = std::max(std::fabs(mv[i]), kTiny);
  vec_map(scratch, scratch, 2 * padded, [](Vec m) { return m.log2(); });
  const Vec tiny(kTiny);
  for (int j = 0; j < 2; ++j) {
    const float* x = mv + j * padded;
    float* log_mag = scratch + j * padded;
    // amax, and max and min of log2 over non-zeros, as vector reductions (scalar float max/min do not
    // vectorise without fast-math; at::vec::maximum's NaN checks cost, moments are finite).
    Vec vmax(0.0f), vlog_max(-std::numeric_limits<float>::infinity()), vlog_min(std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < padded; i += Vec::size()) {
      const Vec mag = Vec::loadu(x + i).abs(), lm = Vec::loadu(log_mag + i);
      vmax = Vec::blendv(vmax, mag, mag > vmax);
      vlog_max = Vec::blendv(vlog_max, lm, lm > vlog_max);
      vlog_min = Vec::blendv(vlog_min, lm, (lm < vlog_min) & (mag >= tiny));
    }
    float lanes[3][Vec::size()];
    vmax.store(lanes[0]);
    vlog_max.store(lanes[1]);
    vlog_min.store(lanes[2]);
    const float log_max = *std::max_element(lanes[1], lanes[1] + Vec::size());
    const float log_min = *std::min_element(lanes[2], lanes[2] + Vec::size());
    // torch evaluates `range / ratio * 16` as reciprocal(ratio) * range * 16 (Tensor.__rtruediv__).
    const float k16f = std::floor((1.0f / (log_max - log_min)) * kC.log2_range * 16.0f);
    const uint8_t k16 = static_cast<uint8_t>(std::min(std::max(k16f, 1.0f), 255.0f));
    const float k = static_cast<float>(k16) / 16.0f;
    const float offset = kC.log2_448 - k * log_max;
    for (int64_t i = 0; i < padded; ++i) log_mag[i] = log_mag[i] * k + offset;
    *amax_out[j] = *std::max_element(lanes[0], lanes[0] + Vec::size());
    *k16_out[j] = k16;
  }
  vec_map(scratch, scratch, 2 * padded, [](Vec t) { return t.exp2(); });
  for (int j = 0; j < 2; ++j) {
    const float* x = mv + j * padded;
    const float* q = scratch + j * padded;
    for (int64_t i = 0; i < count; ++i)
      codes[j][i] = encode_e4m3(std::signbit(x[i]) ? -(std::fabs(x[i]) >= kTiny ? q[i] : 0.0f)
                                                   : (std::fabs(x[i]) >= kTiny ? q[i] : 0.0f));
  }
}

struct Hyper {
  float decay, lerp_weight, beta2, one_minus_beta2, eps;
};

// kernels.fp8_adamw.adamw_math on one group, with torch's per-op fp32 rounding (lerp as an FMA, as
// ATen's vectorised lerp does; no other contraction: this file is compiled with -ffp-contract=off).
void adamw_group(float* p, const float* g, float* m, float* v, int64_t count, const Hyper& h,
                 float bias_correction2_sqrt, float step_size) {
  for (int64_t i = 0; i < count; ++i) {
    const float grad = g[i];
    const float param = p[i] * h.decay;
    const float exp_avg = std::fma(h.lerp_weight, grad - m[i], m[i]);
    const float exp_avg_sq = v[i] * h.beta2 + h.one_minus_beta2 * grad * grad;
    const float denom = std::sqrt(exp_avg_sq) / bias_correction2_sqrt + h.eps;
    p[i] = param + step_size * exp_avg / denom;
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
  }
}

}  // namespace

// One FP8AdamW step on every tensor of the lists (all contiguous CPU tensors; codes viewed as uint8).
void fp8_adamw_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                    std::vector<at::Tensor> m_codes, std::vector<at::Tensor> m_amax, std::vector<at::Tensor> m_k16,
                    std::vector<at::Tensor> v_codes, std::vector<at::Tensor> v_amax, std::vector<at::Tensor> v_k16,
                    std::vector<double> bias_correction1, std::vector<double> bias_correction2_sqrt,
                    double lr, double beta1, double beta2, double eps, double weight_decay, int64_t group_size) {
  const size_t n_tensors = params.size();
  std::vector<int64_t> first_group(n_tensors + 1, 0);
  for (size_t t = 0; t < n_tensors; ++t)
    first_group[t + 1] = first_group[t] + (params[t].numel() + group_size - 1) / group_size;
  // Scalars are cast to fp32 exactly where torch casts a Python float for an fp32 op.
  const Hyper h{static_cast<float>(1 - lr * weight_decay), static_cast<float>(1 - beta1),
                static_cast<float>(beta2), static_cast<float>(1 - beta2), static_cast<float>(eps)};
  const int64_t padded = std::max<int64_t>(group_size, Vec::size());
  // Raw pointers once per tensor: data_ptr<T>() checks dtype and storage, which per group costs ~10%.
  struct Pointers {
    float *param, *amax[2];
    const float* grad;
    uint8_t *codes[2], *k16[2];
    int64_t numel;
    float bias_correction2_sqrt, step_size;
  };
  std::vector<Pointers> ptrs(n_tensors);
  for (size_t t = 0; t < n_tensors; ++t)
    ptrs[t] = {params[t].data_ptr<float>(), {m_amax[t].data_ptr<float>(), v_amax[t].data_ptr<float>()},
               grads[t].data_ptr<float>(), {m_codes[t].data_ptr<uint8_t>(), v_codes[t].data_ptr<uint8_t>()},
               {m_k16[t].data_ptr<uint8_t>(), v_k16[t].data_ptr<uint8_t>()}, params[t].numel(),
               static_cast<float>(bias_correction2_sqrt[t]), static_cast<float>(-lr / bias_correction1[t])};
  at::parallel_for(0, first_group[n_tensors], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(4 * padded);
    float *m = buffer.data(), *v = m + padded, *scratch = v + padded;
    size_t t = std::upper_bound(first_group.begin(), first_group.end(), begin) - first_group.begin() - 1;
    for (int64_t group = begin; group < end; ++group) {
      while (group >= first_group[t + 1]) ++t;
      const Pointers& p = ptrs[t];
      const int64_t local = group - first_group[t];
      const int64_t start = local * group_size;
      const int64_t count = std::min(group_size, p.numel - start);
      uint8_t* const codes[2] = {p.codes[0] + start, p.codes[1] + start};
      float* const amax[2] = {p.amax[0] + local, p.amax[1] + local};
      uint8_t* const k16[2] = {p.k16[0] + local, p.k16[1] + local};
      const float old_amax[2] = {*amax[0], *amax[1]};
      dequantize_pair(codes, old_amax, k16, count, padded, m);
      adamw_group(p.param + start, p.grad + start, m, v, count, h, p.bias_correction2_sqrt, p.step_size);
      quantize_pair(m, count, padded, codes, amax, k16, scratch);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("fp8_adamw_step", &fp8_adamw_step, "Fused FP8AdamW step on lists of CPU tensors");
}
