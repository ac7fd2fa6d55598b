"""fedllm: differentially private federated fine-tuning of causal LMs with LoRA.

Importing this package has no side effects; entry points live in :mod:`fedllm.cli`.
"""

__version__ = "0.1.0"
