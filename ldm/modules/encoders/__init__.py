"""Conditioning encoders (the frozen CLIP text encoder of SD v1)."""
