"""data layer of fedllm."""
