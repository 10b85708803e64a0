""" Tiny image-classification data on disk, in each format train.py reads (tests/test_data.py and
tests/test_finetune.py): 3 classes x 8 images per split, 16x16, every third image grayscale; each class
has its own brightness, so a model can learn it in a few steps. """
import numpy as np

CLASSES = ('cat', 'dog', 'emu')
PER_CLASS = 8
SPLITS = ('train', 'validation')


def images_and_labels(split: str, size: int = 16):
    """ [(PIL image, class index, coarse index)] for a split, the same on every call. """
    from PIL import Image
    rng = np.random.default_rng(SPLITS.index(split))
    rows = []
    for label in range(len(CLASSES)):
        for i in range(PER_CLASS):
            pixels = (rng.integers(0, 60, (size, size, 3)) + 90 * label).astype(np.uint8)
            image = Image.fromarray(pixels[..., 0], 'L') if i % 3 == 0 else Image.fromarray(pixels, 'RGB')
            rows.append((image, label, int(label > 0)))
    return rows


def _dataset(split, image_column='image', label_column='label', labels='class'):
    """ labels: 'class' (ClassLabel), 'string' (class names) or 'int' (plain integers). """
    import datasets
    rows = images_and_labels(split)
    label = {'class': datasets.ClassLabel(names=list(CLASSES)), 'string': datasets.Value('string'),
             'int': datasets.Value('int64')}[labels]
    features = datasets.Features({image_column: datasets.Image(), label_column: label,
                                  'coarse': datasets.ClassLabel(names=['cat', 'not_cat'])})
    return datasets.Dataset.from_dict({
        image_column: [image for image, _, _ in rows],
        label_column: [CLASSES[y] if labels == 'string' else y for _, y, _ in rows],
        'coarse': [c for _, _, c in rows],
    }, features=features)


def make_image_folder(root, val_folder='validation'):
    """ root/<split>/<class>/<n>.png, the layout of timm's and `datasets`' image folders. """
    for split in SPLITS:
        for n, (image, label, _) in enumerate(images_and_labels(split)):
            folder = root / (val_folder if split == 'validation' else split) / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f'{n}.png')
    return root


def make_saved_dataset(root, **columns):
    """ A DatasetDict written with save_to_disk (columns image, label, coarse; `columns`: see _dataset). """
    import datasets
    datasets.DatasetDict({split: _dataset(split, **columns) for split in SPLITS}).save_to_disk(root)
    return root


def make_parquet_dataset(root):
    """ root/<split>.parquet with CIFAR-100's column names (img, fine_label) and string labels. """
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _dataset(split, image_column='img', label_column='fine_label', labels='string').to_parquet(
            root / f'{split}.parquet')
    return root


BAD_IMAGES = {  # how an image file goes bad: its good bytes -> the bad ones
    'truncated': lambda good: good[:len(good) // 2],
    'text file': lambda good: b'not an image\n',
}


def spoil_image(path, how):
    """ Overwrite the image file at `path` with a bad one (a key of BAD_IMAGES). """
    path.write_bytes(BAD_IMAGES[how](path.read_bytes()))
    return path


def save_16bit_png(path, values):
    """ A 16-bit grayscale PNG (PIL mode I;16) of a 2-D array of 0..65535 values. """
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path)
    return path
