// The Philox4x32-10 + Box-Muller normal stream (philox.h) hand-vectorised for AVX2 + FMA: 16 quads (64
// normals) per iteration, two independent groups of 8 quads in 8-lane vectors.
//
// Philox: each 32x32->64 product is one _mm256_mul_epu32 on 64-bit lanes (per group two vectors of 4
// quads, the even/odd halves of the 8 lanes, recombined by one shuffle per word at the end; see
// philox8). Box-Muller: the Cephes logf / sinf / cosf polynomials of philox.h, with the multiply-adds
// fused where GCC contracts the portable code (so the paths agree to the bit when the generic build has
// FMA; in any case to a few ulp). Compiled for AVX2 by a target attribute on each function: the rest of
// the library keeps the build's -march, and noise.cpp calls this only after __builtin_cpu_supports("avx2")
// and ("fma").
#include "noise.h"

#include <cstdint>
#include <cstring>

#include "philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define TS_AVX2 __attribute__((target("avx2,fma")))
#define TS_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) static inline

namespace thermosample {
namespace {

#ifndef TS_AVX2_GROUPS
#define TS_AVX2_GROUPS 2
#endif
constexpr int kGroups = TS_AVX2_GROUPS;   // groups of 8 quads per iteration (independent Philox chains)
static_assert(kMaxQuads % (8 * kGroups) == 0, "full noise passes must need no short group");

TS_AVX2_INLINE __m256 f8(float v) { return _mm256_set1_ps(v); }
TS_AVX2_INLINE __m256i i8(uint32_t v) { return _mm256_set1_epi32(int(v)); }

// Philox4x32-10 of counters (q + i, sample, step, 0), i = 0 .. 7, into r0..r3 (lane i = quad q + i).
// The state runs in 64-bit lanes, two vectors of four quads (A: quads 0, 1, 4, 5; B: 2, 3, 6, 7), so
// that each 32x32->64 product is one _mm256_mul_epu32 and its high word one shift; the high halves of
// the lanes carry garbage that _mm256_mul_epu32 ignores and the final shuffle drops. The two vectors are
// independent chains (a round is latency-bound: multiply, shift, xor). Round 0 multiplies the lane-
// uniform word (step) on the scalar side.
TS_AVX2_INLINE __m256i low_words(__m256i x, __m256i y) {   // (x0 x2 y0 y2 | x4 x6 y4 y6) as 32-bit words
  return _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(y), 0x88));
}

// G groups of 8 quads: group g is quads q + 8 g .. q + 8 g + 7; r[g][k] = word k, lane i = quad q + 8 g + i.
template <int G>
TS_AVX2_INLINE void philox8(uint32_t q, uint32_t sample, uint32_t step, uint32_t key0, uint32_t key1,
                            __m256i (&r)[G][4]) {
  constexpr int V = 2 * G;                 // 64-bit-lane vectors: v = 2 g (quads 0, 1, 4, 5) and 2 g + 1 (2, 3, 6, 7)
  const __m256i mA = i8(kPhiloxRoundA), mB = i8(kPhiloxRoundB);
  const uint64_t pb = uint64_t(kPhiloxRoundB) * step;
  __m256i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    const int base = 8 * (v / 2) + 2 * (v % 2);
    const __m256i ctr = _mm256_add_epi32(i8(q), _mm256_setr_epi32(base, 0, base + 1, 0, base + 4, 0, base + 5, 0));
    const __m256i pa = _mm256_mul_epu32(ctr, mA);   // 32-bit adds above: the counter wraps at 2^32
    c2[v] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), i8(key1));
    c3[v] = pa;
    c0[v] = i8(uint32_t(pb >> 32) ^ sample ^ key0);
    c1[v] = i8(uint32_t(pb));
  }
  uint32_t k0 = key0, k1 = key1;
  for (int round = 1; round < kPhiloxRounds; ++round) {
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m256i kv0 = i8(k0), kv1 = i8(k1);
    for (int v = 0; v < V; ++v) {
      const __m256i p_b = _mm256_mul_epu32(c2[v], mB), p_a = _mm256_mul_epu32(c0[v], mA);
      c0[v] = _mm256_xor_si256(_mm256_srli_epi64(p_b, 32), _mm256_xor_si256(c1[v], kv0));
      c2[v] = _mm256_xor_si256(_mm256_srli_epi64(p_a, 32), _mm256_xor_si256(c3[v], kv1));
      c1[v] = p_b;
      c3[v] = p_a;
    }
  }
  for (int g = 0; g < G; ++g) {
    r[g][0] = low_words(c0[2 * g], c0[2 * g + 1]);
    r[g][1] = low_words(c1[2 * g], c1[2 * g + 1]);
    r[g][2] = low_words(c2[2 * g], c2[2 * g + 1]);
    r[g][3] = low_words(c3[2 * g], c3[2 * g + 1]);
  }
}

