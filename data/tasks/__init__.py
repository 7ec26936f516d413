"""Fine-tuning tasks: examples from TFDS and local files (sources), SQuAD windows and answers (qa)."""
