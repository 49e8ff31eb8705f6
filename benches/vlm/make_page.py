"""The VLM benches' one-tile test page: a 480x360 RGB image of seeded random pixels, written to
argv[1] (the same bytes on every run, so quire and its references read the same page)."""
import sys

import numpy as np
from PIL import Image

rng = np.random.RandomState(0)
Image.fromarray((rng.rand(480, 360, 3) * 255).astype(np.uint8)).save(sys.argv[1])
