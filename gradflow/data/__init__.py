"""EM membrane data: synthetic images, the ISBI 2012 slices, and on-device augmentation.

    data = load_data("synthetic", size=128, seed=0)       # or load_data("/path/to/isbi2012")
    x, y = augment_batch(data.train_images[:4], data.train_labels[:4], torch.Generator().manual_seed(0))
"""

from gradflow.data.augment import augment_batch
from gradflow.data.dataset import EMData, load_data
from gradflow.data.isbi import load_isbi
from gradflow.data.synthetic import synthetic_em

__all__ = ["load_data", "EMData", "augment_batch", "synthetic_em", "load_isbi"]
