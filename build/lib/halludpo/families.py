"""The model families halludpo knows (kept free of heavy imports: the Snakefile validates against it)."""

FAMILIES = ("toy", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


class UnknownModelFamily(ValueError):
    pass


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise UnknownModelFamily(f"unknown model family {family!r}; valid families: {', '.join(FAMILIES)}")
    return family
