"""Data: TFDS datasets as the document layer (`sources`, `builders`), grain as the input pipeline (`pipeline`), and
LLaMA-style sentencepiece training (`tokenizer_training`)."""
