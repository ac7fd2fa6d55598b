"""model layer of fedllm."""