// log_f32 of philox.h, 8 lanes (x positive, finite, normal).
TS_AVX2_INLINE __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), i8(126));    // sign bit is 0
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, i8(0x007fffffu)), i8(0x3f000000u)));
  const __m256 small = _mm256_cmp_ps(m, f8(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(small));                   // small: e - 1
  m = _mm256_add_ps(_mm256_sub_ps(m, f8(1.0f)), _mm256_and_ps(small, m)); // small: m + m - 1 (both exact)
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = f8(7.0376836292E-2f);
  y = _mm256_fmadd_ps(y, m, f8(-1.1514610310E-1f));
  y = _mm256_fmadd_ps(y, m, f8(1.1676998740E-1f));
  y = _mm256_fmadd_ps(y, m, f8(-1.2420140846E-1f));
  y = _mm256_fmadd_ps(y, m, f8(1.4249322787E-1f));
  y = _mm256_fmadd_ps(y, m, f8(-1.6668057665E-1f));
  y = _mm256_fmadd_ps(y, m, f8(2.0000714765E-1f));
  y = _mm256_fmadd_ps(y, m, f8(-2.4999993993E-1f));
  y = _mm256_fmadd_ps(y, m, f8(3.3333331174E-1f));
  const __m256 fe = _mm256_cvtepi32_ps(e);
  y = _mm256_fmadd_ps(_mm256_mul_ps(y, m), z, _mm256_mul_ps(fe, f8(-2.12194440E-4f)));
  y = _mm256_fmadd_ps(z, f8(-0.5f), y);
  return _mm256_fmadd_ps(fe, f8(0.693359375f), _mm256_add_ps(m, y));
}

// sincos_f32 of philox.h, 8 lanes, x in [0, 2 pi].
TS_AVX2_INLINE void sincos8(__m256 x, __m256& s, __m256& c) {
  __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(x, f8(1.27323954473516f)));
  j = _mm256_add_epi32(j, _mm256_and_si256(j, i8(1)));
  const __m256 y = _mm256_cvtepi32_ps(j);
  __m256 r = _mm256_fnmadd_ps(y, f8(0.78515625f), x);
  r = _mm256_fnmadd_ps(y, f8(2.4187564849853515625e-4f), r);
  r = _mm256_fnmadd_ps(y, f8(3.77489497744594108e-8f), r);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 sp = _mm256_fmadd_ps(f8(-1.9515295891E-4f), z, f8(8.3321608736E-3f));
  sp = _mm256_fmadd_ps(sp, z, f8(-1.6666654611E-1f));
  sp = _mm256_fmadd_ps(_mm256_mul_ps(sp, z), r, r);
  __m256 cp = _mm256_fmadd_ps(f8(2.443315711809948E-5f), z, f8(-1.388731625493765E-3f));
  cp = _mm256_fmadd_ps(cp, z, f8(4.166664568298827E-2f));
  cp = _mm256_add_ps(_mm256_fmsub_ps(_mm256_mul_ps(cp, z), z, _mm256_mul_ps(f8(0.5f), z)), f8(1.0f));
  const __m256 swap = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(j, i8(2)), i8(2)));
  const __m256 s0 = _mm256_blendv_ps(sp, cp, swap);                     // octants 2, 6: sin <-> cos
  const __m256 c0 = _mm256_blendv_ps(cp, sp, swap);
  const __m256i sign_s = _mm256_slli_epi32(_mm256_and_si256(j, i8(4)), 29);
  const __m256i sign_c = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(j, i8(2)), i8(4)), 29);
  s = _mm256_xor_ps(s0, _mm256_castsi256_ps(sign_s));
  c = _mm256_xor_ps(c0, _mm256_castsi256_ps(sign_c));
}

