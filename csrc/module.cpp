// thermosample._C: the fused solver step on CPU tensors (pybind11, no torch headers).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "thermosample fused CPU kernels";
  m.def("version", []() { return std::string("0.1.0"); });
}
