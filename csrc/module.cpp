// thermosample._C: the fused solver step on CPU tensors (pybind11, no torch headers).
//
// thermosample/ops/cpp.py allocates the outputs with torch and passes raw data pointers (t.data_ptr()) as
// integers with the sizes and a dtype code; the computation runs without the GIL. The arguments were
// checked in Python (thermosample/ops/contract.py); this entry refuses what would touch memory out of
// bounds or crash the process (null pointers, too many inputs, u/d past them, a thread count OpenMP cannot
// start) and an `out` or `rate` that partially overlaps another buffer (the kernel would read values it has
// already overwritten), since it takes raw addresses from anyone.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused_step.h"
#include "noise.h"

// The package version, passed by setup.py from thermosample/_version.py (the one place it is written).
#ifndef THERMOSAMPLE_VERSION
#define THERMOSAMPLE_VERSION "unknown"
#endif

namespace py = pybind11;
namespace ts = thermosample;

namespace {

constexpr int64_t kElementSize[] = {4, 8, 2, 2};   // bytes per element, indexed by ts::DType

bool intersects(uintptr_t a, int64_t a_bytes, uintptr_t b, int64_t b_bytes) {
  return a < b + uintptr_t(b_bytes) && b < a + uintptr_t(a_bytes);
}

// Each buffer is contiguous: [p, p + bytes). `out` may be exactly one of the inputs (each element is read
// before it is written) but must not otherwise share memory with one; `rate` shares memory with nothing.
void check_no_partial_overlap(const std::vector<uintptr_t>& inputs, uintptr_t out, uintptr_t rate, int64_t bytes,
                              int64_t batch) {
  const int64_t rate_bytes = batch * int64_t(sizeof(float));
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (inputs[k] != out && intersects(inputs[k], bytes, out, bytes))
      throw std::invalid_argument("fused_step: out partially overlaps inputs[" + std::to_string(k) + "]");
    if (intersects(inputs[k], bytes, rate, rate_bytes))
      throw std::invalid_argument("fused_step: rate overlaps inputs[" + std::to_string(k) + "]");
  }
  if (intersects(out, bytes, rate, rate_bytes)) throw std::invalid_argument("fused_step: rate overlaps out");
}

void fused_step_py(const std::vector<uintptr_t>& inputs, const std::vector<double>& coeffs, uintptr_t out,
                   uintptr_t rate, int64_t batch, int64_t numel, int dtype, double noise, uint64_t seed,
                   uint32_t step, uint32_t sample_offset, bool track, double alpha, double beta, int u, int d,
                   int num_threads) {
  if (inputs.empty() || inputs.size() > size_t(ts::kMaxInputs) || coeffs.size() != inputs.size())
    throw std::invalid_argument("fused_step: need 1 to " + std::to_string(ts::kMaxInputs) +
                                " inputs and one coefficient per input");
  if (dtype < ts::kFloat32 || dtype > ts::kBFloat16) throw std::invalid_argument("fused_step: bad dtype code");
  if (batch < 0 || numel < 0) throw std::invalid_argument("fused_step: negative size");
  if (batch > 0 && numel > INT64_MAX / 8 / batch) throw std::invalid_argument("fused_step: size overflows");
  if (track && (u < 0 || d < 0 || u >= int(inputs.size()) || d >= int(inputs.size())))
    throw std::invalid_argument("fused_step: u and d must index inputs");
  // Raw addresses from Python: refuse a null one (ValueError) rather than crash. Empty samples (numel 0,
  // whose tensors may have no storage) read and write nothing but the rate.
  if (batch > 0 && rate == 0) throw std::invalid_argument("fused_step: rate is a null pointer");
  if (batch > 0 && numel > 0) {
    for (size_t k = 0; k < inputs.size(); ++k)
      if (inputs[k] == 0) throw std::invalid_argument("fused_step: inputs[" + std::to_string(k) + "] is a null pointer");
    if (out == 0) throw std::invalid_argument("fused_step: out is a null pointer");
  }
  if (num_threads < 1 || num_threads > ts::kMaxThreads)
    throw std::invalid_argument("fused_step: num_threads must be in [1, " + std::to_string(ts::kMaxThreads) +
                                "], got " + std::to_string(num_threads));
  if (batch > 0 && numel > 0) check_no_partial_overlap(inputs, out, rate, batch * numel * kElementSize[dtype], batch);
  ts::StepArgs a;
  a.n_inputs = int(inputs.size());
  for (int k = 0; k < a.n_inputs; ++k) {
    a.inputs[k] = reinterpret_cast<const void*>(inputs[size_t(k)]);
    a.coeffs[k] = coeffs[size_t(k)];
  }
  a.out = reinterpret_cast<void*>(out);
  a.rate = reinterpret_cast<float*>(rate);
  a.batch = batch;
  a.numel = numel;
  a.dtype = dtype;
  a.noise = noise;
  a.seed = seed;
  a.step = step;
  a.sample_offset = sample_offset;
  a.track = track;
  a.alpha = track ? alpha : 0.0;
  a.beta = track ? beta : 0.0;
  a.u = u;
  a.d = d;
  a.num_threads = num_threads;
  py::gil_scoped_release release;
  ts::fused_step(a);
}

