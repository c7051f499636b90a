"""The CPU kernel choices that make float results differ between processors, pinned for every stage.

PyTorch's CPU build picks its kernels by what the processor offers: ATen's vectorised kernels (AVX2 or AVX-512
width, so a different summation order in reductions, softmax and norms), MKL's GEMM code path (per instruction set
and per vendor) and oneDNN's ISA. Two machines of one kind can therefore train different toy models from the same
config. Pinning all three at the AVX2 level -- which every x86-64 server CPU of the last ten years has, Intel and
AMD alike -- makes the kernel level the same on every such machine; the thread count is fixed by the rules as well
(OMP_NUM_THREADS = the rule's threads, MKL_DYNAMIC/OMP_DYNAMIC off), because it decides how reductions are split.
Measured: the same model_0 on AMD EPYC machines under any requested level, another one on an Intel Xeon (MKL's
vendor-specific paths are the likely rest: docs/findings.md).

The variables are read when torch (and MKL) load, so they must be in the environment before `import torch`:
the Snakefile exports them in every stage's command, and importing halludpo sets them when torch is not loaded yet.
Set HALLUDPO_CPU_KERNELS=native to keep the machine's own choice (faster on AVX-512 machines, not reproducible
across CPUs). Nothing here affects CUDA kernels.
"""

from __future__ import annotations

import os
import platform
import sys

# MKL_CBWR "AVX2,STRICT": MKL's conditional numerical reproducibility at the AVX2 code path, STRICT so that the
# result does not depend on memory alignment either. ONEDNN_MAX_CPU_ISA caps oneDNN's JIT at AVX2.
PINNED_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pinned_env(environ: dict | None = None) -> dict[str, str]:
    """The variables to set for reproducible CPU kernels: empty off x86-64 or when HALLUDPO_CPU_KERNELS=native."""
    environ = os.environ if environ is None else environ
    if environ.get("HALLUDPO_CPU_KERNELS", "avx2") == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return dict(PINNED_CPU_KERNELS)


def shell_exports() -> str:
    """`VAR=value ...` prefix for a stage's shell command."""
    return " ".join(f"{k}={v}" for k, v in pinned_env().items())


def apply() -> None:
    """Put the pinned variables into this process's environment if torch has not been imported yet (after that
    they no longer take effect; the stage's shell command sets them before Python starts)."""
    if "torch" in sys.modules:
        return
    os.environ.update(pinned_env())
