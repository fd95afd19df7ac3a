// The portable Philox + Box-Muller loops of philox.h compiled for AVX-512 (512-bit vectors), whatever the
// build's -march: the `omp simd` loops vectorise to 8 (Philox, 64-bit lanes) and 16 (Box-Muller) lanes.
// noise.cpp calls this only after __builtin_cpu_supports says the CPU has AVX-512 F/BW/DQ/VL.
//
// Only this file is compiled for AVX-512: the standard headers are included before the target pragma so
// that no inline library function shared with other translation units is emitted with AVX-512 code.
#include <cstdint>
#include <cstring>

#include "noise.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2,prefer-vector-width=512")
#define TS_HAVE_AVX512 1
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2,prefer-vector-width=512"))), apply_to = function)
#define TS_HAVE_AVX512 1
#endif

#include "philox.h"

namespace thermosample {

#ifdef TS_HAVE_AVX512
void normals_avx512(float* z, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed) {
  philox_normals(z, q0, nquads, sample, step, seed);
}

void words_avx512(uint32_t* r, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed) {
  philox_words(r, q0, nquads, sample, step, seed);
}
#endif

}  // namespace thermosample

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#endif

namespace thermosample {
#ifdef TS_HAVE_AVX512
bool have_normals_avx512() { return true; }
#else
void normals_avx512(float* z, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed) {
  normals_generic(z, q0, nquads, sample, step, seed);
}
void words_avx512(uint32_t* r, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed) {
  words_generic(r, q0, nquads, sample, step, seed);
}
bool have_normals_avx512() { return false; }
#endif
}  // namespace thermosample
