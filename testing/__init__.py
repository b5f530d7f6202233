"""Test doubles that tests and benchmarks share (kept out of the product packages): a scriptable
OpenAI-compatible server for the MLLM grader, and a tiny image-text imagefolder (images.py). Tiny and real-size random SDXL builders live in sharpening/tiny.py,
because the toy world and the smoke/GPU scripts build models with them too."""
