"""evaluation layer of fedllm."""
