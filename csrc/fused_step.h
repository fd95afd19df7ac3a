// The fused solver step on raw CPU buffers (see thermosample/ops/reference.py for the contract).
#pragma once

#include <cstdint>

namespace thermosample {

// Storage dtype codes, shared with thermosample/ops/cpp.py.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

constexpr int kMaxInputs = 6;  // exported as _C.MAX_INPUTS: thermosample/ops/cpp.py checks it on load
constexpr int kMaxThreads = 1024;  // exported as _C.MAX_THREADS: the most threads one step may ask OpenMP for

// Mirrored field for field by StepArgs in thermosample/ops/contract.py, which checks the arguments.
struct StepArgs {
  const void* inputs[kMaxInputs] = {};  // each [batch, numel], contiguous (unused slots null)
  double coeffs[kMaxInputs] = {};
  int n_inputs = 0;
  void* out = nullptr;         // [batch, numel]; may equal one of `inputs` exactly (in-place)
  float* rate = nullptr;       // [batch]
  int64_t batch = 0;
  int64_t numel = 0;           // elements per sample
  int dtype = kFloat32;
  double noise = 0.0;          // coefficient of the Philox normal stream; 0 draws none
  uint64_t seed = 0;
  uint32_t step = 0;
  uint32_t sample_offset = 0;
  bool track = false;
  double alpha = 0.0, beta = 0.0;
  int u = 0, d = 1;
  int num_threads = 0;         // <= 0: the OpenMP default (the Python entry passes 1..kMaxThreads)
};

// out = sum_k coeffs[k] inputs[k] + noise z;  rate[b] = sum (alpha in[u] + beta in[d])^2 (track) + sum 0 out,
// out as stored (NaN where the stored out[b] is non-finite, an fp16/bf16 overflow to inf included).
// Deterministic: fixed-size chunks (kPart) reduce in a fixed order; the chunk partials of a sample are
// summed in double in chunk order, whatever the thread count, batch composition or alignment.
void fused_step(const StepArgs& args);

// Standard normals [count] for elements [first, first + count) of one sample (tests and debugging).
void philox_normal(float* z, int64_t first, int64_t count, uint32_t sample, uint32_t step, uint64_t seed);

}  // namespace thermosample
