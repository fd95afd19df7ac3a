// The fused solver step on CPU: one pass over memory, OpenMP over (sample, block), SIMD inner loops.
//
//   out[b, e] = sum_k c_k in_k[b, e] + c_z z(b, e)
//   rate[b]   = sum_e (sum_k w_k in_k[b, e])^2 + 0 * stored(out[b, e])   (w_u += alpha, w_d += beta; w = 0
//                                                                           without tracking)
// stored(.) is the value as written in the storage dtype: an fp16/bf16 result that overflows to inf on
// the store makes the rate NaN (issue 13, item 6), in the same pass.
//
// The reduction order is fixed by the element index alone (issue 13, item 7): not by the thread count,
// the batch a sample sits in, its address alignment or the SIMD width. Each chunk of kPart elements
// (sample-relative, the last one zero-padded) is reduced in the compute dtype by kLanes explicit lanes
// (lane j adds elements j, j + kLanes, ... in turn) and a halving tree over the lanes; the chunk
// partials of a sample are added in double, in chunk order. Each (sample, block of kBlock elements) is
// one work item with its own double partial; the partials of a sample are summed in block order after
// the parallel loop.
#include "fused_step.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "noise.h"
#include "philox.h"

namespace thermosample {
namespace {

constexpr int64_t kBlock = 16384;  // elements per work item (a multiple of 4: blocks start on Philox quads)
constexpr int64_t kSub = 4 * kMaxQuads;  // elements per inner pass (noise buffer)
constexpr int64_t kPart = 256;  // elements per chunk partial of the rate (fixed lanes + tree; then double)
static_assert(kBlock % kPart == 0 && kSub % kPart == 0, "chunks must start at sample-relative multiples of kPart");
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

// probe(stored, o): the term a stored output adds to the rate, 0 or NaN where the stored value is
// non-finite; equal to 0 * load(stored) up to the sign of zero. For fp16/bf16 it tests the exponent bits
// (all ones: inf or NaN), cheaper than converting back, and catches a finite o that overflows on store.
static const float kNaNf = __builtin_nanf("");

template <int Code> struct Traits;
template <> struct Traits<kFloat32> {
  using S = float;  using C = float;
  static C load(S v) { return v; }
  static S store(C v) { return v; }
  static C probe(S, C o) { return C(0) * o; }
};
template <> struct Traits<kFloat64> {
  using S = double;  using C = double;
  static C load(S v) { return v; }
  static S store(C v) { return v; }
  static C probe(S, C o) { return C(0) * o; }
};
template <> struct Traits<kFloat16> {
  using S = uint16_t;  using C = float;
  static C load(S v) { return half_to_float(v); }
  static S store(C v) { return float_to_half(v); }
  static C probe(S st, C) { return (st & 0x7C00u) == 0x7C00u ? kNaNf : 0.0f; }
};
template <> struct Traits<kBFloat16> {
  using S = uint16_t;  using C = float;
  static C load(S v) { return bf16_to_float(v); }
  static S store(C v) { return float_to_bf16(v); }
  static C probe(S st, C) { return (st & 0x7F80u) == 0x7F80u ? kNaNf : 0.0f; }
};

// ---- the fixed-order chunk reduction ---------------------------------------------------------------------
//
// A chunk's kPart rate terms r[0, kPart) (a short last chunk padded with +0) reduce in one fixed order:
// lane j (of kLanes) adds r[j], r[j + kLanes], r[j + 2 kLanes], ... in turn, then a halving tree over
// the lanes (acc[j] += acc[j + h], h = kLanes/2 ... 1). The lanes are explicit array elements, so the
// order is the same whatever the SIMD width, the alignment or the compiler's peeling.

constexpr int kLanes = 32;
static_assert(kPart % kLanes == 0 && (kLanes & (kLanes - 1)) == 0, "kLanes must be a power of two dividing kPart");

template <typename C>
static inline C lanes_total(C* acc) {
  for (int h = kLanes / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) acc[j] += acc[j + h];
  return acc[0];
}

// ---- one work item: elements [e0, e0 + len) of sample b ------------------------------------------------

template <int Code, int N, bool Track, bool Noise>
struct Element {
  using T = Traits<Code>;
  using S = typename T::S;
  using C = typename T::C;
  const S* in[N];
  C c[N], w[N];
  C cz;
  S* out;

