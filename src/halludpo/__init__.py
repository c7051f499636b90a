"""halludpo: self-generated preference data against object hallucination in vision-language models."""

__version__ = "0.1.0"

from halludpo import determinism as _determinism

_determinism.apply()  # before anything imports torch: the same CPU kernels on every x86-64 machine
