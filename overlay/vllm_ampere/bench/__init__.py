"""`vllm-ampere bench`: the random-prefix serving matrix, measured with `vllm bench serve`."""
