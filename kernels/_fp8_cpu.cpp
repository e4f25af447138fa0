// Fused CPU step of FP8AdamW (see kernels/_fp8_cpu.py for how it is built and used).
//
// One pass per group of G values, eight lanes at a time (GCC vector extensions: AVX2 where the build
// enables it, SSE pairs otherwise): decode both E4M3 moments (COAT range expansion), run the AdamW update
// in fp32, re-encode the moments with a fresh per-group (amax, 16k). Groups run in parallel with
// at::parallel_for (torch's intra-op threads).
//
// Where the torch reference (kernels.fp8 / kernels.fp8_adamw) calls log2/exp2 per value, this does:
// * decode: the magnitude of code (e, m) is 2^((e-7)/k + offset) * 2^(log2(1+m/8)/k) (subnormal codes
//   2^((log2(m)-9)/k + offset)), so 16 + 8 + 8 exp2 per group and moment build tables and each value is
//   two table lookups and a product;
// * encode: k and the offset from log2 of the group's largest and smallest non-zero magnitudes (log2 is
//   monotone, so two scalar log2 per group), then per value a degree-7 polynomial for log2|x| (absolute
//   error < 7.2e-7), y = k*log2|x| + offset, and the code straight from y: exponent floor(y), mantissa
//   round(8 * 2^frac(y) - 8) with a degree-5 polynomial for 2^frac (relative error < 1.7e-7).
// Error bound against the reference (tested in tests/fp8/test_fp8_fused.py): y differs by at most
// k * 7.2e-7 + a few fp32 ulps of y (|y| < 2^4) plus k * log2 of the decoded moments' relative difference
// (a few 1e-7): below 2e-5 for k <= 16, while neighbouring E4M3 codes are at least log2(15.5/14.5) = 0.096
// apart in y, so a code differs by at most one step when the group's k16 agrees. k16 = floor(16 * range /
// log2(max/min)) differs (by one) only when that quotient lies within ~1e-5 of an integer. Decoded
// magnitudes below 2^-190 flush to zero (the reference keeps subnormals down to 2^-149; far below any eps).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint8_t vb __attribute__((vector_size(8)));

constexpr float kTiny = std::numeric_limits<float>::min();  // fp32's smallest normal, see kernels.fp8._TINY
constexpr float kInf = std::numeric_limits<float>::infinity();
const float kLog2_448 = static_cast<float>(std::log2(448.0));
const float kLog2Range = static_cast<float>(std::log2(448.0 * 448.0 / 2.0));  // COAT's target range of |x|^k
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: v + magic rounds v (|v| < 2^22) to an integer

inline vf splat(float x) { return vf{} + x; }
inline vi splat_i(int32_t x) { return vi{} + x; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vi load_codes(const uint8_t* p) {
#if defined(__AVX2__)
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  vb b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, vi);
#endif
}

