"""Build thermosample: the Python package, kernels/ as thermosample.kernels, and the C++ extension _C.

The extension is plain C++ with pybind11 (no torch headers), so `pip install .` needs no torch in the
build environment. It is optional: without a compiler the package installs and falls back to the
pure-PyTorch backend with one warning. DEBUG=1 builds with -O0 -g.
"""
import os
import sys

from setuptools import setup


def get_extensions():
    import platform

    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:  # pragma: no cover - pybind11 is in build-system.requires
        print("pybind11 missing: building without thermosample._C", file=sys.stderr)
        return []
    debug = os.environ.get("DEBUG", "0") == "1"
    compile_args = ["-O0", "-g"] if debug else ["-O3", "-fno-math-errno"]
    # The fused step is memory-bound, but the in-kernel Philox noise and the fp16 conversions are not:
    # target the build machine's vector ISA (AVX2/AVX-512) unless THERMOSAMPLE_MARCH says otherwise
    # (e.g. THERMOSAMPLE_MARCH=x86-64-v2 or x86-64 for a portable wheel, THERMOSAMPLE_MARCH= for the
    # default). The noise loop does not depend on it: csrc/noise_avx2.cpp and csrc/noise_avx512.cpp are
    # compiled for their ISA by target attributes/pragmas whatever -march is, and csrc/noise.cpp picks
    # one at run time from the CPU's features (THERMOSAMPLE_CPU=avx512|avx2|generic forces one).
    march = os.environ.get("THERMOSAMPLE_MARCH", "native")
    if march and not debug and sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
        compile_args += [f"-march={march}", "-mprefer-vector-width=512"]
    link_args = []
    if sys.platform.startswith("linux"):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    version = {}
    with open(os.path.join("thermosample", "_version.py")) as f:
        exec(f.read(), version)
    ext = Pybind11Extension(
        "thermosample._C",
        sources=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
        include_dirs=["csrc"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        cxx_std=17,
        define_macros=[("THERMOSAMPLE_VERSION", f'"{version["__version__"]}"')],
    )
    ext.optional = True  # a failed compile warns and leaves the torch backend in charge
    return [ext]


setup(
    packages=["thermosample", "thermosample.ops", "thermosample.apps", "thermosample.integrations",
              "thermosample.kernels"],
    package_dir={"thermosample.kernels": "kernels"},
    package_data={"thermosample": ["data/*", "py.typed"]},
    ext_modules=get_extensions(),
)
