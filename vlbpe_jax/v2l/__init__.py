"""V2L tokenizer: images as tokens of a frozen language model's own vocabulary."""
