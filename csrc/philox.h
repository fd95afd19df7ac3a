// Philox4x32-10 and the thermosample normal stream (see thermosample/ops/reference.py, module docstring).
//
//   counter = (e >> 2, sample_offset + b, step, 0),  key = (seed & 0xffffffff, seed >> 32)
//   r0..r3  = Philox4x32-10(counter, key)                       (same rounds as triton philox_impl)
//   pair 0 (e & 3 in {0, 1}) uses (r0, r1), pair 1 (e & 3 in {2, 3}) uses (r2, r3)
//   u1 = ((a >> 9) + 0.5) * 2^-23,  u2 = (c >> 9) * 2^-23
//   z  = sqrt(-2 log u1) * (e even ? cos(2 pi u2) : sin(2 pi u2))
//
// The integer part is bit-exact. log and sincos are branch-free float32 polynomials (Cephes logf/sinf/
// cosf, within a few ulp of libm) so that the loops over a block of quads vectorise (`omp simd`).
// noise_avx2.cpp hand-vectorises the same arithmetic for AVX2; noise.h picks the path at run time.
#pragma once

#include <cstdint>
#include <cstring>

namespace thermosample {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// One Philox4x32-10 block, in place on (c0, c1, c2, c3). The 32-bit words live in 64-bit lanes: the
// 32x32->64 products are then single vpmuludq's when the caller's loop vectorises (no widen/narrow).
static inline void philox4x32_10(uint64_t& c0, uint64_t& c1, uint64_t& c2, uint64_t& c3, uint32_t key0,
                                 uint32_t key1) {
  constexpr uint64_t lo32 = 0xFFFFFFFFu;
  uint64_t k0 = key0, k1 = key1;
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t pb = uint64_t(kPhiloxRoundB) * c2;
    const uint64_t pa = uint64_t(kPhiloxRoundA) * c0;
    c0 = (pb >> 32) ^ c1 ^ k0;
    c1 = pb & lo32;
    c2 = (pa >> 32) ^ c3 ^ k1;
    c3 = pa & lo32;
    k0 = (k0 + kPhiloxKeyA) & lo32;
    k1 = (k1 + kPhiloxKeyB) & lo32;
  }
}

// Natural log for x in (0, inf), finite and normal (Cephes logf; the caller never passes 0 or denormals).
static inline float log_f32(float x) {
  uint32_t bits = float_to_bits(x);
  int e = int((bits >> 23) & 0xff) - 126;                  // x = m * 2^e, m in [0.5, 1)
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
  const bool small = m < 0.707106781186547524f;            // m in [sqrt(1/2), sqrt(2)) after the shift
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  const float fe = float(e);
  y += -2.12194440E-4f * fe;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

// sin and cos of x for x in [0, 2 pi] (Cephes sinf/cosf reduction by pi/4 in three parts).
static inline void sincos_f32(float x, float& s, float& c) {
  int j = int(x * 1.27323954473516f);   // 4 / pi
  j += j & 1;                           // even octant
  const float y = float(j);
  j &= 7;
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float sp = ((-1.9515295891E-4f * z + 8.3321608736E-3f) * z - 1.6666654611E-1f) * z * r + r;
  const float cp = ((2.443315711809948E-5f * z - 1.388731625493765E-3f) * z + 4.166664568298827E-2f) * z * z -
                   0.5f * z + 1.0f;
  // Selects and sign flips as bit masks: ternaries here stop GCC vectorising the loop on AVX2
  // (it if-converts them only with AVX-512 mask registers).
  const uint32_t swap = 0u - uint32_t((j >> 1) & 1);       // octants 2 and 6: sin <-> cos
  const uint32_t spb = float_to_bits(sp), cpb = float_to_bits(cp);
  const uint32_t s0 = (cpb & swap) | (spb & ~swap);
  const uint32_t c0 = (spb & swap) | (cpb & ~swap);
  s = bits_to_float(s0 ^ (uint32_t(j & 4) << 29));         // sin < 0 in octants 4, 6
  c = bits_to_float(c0 ^ (uint32_t((j + 2) & 4) << 29));   // cos < 0 in octants 2, 4
}

// Box-Muller on one pair of Philox words: z_even = radius cos, z_odd = radius sin.
static inline void box_muller(uint32_t a, uint32_t c, float& z_even, float& z_odd) {
  const float u1 = (float(a >> 9) + 0.5f) * 1.1920928955078125e-07f;   // 2^-23
  const float u2 = float(c >> 9) * 1.1920928955078125e-07f;
  const float radius = __builtin_sqrtf(-2.0f * log_f32(u1));
  const float theta = u2 * 6.2831854820251465f;                        // float32(2 pi), as the reference
  float s, co;
  sincos_f32(theta, s, co);
  z_even = radius * co;
  z_odd = radius * s;
}

constexpr int kMaxQuads = 512;  // quads per philox_normals call (2048 normals)

// The Philox words of quads q0 .. q0 + nquads - 1 of one sample: r[4 i + k] = r_k of quad q0 + i (tests).
static inline void philox_words(uint32_t* __restrict r, uint64_t q0, int nquads, uint32_t sample, uint32_t step,
                                uint64_t seed) {
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma omp simd
  for (int i = 0; i < nquads; ++i) {
    uint64_t c0 = uint32_t(q0 + uint64_t(i)), c1 = sample, c2 = step, c3 = 0;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    r[4 * i] = uint32_t(c0);
    r[4 * i + 1] = uint32_t(c1);
    r[4 * i + 2] = uint32_t(c2);
    r[4 * i + 3] = uint32_t(c3);
  }
}

// Normals for elements [4 * q0, 4 * (q0 + nquads)) of one sample into z[0 .. 4 * nquads), nquads <=
// kMaxQuads. Two vector loops: Philox on 64-bit lanes into planar words, then Box-Muller on float lanes
// (one fused loop would run both at the narrower width).
static inline void philox_normals(float* __restrict z, uint64_t q0, int nquads, uint32_t sample, uint32_t step,
                                  uint64_t seed) {
  alignas(64) uint32_t a[2 * kMaxQuads], c[2 * kMaxQuads];   // pair p = 2 q + (0: r0, r1 | 1: r2, r3)
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#pragma omp simd
  for (int i = 0; i < nquads; ++i) {
    uint64_t c0 = uint32_t(q0 + uint64_t(i)), c1 = sample, c2 = step, c3 = 0;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    a[2 * i] = uint32_t(c0);
    c[2 * i] = uint32_t(c1);
    a[2 * i + 1] = uint32_t(c2);
    c[2 * i + 1] = uint32_t(c3);
  }
#pragma omp simd
  for (int p = 0; p < 2 * nquads; ++p) {
    float z_even, z_odd;
    box_muller(a[p], c[p], z_even, z_odd);
    z[2 * p] = z_even;
    z[2 * p + 1] = z_odd;
  }
}

}  // namespace thermosample