void philox_normal_py(uintptr_t z, int64_t first, int64_t count, uint32_t sample, uint32_t step, uint64_t seed) {
  if (count < 0 || first < 0) throw std::invalid_argument("philox_normal: negative range");
  if (count > 0 && z == 0) throw std::invalid_argument("philox_normal: z is a null pointer");
  py::gil_scoped_release release;
  ts::philox_normal(reinterpret_cast<float*>(z), first, count, sample, step, seed);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "thermosample fused CPU kernels";
  ts::noise_path();   // pick the noise path (CPU features, THERMOSAMPLE_CPU) once, at load
  m.def("version", []() { return std::string(THERMOSAMPLE_VERSION); });
  m.attr("FLOAT32") = int(ts::kFloat32);
  m.attr("FLOAT64") = int(ts::kFloat64);
  m.attr("FLOAT16") = int(ts::kFloat16);
  m.attr("BFLOAT16") = int(ts::kBFloat16);
  m.attr("MAX_INPUTS") = ts::kMaxInputs;
  m.attr("MAX_THREADS") = ts::kMaxThreads;
  m.def("fused_step", &fused_step_py, py::arg("inputs"), py::arg("coeffs"), py::arg("out"), py::arg("rate"),
        py::arg("batch"), py::arg("numel"), py::arg("dtype"), py::arg("noise"), py::arg("seed"), py::arg("step"),
        py::arg("sample_offset"), py::arg("track"), py::arg("alpha"), py::arg("beta"), py::arg("u"), py::arg("d"),
        py::arg("num_threads"),
        "Fused solver step on raw contiguous CPU buffers (pointers as ints); see thermosample/ops/cpp.py.");
  m.def("philox_normal", &philox_normal_py, py::arg("z"), py::arg("first"), py::arg("count"), py::arg("sample"),
        py::arg("step"), py::arg("seed"),
        "Standard normals (float32) of one sample's Philox stream, elements [first, first + count).");
  m.def("cpu_path", []() { return std::string(ts::noise_path().name); },
        "The CPU path generating the in-kernel noise: 'avx512', 'avx2' or 'generic' (chosen once per process "
        "from the CPU's features, or forced by THERMOSAMPLE_CPU=avx512|avx2|generic|scalar).");
  m.def("cpu_path_requested", []() { return std::string(ts::noise_path().requested); },
        "THERMOSAMPLE_CPU as read when the path was chosen ('' when unset).");
  m.def("philox_words", [](uintptr_t r, uint64_t q0, int64_t nquads, uint32_t sample, uint32_t step, uint64_t seed) {
        if (nquads < 0) throw std::invalid_argument("philox_words: negative count");
        if (nquads > 0 && r == 0) throw std::invalid_argument("philox_words: r is a null pointer");
        uint32_t* out = reinterpret_cast<uint32_t*>(r);
        py::gil_scoped_release release;
        for (int64_t i = 0; i < nquads; i += 512) {
          const int n = int(std::min<int64_t>(512, nquads - i));
          ts::noise_path().words(out + 4 * i, q0 + uint64_t(i), n, sample, step, seed);
        }
      }, py::arg("r"), py::arg("q0"), py::arg("nquads"), py::arg("sample"), py::arg("step"), py::arg("seed"),
      "Raw Philox4x32-10 words (uint32 [nquads, 4]) of quads q0 .. q0 + nquads - 1 from the active CPU path.");
  m.def("cpu_paths", []() {
        const char* names[8];
        const int n = ts::available_noise_paths(names, 8);
        return std::vector<std::string>(names, names + n);
      }, "The noise paths this build and CPU can run, best first.");
}
