"""tracking layer of fedllm."""
