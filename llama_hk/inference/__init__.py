"""Inference: sampling, the decode loop, incremental detokenization, the Generator and its text front ends."""

from llama_hk.inference.chat import Chat, prompt_ids, read_prompt_file, run_chat, run_prompts, write_results
from llama_hk.inference.decode import bucket, cache_shape
from llama_hk.inference.detokenize import IncrementalDetokenizer
from llama_hk.inference.generator import Completion, GenerationStats, Generator, memory_report
from llama_hk.inference.sampling import Sampling

__all__ = ["Chat", "Completion", "GenerationStats", "Generator", "IncrementalDetokenizer", "Sampling", "bucket",
           "cache_shape", "memory_report", "prompt_ids", "read_prompt_file", "run_chat", "run_prompts",
           "write_results"]
