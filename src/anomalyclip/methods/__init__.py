"""Scoring methods beyond the AnomalyCLIP model, each a :class:`~anomalyclip.predictor.Predictor`.

:mod:`anomalyclip.methods.musc`: MuSc (Li et al., ICLR 2024), zero-shot, no prompts and
no training: the images of a set score each other with a frozen CLIP's patch features.
"""
