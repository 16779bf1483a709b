"""The settings that describe a model's input, as plain values: the resize modes and
the normalisation constants.

Apart from :mod:`anomalyclip.preprocess` (which needs torch) so that configurations and
the command line's option lists can name them without loading torch.
"""

from __future__ import annotations

from typing import Literal, get_args

# CLIP's normalisation (OpenAI's preprocessing), used by AnomalyCLIP and MuSc.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# squash: the whole image resized to S x S (AnomalyCLIP); center-crop: the shorter side
# resized to S and the centre square kept (open_clip's transform, MuSc's).
ResizeMode = Literal["squash", "center-crop"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
