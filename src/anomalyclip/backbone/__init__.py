"""CLIP backbone: the model, its tokenizer and loaders for every published weight layout."""

from anomalyclip.backbone.clip import CLIP, CLIPArchitecture, VisualFeatures
from anomalyclip.backbone.tokenizer import SimpleTokenizer, tokenize

__all__ = ["CLIP", "CLIPArchitecture", "SimpleTokenizer", "VisualFeatures", "tokenize"]
