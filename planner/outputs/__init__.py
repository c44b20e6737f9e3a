"""Outputs of a search: the Plan and its YAML (`plan`), the HTML/PNG report (`report`), and exporters to
torchtitan, Megatron-LM and DeepSpeed (`export`)."""
