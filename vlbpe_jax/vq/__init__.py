"""VQ-GAN image tokenizer: image [B, H, W, 3] -> int32 codes [B, h, w] -> image."""
