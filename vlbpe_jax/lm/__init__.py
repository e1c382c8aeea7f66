"""Being-VL's unified LM: decoder, generation, staged unfreezing, Hugging Face import/export."""
