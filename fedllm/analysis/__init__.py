"""Reading finished runs and sweeps: used by `fedllm report` and the notebooks."""
