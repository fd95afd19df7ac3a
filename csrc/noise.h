// Run-time dispatch of the Philox normal generator (the only compute-bound loop of the fused step).
//
// philox_normals (philox.h) is compiled up to three times, each in its own translation unit:
//   generic  the portable C++ loops at the build's -march (fused_step.cpp; SSE2 for a plain x86-64 wheel,
//            auto-vectorised AVX-512 for a -march=native build on an AVX-512 machine)
//   avx2     hand-vectorised AVX2 + FMA, 8 quads per iteration (noise_avx2.cpp)
//   avx512   the portable loops compiled for AVX-512 with 512-bit vectors (noise_avx512.cpp)
// The first use picks the best path the CPU supports (__builtin_cpu_supports), or the one named by the
// environment variable THERMOSAMPLE_CPU (avx512 | avx2 | generic | scalar (= generic) | auto), read once.
// A forced path the CPU or the build lacks falls back to the automatic choice (cpu_path() tells which ran).
//
// Every path produces the same Philox integers bit for bit; the float32 log/sqrt/sincos of Box-Muller
// agree to a few ulp (FMA contraction differs between builds), as the cross-backend tests allow.
#pragma once

#include <cstdint>

namespace thermosample {

// Normals for elements [4 q0, 4 (q0 + nquads)) of one sample into z[0, 4 nquads); nquads <= kMaxQuads.
using NormalsFn = void (*)(float* z, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed);

// The raw Philox words r0..r3 of quads q0 .. q0 + nquads - 1 into r[4 nquads] (tests: the integers of
// each path against the reference, bit for bit).
using WordsFn = void (*)(uint32_t* r, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed);

void words_generic(uint32_t* r, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed);
void words_avx2(uint32_t* r, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed);
void words_avx512(uint32_t* r, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed);

void normals_generic(float* z, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed);
void normals_avx2(float* z, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed);
void normals_avx512(float* z, uint64_t q0, int nquads, uint32_t sample, uint32_t step, uint64_t seed);
bool have_normals_avx2();     // compiled in (x86-64 with GCC/clang); the CPU is checked separately
bool have_normals_avx512();

struct NoisePath {
  NormalsFn fn;
  WordsFn words;
  const char* name;           // "avx512", "avx2" or "generic"
  const char* requested;      // THERMOSAMPLE_CPU as read ("" when unset)
};

// The path in use, chosen on first call (thread-safe static initialisation; module.cpp calls it at load).
const NoisePath& noise_path();

// Paths this build and CPU can run, best first (always ends with "generic").
int available_noise_paths(const char** names, int max_names);

}  // namespace thermosample
