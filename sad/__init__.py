"""Structured Agent Distillation (SAD): the library.

Pure Python: environments, the ReAct agent loop, segmentation, schemas, losses, training,
metrics and registry helpers. Nothing here imports Prefect or DVC; orchestration lives in
``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"
