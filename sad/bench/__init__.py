"""Benchmarks of the pipeline's own cost (``sad bench``), one module per subject.

- ``peak``: the machine's matmul peak (the one measurement every MFU figure divides by) and model FLOP counts;
- ``env``: the environments' and experts' speed;
- ``training``: training throughput, MFU and memory; bf16 vs fp32;
- ``evaluation``: batched vs one-at-a-time play, prefill reuse, admissible scoring;
- ``gpu``: training MFU and rollout throughput on an accelerator (``python -m sad.bench.gpu``);
- ``suite``: the targets and the verdicts ``sad bench`` prints.

The Prefect and DVC overheads are measured in ``flows/bench.py`` (the library imports neither).
"""
