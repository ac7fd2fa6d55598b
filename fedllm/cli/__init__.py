"""cli layer of fedllm."""
