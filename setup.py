"""Build chanaxis_fast._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc is found.

Environment:
  FORCE_CUDA=1            compile the CUDA kernels even when the checks below say no
  FORCE_ONLY_CPU=1        never compile the CUDA kernels
  CUDA_HOME               CUDA toolkit (default: /usr/local/cuda when it has bin/nvcc)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default below; there may be no GPU to detect)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"
HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# torch.utils.cpp_extension reads CUDA_HOME when it is imported; without this it may pick /usr/local
# and then fail to link (cannot find -lcudart).
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
if _flag("FORCE_ONLY_CPU"):
    with_cuda, why = False, "FORCE_ONLY_CPU=1"
elif _flag("FORCE_CUDA"):
    with_cuda, why = True, "FORCE_CUDA=1"
elif torch.version.cuda is None:
    with_cuda, why = False, "torch is a CPU-only build"
elif not (nvcc and os.path.exists(nvcc)):
    with_cuda, why = False, "nvcc not found (set CUDA_HOME)"
else:
    with_cuda, why = True, "torch is a CUDA build and nvcc was found"

sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(HERE, "csrc")]
define_macros = []
# -ffp-contract=off: the CPU and CUDA kernels promise the same float64 operations (common/fp.h); a
# host compiler targeting FMA hardware (aarch64, -march=native) must not fuse a * b + c either.
extra_compile_args = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"]}
arch_list = ""
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    define_macros += [
        ("CHANAXIS_WITH_CUDA", None),
        ("CHANAXIS_CUDA_ARCH_LIST", f'"{arch_list}"'),
        ("CHANAXIS_CUDA_VERSION", f'"{torch.version.cuda}"'),
    ]
    # --fmad=false: no FMA contraction in device code, so the shared C10_HOST_DEVICE math of
    # csrc/common runs the CPU's operations (the determinants and hull steps also use the _rn
    # intrinsics of common/fp.h, which are never contracted whatever the flags).
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "--fmad=false",
                                  "-Xcompiler", "-ffp-contract=off"]
    # cublas_v2.h / cusparse.h ship in the pip wheels of CUDA 13, not always in CUDA_HOME.
    import site

    for sp in site.getsitepackages():
        include_dirs += glob.glob(os.path.join(sp, "nvidia", "cu*", "include"))

print("=" * 72)
print("chanaxis_fast build configuration")
print(f"  python         {sys.version.split()[0]}")
print(f"  torch          {torch.__version__} (CUDA {torch.version.cuda})")
print(f"  CUDA kernels   {'yes' if with_cuda else 'no'}: {why}")
print(f"  CUDA_HOME      {CUDA_HOME}")
print(f"  arch list      {arch_list or '-'}")
print(f"  sources        {len(sources)} ({sum(s.endswith('.cu') for s in sources)} .cu)")
print(f"  MAX_JOBS       {os.environ.get('MAX_JOBS', 'default')}")
print("=" * 72)

Extension = CUDAExtension if with_cuda else CppExtension
ext = Extension(
    "chanaxis_fast._C",
    sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args=extra_compile_args,
    extra_link_args=["-fopenmp"],
)

setup(
    name="chanaxis_fast",
    version="0.1.0",
    description="Two-axis channel statistics and pruning criteria for CNNs, with C++/CUDA kernels",
    packages=find_packages(include=["chanaxis_fast", "chanaxis_fast.*"]),
    package_data={"chanaxis_fast": ["METHOD.md", "weights/*.pt", "weights/*.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    entry_points={"console_scripts": ["chanaxis-fast=chanaxis_fast.cli:main"]},
)
