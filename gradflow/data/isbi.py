"""Read the ISBI 2012 EM segmentation training data (Arganda-Carreras et al. 2015).

Two layouts are accepted, both for a folder PATH:

* ``PATH/images/NN.png`` + ``PATH/labels/NN.png`` (PNG or TIFF slices paired by file stem), as
  redistributed in ``shared/data/isbi2012``;
* ``PATH/train-volume.tif`` + ``PATH/train-labels.tif``, the challenge's own multi-page TIFF stacks.

Challenge labels are 255 = cell interior, 0 = membrane (0/1 label images are accepted too); the
loader returns the training target, membrane = 1.
"""

from pathlib import Path

import numpy as np
import PIL.Image
import tifffile

from gradflow.errors import GradflowError

SLICE_SUFFIXES = (".png", ".tif", ".tiff")
STACK_FILES = ("train-volume.tif", "train-labels.tif")


def load_isbi(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return images (N, H, W) as stored, membrane labels (N, H, W) uint8 and one name per slice."""
    root = Path(path).expanduser()
    if root.is_file():
        raise GradflowError(f"'{root}' is a file: pass the folder that holds it (ISBI data is a folder)")
    if not root.is_dir():
        raise GradflowError(f"ISBI data folder '{root}' does not exist (for the built-in synthetic EM data, leave data at its default, 'synthetic')")
    volume, label_stack = (root / name for name in STACK_FILES)
    if volume.exists() or label_stack.exists():
        images, labels, names = read_stacks(volume, label_stack)
    elif (root / "images").is_dir() or (root / "labels").is_dir():
        images, labels, names = read_slices(root / "images", root / "labels")
    else:
        raise GradflowError(f"'{root}' holds neither images/ + labels/ folders nor {' + '.join(STACK_FILES)}")
    return images, membrane_from_labels(labels), names


def read_image(path: Path) -> np.ndarray:
    """One image file as an array (all pages of a TIFF, as stored); unreadable files are a user mistake."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path))
        with PIL.Image.open(path) as image:
            return np.asarray(image)
    except Exception as error:  # PIL and tifffile raise many types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GradflowError(f"cannot read '{path}': {reason}") from None


def read_stacks(volume: Path, label_stack: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The challenge's multi-page TIFFs: one page per slice in both files."""
    for path in (volume, label_stack):
        if not path.exists():
            raise GradflowError(f"'{path}' is missing: ISBI stacks need both {' and '.join(STACK_FILES)}")
    images, labels = read_page_stack(volume), read_page_stack(label_stack)
    if images.shape != labels.shape:
        raise GradflowError(f"'{volume.name}' has shape {images.shape} "
                            f"but '{label_stack.name}' has shape {labels.shape}")
    return images, labels, [f"{volume.name}[{i}]" for i in range(len(images))]


def read_page_stack(path: Path) -> np.ndarray:
    """A multi-page grayscale TIFF as (pages, H, W); a single page is a stack of one."""
    stack = read_image(path)
    stack = stack[None] if stack.ndim == 2 else stack
    if stack.ndim != 3:
        raise GradflowError(f"'{path}' should be a stack of grayscale pages, got array shape {stack.shape}")
    return stack


def read_slices(image_dir: Path, label_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image and label files paired by stem (``images/07.png`` with ``labels/07.png`` or ``07.tif``)."""
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise GradflowError(f"'{folder}' is missing: ISBI slices need both images/ and labels/ folders")
    image_files, label_files = slice_files(image_dir), slice_files(label_dir)
    if not image_files:
        raise GradflowError(f"no PNG or TIFF images in '{image_dir}'")
    unpaired = sorted(image_files.keys() ^ label_files.keys())
    if unpaired:
        stem = unpaired[0]
        lonely, other = (image_files[stem], label_dir) if stem in image_files else (label_files[stem], image_dir)
        raise GradflowError(f"'{lonely}' has no file named '{stem}.*' in '{other}'")
    names = sorted(image_files)
    images = [read_image(image_files[name]) for name in names]
    labels = [read_image(label_files[name]) for name in names]
    for name, image, label in zip(names, images, labels):
        if image.ndim != 2 or label.ndim != 2:
            raise GradflowError(f"'{image_files[name]}' and its label must be grayscale, "
                                f"got shapes {image.shape} and {label.shape}")
        if image.shape != label.shape:
            raise GradflowError(f"'{image_files[name]}' is {image.shape} but its label is {label.shape}")
        if image.shape != images[0].shape:
            raise GradflowError(f"ISBI images differ in shape: "
                                f"'{names[0]}' is {images[0].shape}, '{name}' is {image.shape}")
    return np.stack(images), np.stack(labels), names


def slice_files(folder: Path) -> dict[str, Path]:
    """Image files in `folder` by stem; two files with one stem (07.png, 07.tif) is ambiguous."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in SLICE_SUFFIXES and not path.name.startswith("."):
            if path.stem in files:
                raise GradflowError(f"'{files[path.stem]}' and '{path}' are both slice '{path.stem}'")
            files[path.stem] = path
    return files


def membrane_from_labels(labels: np.ndarray) -> np.ndarray:
    """Membrane = 1 from challenge labels (cell = 255 or 1, membrane = 0), thresholded at half scale."""
    cell_value = 255 if labels.max() > 1 else 1
    return (labels < cell_value / 2).astype(np.uint8)