  // out[i] = sum_k c_k in_k[i] + cz z; returns its rate term: (sum_k w_k in_k[i])^2 + probe(stored out).
  __attribute__((always_inline)) inline C operator()(int64_t i, float z) const {
    C x[N];
    for (int k = 0; k < N; ++k) x[k] = T::load(in[k][i]);
    C o = c[0] * x[0];
    for (int k = 1; k < N; ++k) o += c[k] * x[k];
    if (Noise) o += cz * C(z);
    const S st = T::store(o);
    out[i] = st;
    C r = T::probe(st, o);                 // 0, or NaN where the stored out is non-finite (fp16 inf too)
    if (Track) {
      C v = w[0] * x[0];
      for (int k = 1; k < N; ++k) v += w[k] * x[k];
      r += v * v;
    }
    return r;
  }
};

template <int Code, int N, bool Track, bool Noise>
double step_block(const StepArgs& a, int64_t b, int64_t e0, int64_t len, float* zbuf) {
  using E = Element<Code, N, Track, Noise>;
  using C = typename E::C;
  using S = typename E::S;
  const int64_t base = b * a.numel + e0;
  // No __restrict on these: `out` may alias an input element for element, which `omp simd` allows.
  E el;
  for (int k = 0; k < N; ++k) {
    el.in[k] = static_cast<const S*>(a.inputs[k]) + base;
    el.c[k] = C(a.coeffs[k]);
    el.w[k] = C((k == a.u ? a.alpha : 0.0) + (k == a.d ? a.beta : 0.0));
  }
  el.cz = C(a.noise);
  el.out = static_cast<S*>(a.out) + base;
  const uint32_t sample = a.sample_offset + uint32_t(b);
  const NormalsFn normals = noise_path().fn;   // avx512 / avx2 / generic, chosen once per process (noise.h)

  double total = 0.0;
  for (int64_t s = 0; s < len; s += kSub) {
    const int64_t n = std::min(kSub, len - s);
    if (Noise) normals(zbuf, uint64_t(e0 + s) >> 2, int((n + 3) >> 2), sample, a.step, a.seed);
    for (int64_t p0 = 0; p0 < n; p0 += kPart) {
      const int64_t m = std::min(kPart, n - p0);
      const int64_t q = s + p0;
      const float* z = zbuf + p0;
      alignas(64) C acc[kLanes] = {};
      if (m == kPart) {                    // every chunk but a sample's short last one: lanes in registers
        for (int64_t i0 = 0; i0 < kPart; i0 += kLanes) {
#pragma omp simd
          for (int j = 0; j < kLanes; ++j) acc[j] += el(q + i0 + j, Noise ? z[i0 + j] : 0.0f);
        }
      } else {                             // the short last chunk: terms padded with +0, same order
        alignas(64) C r[kPart];
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) r[i] = el(q + i, Noise ? z[i] : 0.0f);
        for (int64_t i = m; i < kPart; ++i) r[i] = C(0);
        for (int64_t i0 = 0; i0 < kPart; i0 += kLanes)
          for (int j = 0; j < kLanes; ++j) acc[j] += r[i0 + j];
      }
      total += double(lanes_total(acc));
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
    case 5: return dispatch_flags<Code, 5>(a);
    case 6: return dispatch_flags<Code, 6>(a);
  }
  static_assert(kMaxInputs == 6, "dispatch_inputs must list every input count up to kMaxInputs");
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
    noise_path().fn(buf, uint64_t(q0), int((lead + n + 3) >> 2), sample, step, seed);
    std::memcpy(z + (e - first), buf + lead, size_t(n) * sizeof(float));
    e += n;
  }
}

}  // namespace thermosample
