// The fused solver step on CPU: one pass over memory, OpenMP over (sample, block), SIMD inner loops.
//
//   out[b, e] = sum_k c_k in_k[b, e] + c_z z(b, e)
//   rate[b]   = sum_e (sum_k w_k in_k[b, e])^2 + 0 * out[b, e]       (w_u += alpha, w_d += beta; w = 0
//                                                                       without tracking)
// Each (sample, block of kBlock elements) is one work item with its own double partial; the partials of
// a sample are summed in block order, so the result does not depend on the thread count.
#include "fused_step.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "philox.h"

namespace thermosample {
namespace {

constexpr int64_t kBlock = 16384;  // elements per work item (a multiple of 4: blocks start on Philox quads)
constexpr int64_t kSub = 4 * kMaxQuads;  // elements per inner pass (noise buffer, float partial)
constexpr int64_t kPart = 256;  // elements per float partial of the rate (then summed in double)
constexpr int64_t kParallelMin = 32768;  // below this many elements, stay on one thread

// ---- storage <-> compute conversions (bit manipulation, round-to-nearest-even on store) ----------------
// float16 conversions follow Maratyszcza's FP16 library (branch-free, so they vectorise).

static inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

static inline uint16_t float_to_half(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;   // overflow -> inf; the rounding is below
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;             // the float add rounds (RNE) to half
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;   // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  return uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

template <int Code> struct Traits;
template <> struct Traits<kFloat32> {
  using S = float;  using C = float;
  static C load(S v) { return v; }
  static S store(C v) { return v; }
};
template <> struct Traits<kFloat64> {
  using S = double;  using C = double;
  static C load(S v) { return v; }
  static S store(C v) { return v; }
};
template <> struct Traits<kFloat16> {
  using S = uint16_t;  using C = float;
  static C load(S v) { return half_to_float(v); }
  static S store(C v) { return float_to_half(v); }
};
template <> struct Traits<kBFloat16> {
  using S = uint16_t;  using C = float;
  static C load(S v) { return bf16_to_float(v); }
  static S store(C v) { return float_to_bf16(v); }
};

// ---- one work item: elements [e0, e0 + len) of sample b ------------------------------------------------

template <int Code, int N, bool Track, bool Noise>
double step_block(const StepArgs& a, int64_t b, int64_t e0, int64_t len, float* zbuf) {
  using T = Traits<Code>;
  using S = typename T::S;
  using C = typename T::C;
  const int64_t base = b * a.numel + e0;
  // No __restrict on these: `out` may alias an input element for element, which `omp simd` allows.
  const S* in[N];
  C c[N], w[N];
  for (int k = 0; k < N; ++k) {
    in[k] = static_cast<const S*>(a.inputs[k]) + base;
    c[k] = C(a.coeffs[k]);
    w[k] = C((k == a.u ? a.alpha : 0.0) + (k == a.d ? a.beta : 0.0));
  }
  const C cz = C(a.noise);
  S* out = static_cast<S*>(a.out) + base;
  const uint32_t sample = a.sample_offset + uint32_t(b);

  double total = 0.0;
  for (int64_t s = 0; s < len; s += kSub) {
    const int64_t n = std::min(kSub, len - s);
    if (Noise) philox_normals(zbuf, uint64_t(e0 + s) >> 2, int((n + 3) >> 2), sample, a.step, a.seed);
    // The float partial covers kPart elements (kPart / lanes terms per SIMD lane), then goes to double:
    // with 8-lane AVX2 a 2048-element float partial was ~15x less accurate than torch's pairwise sum.
    for (int64_t p0 = 0; p0 < n; p0 += kPart) {
      const int64_t p1 = std::min(n, p0 + kPart);
      C part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t i = p0; i < p1; ++i) {
        C x[N];
        for (int k = 0; k < N; ++k) x[k] = T::load(in[k][s + i]);
        C o = c[0] * x[0];
        for (int k = 1; k < N; ++k) o += c[k] * x[k];
        if (Noise) o += cz * C(zbuf[i]);
        out[s + i] = T::store(o);
        C r = C(0) * o;                      // 0, or NaN where out is non-finite
        if (Track) {
          C v = w[0] * x[0];
          for (int k = 1; k < N; ++k) v += w[k] * x[k];
          r += v * v;
        }
        part += r;
      }
      total += double(part);
    }
  }
  return total;
}

template <int Code, int N, bool Track, bool Noise>
void run(const StepArgs& a) {
  const int64_t nblk = (a.numel + kBlock - 1) / kBlock;
  const int64_t items = a.batch * nblk;
  std::vector<double> partial(size_t(items), 0.0);
  const int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  const bool parallel = threads > 1 && items > 1 && a.batch * a.numel >= kParallelMin;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    alignas(64) float zbuf[kSub];
#pragma omp for schedule(dynamic, 2)  // dynamic: a descheduled thread does not stall the step
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / nblk, e0 = (it % nblk) * kBlock;
      partial[size_t(it)] = step_block<Code, N, Track, Noise>(a, b, e0, std::min(kBlock, a.numel - e0), zbuf);
    }
  }
  for (int64_t b = 0; b < a.batch; ++b) {
    double sum = 0.0;
    for (int64_t k = 0; k < nblk; ++k) sum += partial[size_t(b * nblk + k)];
    a.rate[b] = float(sum);
  }
}

template <int Code, int N>
void dispatch_flags(const StepArgs& a) {
  const bool noise = a.noise != 0.0;
  if (a.track) {
    noise ? run<Code, N, true, true>(a) : run<Code, N, true, false>(a);
  } else {
    noise ? run<Code, N, false, true>(a) : run<Code, N, false, false>(a);
  }
}

template <int Code>
void dispatch_inputs(const StepArgs& a) {
  switch (a.n_inputs) {
    case 1: return dispatch_flags<Code, 1>(a);
    case 2: return dispatch_flags<Code, 2>(a);
    case 3: return dispatch_flags<Code, 3>(a);
    case 4: return dispatch_flags<Code, 4>(a);
  }
}

}  // namespace

void fused_step(const StepArgs& a) {
  if (a.batch <= 0) return;
  if (a.numel == 0) {
    std::fill(a.rate, a.rate + a.batch, 0.0f);
    return;
  }
  switch (a.dtype) {
    case kFloat32: return dispatch_inputs<kFloat32>(a);
    case kFloat64: return dispatch_inputs<kFloat64>(a);
    case kFloat16: return dispatch_inputs<kFloat16>(a);
    case kBFloat16: return dispatch_inputs<kBFloat16>(a);
  }
}

void philox_normal(float* z, int64_t first, int64_t count, uint32_t sample, uint32_t step, uint64_t seed) {
  alignas(64) float buf[kSub + 4];
  int64_t e = first;
  const int64_t end = first + count;
  while (e < end) {
    const int64_t q0 = e >> 2, lead = e & 3;
    const int64_t n = std::min<int64_t>(kSub - lead, end - e);
    philox_normals(buf, uint64_t(q0), int((lead + n + 3) >> 2), sample, step, seed);
    std::memcpy(z + (e - first), buf + lead, size_t(n) * sizeof(float));
    e += n;
  }
}

}  // namespace thermosample
