"""Small contrastive image-text model (OpenAI-CLIP layout) for the shapes data.

model.py (config, towers wiring), towers.py, layers.py, loss.py (InfoNCE), features.py (BLIP3-o
target pooling), text.py (ids convention), zero_shot.py, hf.py (Hugging Face CLIPModel weights).
"""
