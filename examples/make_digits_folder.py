"""Writes scikit-learn's digits as an image folder (PNG, one sub-folder per class) for the tour."""
import os
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

root = sys.argv[1]
d = load_digits()
for i, (img, y) in enumerate(zip(d.images, d.target)):
    os.makedirs(f"{root}/{y}", exist_ok=True)
    Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((16, 16), Image.NEAREST).save(f"{root}/{y}/{i:04d}.png")
