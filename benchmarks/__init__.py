"""Benchmarks comparing peftkit with Hugging Face PEFT; run ``python -m benchmarks.lora_vs_hf``."""
