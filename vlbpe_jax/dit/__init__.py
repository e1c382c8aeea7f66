"""BLIP3-o's generator: Lumina-Next DiT (model.py), flow matching (flow.py), Euler sampler
(sampler.py) and the diffusers-layout import (hf.py)."""
