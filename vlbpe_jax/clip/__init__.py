"""Small contrastive image-text model (OpenAI-CLIP layout) for the shapes data.

config.py (CLIPConfig, VARIANTS), model.py (CLIP: encode_image / encode_text / patch_features),
towers.py, layers.py, loss.py (InfoNCE), features.py (BLIP3-o target pooling), text.py (ids
convention: pad 0, pool at the last non-pad token), zero_shot.py, hf.py + hf_config.py (Hugging
Face CLIPModel weights).
"""