// box_muller of philox.h on 8 pairs of words: (radius cos, radius sin).
TS_AVX2_INLINE void box_muller8(__m256i a, __m256i c, __m256& z_even, __m256& z_odd) {
  const __m256 u1 = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 9)), f8(0.5f)),
                                  f8(1.1920928955078125e-07f));
  const __m256 u2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 9)), f8(1.1920928955078125e-07f));
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(f8(-2.0f), log8(u1)));
  __m256 s, co;
  sincos8(_mm256_mul_ps(u2, f8(6.2831854820251465f)), s, co);
  z_even = _mm256_mul_ps(radius, co);
  z_odd = _mm256_mul_ps(radius, s);
}

// The 4 x 8 normals of the 8 quads (r0..r3 words) in element order: quad i is (e0_i, o0_i, e1_i, o1_i).
TS_AVX2_INLINE void store_normals(float* z, const __m256i (&w)[4]) {
  __m256 e0, o0, e1, o1;
  box_muller8(w[0], w[1], e0, o0);
  box_muller8(w[2], w[3], e1, o1);
  // 4 x 8 transpose: lo0 = (e0_0 o0_0 e0_1 o0_1 | e0_4 o0_4 e0_5 o0_5), ...
  const __m256d lo0 = _mm256_castps_pd(_mm256_unpacklo_ps(e0, o0));
  const __m256d hi0 = _mm256_castps_pd(_mm256_unpackhi_ps(e0, o0));
  const __m256d lo1 = _mm256_castps_pd(_mm256_unpacklo_ps(e1, o1));
  const __m256d hi1 = _mm256_castps_pd(_mm256_unpackhi_ps(e1, o1));
  const __m256 q04 = _mm256_castpd_ps(_mm256_unpacklo_pd(lo0, lo1));    // quads 0 | 4
  const __m256 q15 = _mm256_castpd_ps(_mm256_unpackhi_pd(lo0, lo1));    // quads 1 | 5
  const __m256 q26 = _mm256_castpd_ps(_mm256_unpacklo_pd(hi0, hi1));    // quads 2 | 6
  const __m256 q37 = _mm256_castpd_ps(_mm256_unpackhi_pd(hi0, hi1));    // quads 3 | 7
  _mm256_storeu_ps(z, _mm256_permute2f128_ps(q04, q15, 0x20));
  _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(q26, q37, 0x20));
  _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(q04, q15, 0x31));
  _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(q26, q37, 0x31));
}

// The 32 G normals of quads q .. q + 8 G - 1 into z.
template <int G>
TS_AVX2_INLINE void normals_group(float* z, uint32_t q, uint32_t sample, uint32_t step, uint32_t k0, uint32_t k1) {
  __m256i w[G][4];
  philox8<G>(q, sample, step, k0, k1, w);
  for (int g = 0; g < G; ++g) store_normals(z + 32 * g, w[g]);
}

}  // namespace

TS_AVX2 void normals_avx2(float* z, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed) {
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  int i = 0;
  for (; i + 8 * kGroups <= nquads; i += 8 * kGroups)
    normals_group<kGroups>(z + 4 * i, uint32_t(q0 + uint64_t(i)), sample, step, k0, k1);
  for (; i + 8 <= nquads; i += 8) normals_group<1>(z + 4 * i, uint32_t(q0 + uint64_t(i)), sample, step, k0, k1);
  if (i < nquads) {                        // a short last group: compute 8 quads, keep the first ones
    alignas(32) float tail[32];
    normals_group<1>(tail, uint32_t(q0 + uint64_t(i)), sample, step, k0, k1);
    std::memcpy(z + 4 * i, tail, sizeof(float) * size_t(4 * (nquads - i)));
  }
}

TS_AVX2 void words_avx2(uint32_t* r, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed) {
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int i = 0; i < nquads; i += 8) {
    alignas(32) uint32_t w[4][8];
    __m256i v[1][4];
    philox8<1>(uint32_t(q0 + uint64_t(i)), sample, step, k0, k1, v);
    for (int k = 0; k < 4; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(w[k]), v[0][k]);
    for (int l = 0; l < 8 && i + l < nquads; ++l)
      for (int k = 0; k < 4; ++k) r[4 * (i + l) + k] = w[k][l];
  }
}

bool have_normals_avx2() { return true; }

}  // namespace thermosample

#else  // not x86-64 GCC/clang: no AVX2 path

namespace thermosample {
void normals_avx2(float* z, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed) {
  normals_generic(z, q0, nquads, sample, step, seed);
}
void words_avx2(uint32_t* r, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed) {
  words_generic(r, q0, nquads, sample, step, seed);
}
bool have_normals_avx2() { return false; }
}  // namespace thermosample

#endif
