# Object verifiers: two small learned classifiers (verifier=toy), trained once per data set on its training split and
# shared by experiments (like the base model). Defined only when the configured method uses them (SENTINEL; APASI
# with method.verify, the verified-APASI extension) and they are learned: not the verifier.oracle ablation, and not
# the zero-shot detectors of verifier=detector (pretrained; the pairs rules load them directly).
from halludpo.mixing import method_config_keys, pair_methods, uses_verifiers

try:
    PAIR_METHODS = pair_methods(CFG.method)
except ValueError as err:
    raise WorkflowError(str(err)) from None
USES_SENTINEL = "sentinel" in PAIR_METHODS
NEEDS_VERIFIERS = uses_verifiers(CFG.method) and CFG.verifier.kind == "toy" and not CFG.verifier.oracle

if NEEDS_VERIFIERS:

    rule train_verifiers:
        """Verifiers A and B (verifier.kinds) on the training split's annotations; scored on the held-out split."""
        input:
            code=code("verifiers"),
            data=str(paths.data_done(CFG)),
        output:
            str(paths.verifiers_marker(CFG)),
        params:
            config=subtree("verifier.kind", "verifier.kinds", "verifier.train", "verifier.evaluate_on", "data"),
        threads: 1  # torch.set_num_threads(1): tiny models train faster on one thread; runs beside pretrain_base
        conda:
            CONDA_ENV
        log:
            RESULTS / "logs" / f"train_verifiers_{CFG.data.name}.log",
        benchmark:
            RESULTS / "benchmarks" / f"train_verifiers_{CFG.data.name}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} " + stage("verifiers", "train_verifiers") + " > {log} 2>&1"