inline void store_codes(uint8_t* p, vi codes) {
#if defined(__AVX2__)
  const __m128i half = _mm_packus_epi32(_mm256_castsi256_si128((__m256i)codes), _mm256_extracti128_si256((__m256i)codes, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(half, half));
#else
  const vb b = __builtin_convertvector(codes, vb);
  std::memcpy(p, &b, sizeof b);
#endif
}

// table[idx] per lane (idx in 0..7).
inline vf lookup8(vf table, vi idx) {
#if defined(__AVX2__)
  return (vf)_mm256_permutevar8x32_ps((__m256)table, (__m256i)idx);
#else
  vf out;
  for (int i = 0; i < kLanes; ++i) out[i] = table[idx[i] & 7];
  return out;
#endif
}

inline vf vsqrt(vf x) {
#if defined(__AVX2__)
  return (vf)_mm256_sqrt_ps((__m256)x);
#else
  for (int i = 0; i < kLanes; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

// Nearest integer (ties to even, the default rounding mode) and floor, one instruction each with AVX2.
inline vi round_int(vf v) {
#if defined(__AVX2__)
  return (vi)_mm256_cvtps_epi32((__m256)v);
#else
  return (vi)(v + kRoundMagic) - (vi)splat(kRoundMagic);  // exact for |v| < 2^22
#endif
}

inline vf floor_v(vf v) {
#if defined(__AVX2__)
  return (vf)_mm256_floor_ps((__m256)v);
#else
  vf n = (v + kRoundMagic) - kRoundMagic;  // |v| < 2^22 here
  return n > v ? n - 1.0f : n;
#endif
}

// Unsigned 32-bit lane minimum.
inline vi min_u32(vi a, vi b) {
#if defined(__AVX2__)
  return (vi)_mm256_min_epu32((__m256i)a, (__m256i)b);
#else
  typedef uint32_t vu __attribute__((vector_size(32)));
  return (vu)a < (vu)b ? a : b;
#endif
}

// 2^f for f in [0, 1]: minimax polynomial fitted on [0, 1], relative error < 1.7e-7 (fp32 Horner).
inline vf exp2_unit(vf f) {
  vf p = splat(0.0018671305f);
  p = p * f + 0.009017029f;
  p = p * f + 0.055799913f;
  p = p * f + 0.24016444f;
  p = p * f + 0.6931513f;
  return p * f + 1.0f;
}

// 2^y for y < 128: 2^floor(y) times exp2_unit of the fraction; zero below 2^-126.
inline vf exp2v(vf y) {
  const vi keep = y >= -126.0f;
  y = keep ? y : splat(0.0f);
  const vf n = floor_v(y);
  const vi scaled = (vi)exp2_unit(y - n) + (__builtin_convertvector(n, vi) << 23);
  return (vf)(scaled & keep);
}

// log2(x) for normal x > 0 (finite garbage for zeros and subnormals, which callers mask): exponent bits
// plus a degree-6 polynomial in t = m - 1 for the mantissa m reduced to [sqrt(1/2), sqrt(2)); absolute
// error < 4.5e-6.
inline vf log2v(vf x) {
  const vi bits = (vi)x;
  vf m = (vf)((bits & 0x7FFFFF) | 0x3F800000);
  const vi big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  const vf e = __builtin_convertvector(((bits >> 23) - 127) - big, vf);  // big is -1 where true
  const vf t = m - 1.0f;
  vf p = splat(-0.2115333f);
  p = p * t + 0.31982717f;
  p = p * t - 0.36585534f;
  p = p * t + 0.47967118f;
  p = p * t - 0.72122353f;
  p = p * t + 1.442703f;
  return e + t * p;
}

// Per-group decode tables of one moment: |x| of code (e, m) is a[e] * b[m] for e > 0 and sub[m] for e = 0.
struct DecodeTables {
  vf a_lo, a_hi, b, sub;
};

DecodeTables decode_tables(float amax, uint8_t k16) {
  const float inv_k = 16.0f / static_cast<float>(k16);
  // The reference's dequantised magnitude is 2^(log2|q|/k + log2(amax) - log2(448)/k).
  const float offset = std::log2(std::max(amax, kTiny)) - kLog2_448 * inv_k;
  const vf e_lo = {-7, -6, -5, -4, -3, -2, -1, 0}, log2_mantissa = {
      0.0f, 0.169925001f, 0.321928095f, 0.459431619f, 0.584962501f, 0.700439718f, 0.807354922f, 0.906890596f};
  // log2(m) - 9 of the subnormal codes m * 2^-9; lane 0 (the zero code) is forced to 0 below.
  const vf log2_sub = {-9, -9, -8, -7.41503750f, -7, -6.67807191f, -6.41503750f, -6.19264508f};
  // Where a[1] = 2^(-6/k + offset) would flush to zero (groups spanning magnitudes below 2^-126), a[e]
  // carries 2^64 that b[m] gives back (b[m] in [1, 2^14.6] before that), so only magnitudes below 2^-190
  // flush; elsewhere no shift, which would cost exponent bits in fp32.
  const float shift = -6.0f * inv_k + offset < -120.0f ? 64.0f : 0.0f;
  DecodeTables t;
  t.a_lo = exp2v(e_lo * inv_k + (offset + shift));
  t.a_hi = exp2v((e_lo + 8.0f) * inv_k + (offset + shift));
  t.b = exp2v(log2_mantissa * inv_k) * (shift != 0.0f ? 0x1p-64f : 1.0f);  // exact power-of-two scaling
  t.sub = exp2v(log2_sub * inv_k + offset);
  t.sub[0] = 0.0f;
  return t;
}

inline vf decode(vi code, const DecodeTables& t) {
  const vi mag = code & 0x7F, e = mag >> 3, m = mag & 7;
  const vf a = e < 8 ? lookup8(t.a_lo, e) : lookup8(t.a_hi, e);  // lookup8 reads idx & 7
  const vf x = e == 0 ? lookup8(t.sub, m) : a * lookup8(t.b, m);
  return (vf)((vi)x | ((code & 0x80) << 24));
}

// E4M3 code (sign aside) of 2^y for y <= log2(448), rounding to nearest as the fp32 -> E4M3 cast does.
inline vi encode_exponent(vf y) {
  const vf n = floor_v(y);
  const vf q = exp2_unit(y - n);  // 2^frac(y), in [1, 2]
  const vi ni = __builtin_convertvector(n, vi);
  const vi normal = ((ni + 7) << 3) + round_int(q * 8.0f - 8.0f);  // a mantissa of 8 carries into the exponent
  // Subnormal codes count 2^-9 steps: round(q * 2^(n+9)), the scale clamped where everything rounds to 0.
  const vf scale = (vf)(((ni > -40 ? ni : splat_i(-40)) + (9 + 127)) << 23);
  const vi code = ni < -6 ? round_int(q * scale) : normal;
  return code < 126 ? code : splat_i(126);  // 448; the polynomials could nudge the largest value towards 0x7F (NaN)
}

struct Hyper {
  float decay, lerp_weight, beta2, one_minus_beta2, eps;
};

// Per-group pointers of one parameter, with room for a padded copy of a partial group.
struct Group {
  float* param;
  const float* grad;
  uint8_t* codes[2];
  float* amax[2];
  uint8_t* k16[2];
  int64_t count;
};

inline float max_lane(vf v) { float r = v[0]; for (int i = 1; i < kLanes; ++i) r = std::max(r, v[i]); return r; }
constexpr int32_t kTinyBits = 0x00800000;

// The smallest magnitude >= kTiny from lanes of bits - kTinyBits (unsigned), inf if there is none.
inline float min_nonzero(vi lanes) {
  uint32_t r = static_cast<uint32_t>(lanes[0]);
  for (int i = 1; i < kLanes; ++i) r = std::min(r, static_cast<uint32_t>(lanes[i]));
  if (r >= 0x7F000000u) return kInf;  // only wrapped lanes (zeros, subnormals): finite magnitudes stay below
  const uint32_t bits = r + kTinyBits;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// Requantise one moment held in fp32 in x[0:n] into codes, amax and k16, given its absmax and its smallest
// non-zero magnitude (inf if none), as kernels.fp8.quantize_fp8_expanded_torch does.
void encode_moment(const float* x, int64_t n, float amax, float min_nonzero, uint8_t* codes, float* amax_out,
                   uint8_t* k16_out) {
  const float log_max = std::log2(std::max(amax, kTiny));
  const float log_min = min_nonzero == kInf ? kInf : std::log2(min_nonzero);
  // torch evaluates `range / ratio * 16` as reciprocal(ratio) * range * 16 (Tensor.__rtruediv__).
  const float k16f = std::floor((1.0f / (log_max - log_min)) * kLog2Range * 16.0f);
  const uint8_t k16 = static_cast<uint8_t>(std::min(std::max(k16f, 1.0f), 255.0f));
  const float k = static_cast<float>(k16) / 16.0f, offset = kLog2_448 - k * log_max;
  for (int64_t i = 0; i < n; i += kLanes) {
    const vi bits = (vi)load(x + i), mag = bits & 0x7FFFFFFF;
    const vi code = encode_exponent(log2v((vf)mag) * k + offset) & (mag > 0x7FFFFF);  // zero below kTiny
    store_codes(codes + i, code | ((bits >> 24) & 0x80));
  }
  *amax_out = amax;
  *k16_out = k16;
}

// One group of n values (a multiple of kLanes; partial groups arrive zero-padded): decode, AdamW in fp32
// (kernels.fp8_adamw.adamw_math), encode. m and v are scratch for n floats each.
void step_group(const Group& g, int64_t n, const Hyper& h, float bias_correction2_sqrt, float step_size, float* m,
                float* v) {
  const DecodeTables tm = decode_tables(*g.amax[0], *g.k16[0]), tv = decode_tables(*g.amax[1], *g.k16[1]);
  const float inv_bc2 = 1.0f / bias_correction2_sqrt;
  // Smallest magnitudes >= kTiny tracked as bits - bits(kTiny), unsigned: smaller ones wrap to huge values.
  vf m_max = splat(0.0f), v_max = splat(0.0f);
  vi m_min = splat_i(-1), v_min = splat_i(-1);
  for (int64_t i = 0; i < n; i += kLanes) {
    const vf grad = load(g.grad + i);
    vf exp_avg = decode(load_codes(g.codes[0] + i), tm);
    vf exp_avg_sq = decode(load_codes(g.codes[1] + i), tv);
    exp_avg = exp_avg + h.lerp_weight * (grad - exp_avg);
    exp_avg_sq = exp_avg_sq * h.beta2 + h.one_minus_beta2 * grad * grad;
    const vf denom = vsqrt(exp_avg_sq) * inv_bc2 + h.eps;
    store(g.param + i, load(g.param + i) * h.decay + step_size * exp_avg / denom);
    store(m + i, exp_avg);
    store(v + i, exp_avg_sq);
    const vf m_abs = (vf)((vi)exp_avg & 0x7FFFFFFF);
    m_max = m_abs > m_max ? m_abs : m_max;
    v_max = exp_avg_sq > v_max ? exp_avg_sq : v_max;
    m_min = min_u32(m_min, (vi)m_abs - kTinyBits);
    v_min = min_u32(v_min, (vi)exp_avg_sq - kTinyBits);
  }
  encode_moment(m, n, max_lane(m_max), min_nonzero(m_min), g.codes[0], g.amax[0], g.k16[0]);
  encode_moment(v, n, max_lane(v_max), min_nonzero(v_min), g.codes[1], g.amax[1], g.k16[1]);
}

// A partial group (count < padded values): copied into zero-padded buffers (zero codes decode to zero,
// zero gradients keep them zero), stepped, copied back.
void step_partial_group(const Group& g, int64_t padded, const Hyper& h, float bias_correction2_sqrt,
                        float step_size, float* m, float* v) {
  std::vector<float> param(padded, 0.0f), grad(padded, 0.0f);
  std::vector<uint8_t> codes(2 * padded, 0);
  std::copy(g.param, g.param + g.count, param.begin());
  std::copy(g.grad, g.grad + g.count, grad.begin());
  for (int j = 0; j < 2; ++j) std::copy(g.codes[j], g.codes[j] + g.count, codes.begin() + j * padded);
  Group local = g;
  local.param = param.data();
  local.grad = grad.data();
  local.codes[0] = codes.data();
  local.codes[1] = codes.data() + padded;
  step_group(local, padded, h, bias_correction2_sqrt, step_size, m, v);
  std::copy(param.begin(), param.begin() + g.count, g.param);
  for (int j = 0; j < 2; ++j) std::copy(local.codes[j], local.codes[j] + g.count, g.codes[j]);
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
  const Hyper h{static_cast<float>(1 - lr * weight_decay), static_cast<float>(1 - beta1),
                static_cast<float>(beta2), static_cast<float>(1 - beta2), static_cast<float>(eps)};
  const int64_t padded = std::max<int64_t>(group_size, kLanes);
  // Raw pointers once per tensor: data_ptr<T>() checks dtype and storage, which per group costs ~10%.
  struct Pointers {
    Group base;
    float bias_correction2_sqrt, step_size;
  };
  std::vector<Pointers> ptrs(n_tensors);
  for (size_t t = 0; t < n_tensors; ++t)
    ptrs[t] = {{params[t].data_ptr<float>(), grads[t].data_ptr<float>(),
                {m_codes[t].data_ptr<uint8_t>(), v_codes[t].data_ptr<uint8_t>()},
                {m_amax[t].data_ptr<float>(), v_amax[t].data_ptr<float>()},
                {m_k16[t].data_ptr<uint8_t>(), v_k16[t].data_ptr<uint8_t>()}, params[t].numel()},
               static_cast<float>(bias_correction2_sqrt[t]), static_cast<float>(-lr / bias_correction1[t])};
  at::parallel_for(0, first_group[n_tensors], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * padded);
    size_t t = std::upper_bound(first_group.begin(), first_group.end(), begin) - first_group.begin() - 1;
    for (int64_t group = begin; group < end; ++group) {
      while (group >= first_group[t + 1]) ++t;
      const Pointers& p = ptrs[t];
      const int64_t local = group - first_group[t], start = local * group_size;
      const Group g{p.base.param + start, p.base.grad + start, {p.base.codes[0] + start, p.base.codes[1] + start},
                    {p.base.amax[0] + local, p.base.amax[1] + local}, {p.base.k16[0] + local, p.base.k16[1] + local},
                    std::min(group_size, p.base.count - start)};
      if (g.count == padded)
        step_group(g, padded, h, p.bias_correction2_sqrt, p.step_size, scratch.data(), scratch.data() + padded);
      else
        step_partial_group(g, padded, h, p.bias_correction2_sqrt, p.step_size, scratch.data(),
                           scratch.data() + padded);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("fp8_adamw_step", &fp8_adamw_step, "Fused FP8AdamW step on lists of CPU tensors");
}
