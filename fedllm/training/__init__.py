"""training layer of fedllm."""
