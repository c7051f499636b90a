"""halludpo: self-generated preference data against object hallucination in vision-language models."""

__version__ = "0.1.0"
