"""privacy layer of fedllm."""
