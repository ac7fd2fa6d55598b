"""federation layer of fedllm."""
