"""Data: TFDS datasets as the document layer (`sources`, `builders`), grain as the input pipeline (`pipeline`), and
the batch format they produce (`batch`)."""
