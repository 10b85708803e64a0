""" Datasets for train.py, all through Hugging Face `datasets` and timm's transforms.

    --dataset '' with DIR         timm's default: an image folder DIR/<split>/<class>/<image>, DIR from
                                  `train.py DIR` or --data-dir, found as timm's folder reader finds it
                                  but with every format Pillow reads; val/, valid/, eval/ count as
                                  validation
    --dataset folder              the same (an alias)
    --dataset digits              built in: scikit-learn's 1,797 real 8x8 handwritten digits, no download;
                                  fixed train / validation / test split (60/20/20)
    --dataset hfds/<name>         `datasets.load_dataset(name)`: a Hub dataset, or a local folder of
                                  parquet/csv/images; --data-dir is the download cache, as in timm
    --dataset <folder>            a DatasetDict saved with `save_to_disk`, or any folder that
                                  `datasets.load_dataset` reads (parquet, csv, image folder)
    --dataset torch/<name>        timm's torchvision datasets (torch/fashion_mnist, torch/mnist, torch/cifar10, ...)
                                  on --data-dir ROOT, --dataset-download as in timm (see torch_datasets.py)

timm's other readers (tfds/, wds/, hfids/) are not read here. The image column is the first of
image, img (or --input-key); the label column the first of label, labels, fine_label (or --target-key).
Labels may be integers or strings (strings are numbered in sorted order, or by --class-map); the number
of classes is read from the data. Images are decoded by `ImageClassification` (so that an unreadable file
is reported by name) and converted to --input-img-mode, by default the model's channels (L or RGB).
"""
import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError, reason

SPLIT_SEED = 0  # the digits split and --train-subset: the same examples for every --seed
DIGITS_SPLITS = {'train': 0.6, 'validation': 0.2, 'test': 0.2}
IMAGE_KEYS = ('image', 'img')  # --input-key unset: the first of these in the data
LABEL_KEYS = ('label', 'labels', 'fine_label')  # --target-key unset
TIMM_READERS = ('tfds/', 'wds/', 'hfids/')
READ_HERE = ('an image folder (train.py DIR), hfds/<Hub name or folder>, torch/<name>, a folder with the data, '
             'or digits')
IMAGE_FLAG, LABEL_FLAG = '--image-column (--input-key)', '--label-column (--target-key)'


def digits_dataset():
    """ scikit-learn's bundled digits as a DatasetDict of PIL images, split once with a fixed seed. """
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8), mode='L') for img in digits.images]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    features = datasets.Features({
        'image': datasets.Image(),
        'label': datasets.ClassLabel(names=[str(d) for d in range(10)]),
    })
    splits, start = {}, 0
    for i, (name, fraction) in enumerate(DIGITS_SPLITS.items()):
        stop = len(order) if i == len(DIGITS_SPLITS) - 1 else start + round(fraction * len(order))
        idx = order[start:stop]
        splits[name] = datasets.Dataset.from_dict(
            {'image': [images[j] for j in idx], 'label': digits.target[idx].tolist()}, features=features)
        start = stop
    return datasets.DatasetDict(splits)


def load_dataset_dict(name: str, data_dir=None, trust_remote_code=False, splits=(), download=False):
    """ The DatasetDict that `--dataset` (and `--data-dir`) name; `splits`, the ones to be read from it;
    `download` (--dataset-download) for timm's torch/ datasets. """
    import datasets

    if name == 'digits':
        return digits_dataset()
    if name.partition('/')[0].lower() == 'torch' and '/' in name:
        from .torch_datasets import torch_dataset_dict
        return torch_dataset_dict(name, data_dir, download, splits)
    if name in ('folder', ''):
        if not data_dir:
            raise UsageError('no data given: pass train.py DIR or --data-dir DIR (an image folder), or --dataset '
                             '(hfds/<name>, a folder with the data, or digits)')
        if not Path(data_dir).is_dir():
            raise UsageError(f'--data-dir {data_dir} is not a folder: give an image folder with one subfolder per '
                             f'split (train/, validation/), each with one subfolder of images per class')
        return image_folder(data_dir, splits)
    if name.lower().startswith(TIMM_READERS):
        raise UsageError(f'--dataset {name}: timm\'s {name.split("/")[0]}/ datasets are not read here; use '
                         f'{READ_HERE}')
    if name.lower().startswith('hfds/'):
        path = name[len('hfds/'):]
        # datasets >= 4 runs no loading scripts (it ignores the flag with a logged error): pass it only when set
        remote = {'trust_remote_code': True} if trust_remote_code else {}
        try:
            return datasets.load_dataset(path, cache_dir=data_dir, **remote)
        except Exception as e:  # datasets and huggingface_hub raise many kinds for a name they cannot get
            raise UsageError(
                f'could not load dataset {path!r} ({reason(e)}): check the name and the network; to train '
                f'offline, run datasets.load_dataset({path!r}).save_to_disk(DIR) where there is network and pass '
                f'--dataset DIR') from e
    folder = Path(name)
    if folder.is_dir():
        if (folder / 'dataset_dict.json').is_file():
            return _load(name, datasets.load_from_disk, name)
        if (folder / 'state.json').is_file():
            raise UsageError(f'{name} holds a single split saved with save_to_disk: save a DatasetDict with '
                             f'train and validation splits, e.g. dataset.train_test_split(0.2) (then --val-split test)')
        return _load(name, datasets.load_dataset, name)
    if '/' in name or Path(name).suffix:
        raise UsageError(f'dataset folder {name} does not exist: check --dataset (a Hub dataset is hfds/<name>)')
    raise UsageError(f'unknown --dataset {name!r}: use {READ_HERE}')


SPLIT_FOLDERS = {'train': ('train', 'training'), 'validation': ('validation', 'val', 'valid', 'eval', 'evaluation'),
                 'test': ('test', 'testing')}  # timm's split synonyms


# Formats Pillow identifies but does not decode by itself: stubs (HDF5, GRIB, BUFR, WMF), MPEG, EPS (Ghostscript).
NOT_DECODED = {'MPEG', 'EPS'}


def image_extensions() -> set:
    """ The extensions of every format Pillow decodes (timm's folder reader takes only .png, .jpg and .jpeg). """
    from PIL import Image, ImageFile

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in NOT_DECODED
            and not (isinstance(Image.OPEN[fmt][0], type) and issubclass(Image.OPEN[fmt][0], ImageFile.StubImageFile))}


def find_images(folder: Path, extensions: set):
    """ timm's `find_images_and_targets` with `extensions`: [(path, class)] of the image files below `folder`
    (symlinks followed) in natural order, the class being the name of the folder an image lies in ('' for
    `folder` itself); hidden files and folders (.ipynb_checkpoints, .DS_Store) are left out. Also the other files. """
    from timm.utils.misc import natural_key

    images, others = [], []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        rel = os.path.relpath(root, folder)
        label = '' if rel == '.' else os.path.basename(rel)
        for name in files:
            if not name.startswith('.'):
                path = os.path.join(root, name)
                (images if os.path.splitext(name)[1].lower() in extensions else others).append((path, label))
    return sorted(images, key=lambda k: natural_key(k[0])), sorted(path for path, _ in others)


def _some(paths, n=3) -> str:
    return ', '.join(map(str, paths[:n])) + (f' and {len(paths) - n} more' if len(paths) > n else '')


def image_folder(root, splits=()):
    """ timm's image folder, ROOT/<split>/<class>/.../<image>, read as timm's folder reader reads it (the class
    from the leaf folder's name) but with every format Pillow decodes, into a DatasetDict of image paths and labels.
    The classes are shared by all splits: every class folder of any split, empty ones included (so that a class
    without training images can be named), in timm's natural order. The folders of `splits` (the ones trained
    and validated on) must hold images, each in a class folder; files of other kinds are named in one warning. """
    import datasets
    from timm.utils.misc import natural_key

    root = Path(root)
    folders = {}
    for split, names in SPLIT_FOLDERS.items():
        folders.update({split: root / name for name in reversed(names) if (root / name).is_dir()})
    folders.update({p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith('.') and
                    p.name not in {name for names in SPLIT_FOLDERS.values() for name in names}})
    extensions = image_extensions()
    found, skipped = {}, []
    for split, folder in folders.items():
        images, others = find_images(folder, extensions)
        loose = [path for path, label in images if not label]
        if split in splits and not images:
            raise UsageError(f'split folder {folder} is empty' + (f' of images (it holds {_some(others)})' if others
                                                                  else '')
                             + f': put the {split} images in {folder}/<class>/<image>')
        if split in splits and loose:
            raise UsageError(f'{folder} holds {len(loose)} image(s) outside a class folder ({_some(loose)}): move '
                             f'them into {folder}/<class>/, the folder naming their class')
        skipped += others
        if images and not loose:
            found[split] = images
    if not found:
        raise UsageError(f'could not read the data in {root} (no image files in its subfolders): give image '
                         f'subfolders per split and class, DIR/train/<class>/<image>')
    if skipped:
        print(f'warning: {len(skipped)} file(s) of {root} are left out, their extensions being of no image format '
              f'Pillow reads: {_some(skipped)}', file=sys.stderr)
    names = {label for images in found.values() for _, label in images}
    names |= {p.name for split in found for p in folders[split].iterdir() if p.is_dir() and not p.name.startswith('.')}
    names = sorted(names, key=natural_key)
    features = datasets.Features({'image': datasets.Image(decode=False), 'label': datasets.ClassLabel(names=names)})
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {'image': [{'path': path, 'bytes': None} for path, _ in images],
         'label': [names.index(label) for _, label in images]}, features=features, split=split)
        for split, images in found.items()})


def _load(folder, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # an empty or unreadable folder
        raise UsageError(f'could not read the data in {folder} ({reason(e)}): give a save_to_disk folder, '
                         f'parquet/csv files, or image subfolders per split and class') from e


def num_classes_of(splits, label_column: str) -> int:
    """ From the ClassLabel feature, else the largest label in any of `splits` plus one. """
    feature = splits[0].features[label_column]
    if hasattr(feature, 'num_classes'):
        return feature.num_classes
    return int(max(np.max(label_array(split, label_column)) for split in splits)) + 1


def label_array(split, label_column: str) -> np.ndarray:
    """ The labels of a split as one array, read column-wise (`np.asarray(split[column])` goes row by row through
    `datasets`' formatting: about a second per 60,000 rows). """
    return split.with_format('arrow', columns=[label_column])[:].column(label_column).to_numpy()


def load_class_map(path) -> list:
    """ timm's --class-map: a text file with one class name per line (line index = label), or a pickled
    dict {class name: label}; the class names in label order. """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'--class-map {path} is not a file: give a text file with one class name per line')
    if path.suffix in ('.pkl', '.pickle'):
        with open(path, 'rb') as f:
            class_to_idx = pickle.load(f)
    else:
        class_to_idx = {line.strip(): i for i, line in enumerate(path.read_text().splitlines())}
    names = sorted(class_to_idx, key=class_to_idx.get)
    if [class_to_idx[n] for n in names] != list(range(len(names))):
        raise UsageError(f'--class-map {path} must number its classes 0..N-1, each once: one class name per line')
    return names


def _is_labels(feature) -> bool:
    import datasets
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(('int', 'uint')))


def _is_images(feature) -> bool:
    import datasets
    return isinstance(feature, datasets.Image) or (isinstance(feature, dict) and 'bytes' in feature)


def _check_mapped(present, names, class_map):
    missing = sorted(set(present) - set(names))
    if missing:
        raise UsageError(f'class {missing[0]!r} of the data is not in --class-map {class_map}: add it '
                         f'(one class name per line)')


def _label_classes(train, val, label_column, class_map):
    """ String labels and ClassLabel names numbered by --class-map (string labels: sorted without it). """
    import datasets

    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        if not class_map:
            return train, val
        names = load_class_map(class_map)
        _check_mapped(feature.names, names, class_map)
        lookup = [names.index(n) for n in feature.names]
        features = train.features.copy()
        features[label_column] = datasets.ClassLabel(names=names)
        return tuple(split.map(lambda y: {label_column: [lookup[i] for i in y]}, input_columns=label_column,
                               batched=True, features=features) for split in (train, val))
    if isinstance(feature, datasets.Value) and feature.dtype in ('string', 'large_string'):
        present = set(train[label_column]) | set(val[label_column])
        names = load_class_map(class_map) if class_map else sorted(present)
        _check_mapped(present, names, class_map)
        label = datasets.ClassLabel(names=names)
        return tuple(split.cast_column(label_column, label) for split in (train, val))
    if class_map:
        raise UsageError(f'--class-map maps class names, but column {label_column!r} holds numbers: drop --class-map')
    return train, val


def _prepare_columns(train, val, image_column, label_column, class_map=''):
    """ The image column as undecoded images (decoded by ImageClassification) and the labels numbered
    (string labels and --class-map), with one clear line for a column that holds the other kind. """
    import datasets

    feature = train.features[image_column]
    if _is_labels(feature):
        raise UsageError(f'column {image_column!r} holds class labels, not images: set {IMAGE_FLAG} to the '
                         f'image column')
    if isinstance(feature, datasets.Value) and feature.dtype in ('string', 'large_string') and len(train):
        first = train[0][image_column]  # image paths or URLs, which `datasets.Image` reads; not text
        if not (Path(first).is_file() or '://' in first):
            raise UsageError(f'column {image_column!r} holds text, not image files ({first!r} is no file): '
                             f'set {IMAGE_FLAG} to the image column')
    try:
        train, val = (split.cast_column(image_column, datasets.Image(decode=False)) for split in (train, val))
    except Exception as e:
        raise UsageError(f'column {image_column!r} does not hold images ({reason(e)}): set {IMAGE_FLAG}') from e
    feature = train.features[label_column]
    if _is_images(feature):
        raise UsageError(f'column {label_column!r} holds images, not class labels: set {LABEL_FLAG} to the '
                         f'label column')
    train, val = _label_classes(train, val, label_column, class_map)
    if not _is_labels(train.features[label_column]):
        raise UsageError(f'column {label_column!r} holds {feature}, not class labels: set {LABEL_FLAG}')
    return train, val


PIL_MODES = {1: 'L', 3: 'RGB'}


def _pil_mode(img_mode, in_chans):
    """ --input-img-mode, checked against the model's channels; by default L or RGB. """
    from PIL import ImageMode

    if img_mode is None:
        if in_chans not in PIL_MODES:
            raise UsageError(f'images are read as grayscale or RGB, so the model must take 1 or 3 channels, '
                             f'not {in_chans}: set --in-chans 1 or 3 (or --input-img-mode)')
        return PIL_MODES[in_chans]
    try:
        mode = ImageMode.getmode(img_mode)
    except KeyError:
        raise UsageError(f'--input-img-mode {img_mode} is not a PIL image mode: use L, RGB or RGBA') from None
    if mode.typestr != '|u1':  # what timm's transforms take; deeper images are scaled to 8 bits (as_8bit)
        raise UsageError(f'--input-img-mode {img_mode} is not 8 bits per channel: use L, RGB or RGBA')
    if len(mode.bands) != in_chans:
        raise UsageError(f'--input-img-mode {img_mode} gives {len(mode.bands)} channel(s), but the model takes '
                         f'{in_chans}: set --input-img-mode or --in-chans')
    return img_mode


def as_8bit(image):
    """ 16- and 32-bit grayscale as 8-bit L. PIL's own conversion to L or RGB clips at 255, which turns a
    16-bit image all white. Modes I;16* and I are read as 16-bit (clipped to 0..65535, then v >> 8, the top
    8 bits); F as 0..1 (v * 255, rounded, clipped). Other modes are returned as they are. """
    from PIL import Image

    if image.mode == 'F':
        pixels = np.clip(np.rint(np.asarray(image) * 255), 0, 255)
    elif image.mode == 'I' or image.mode.startswith('I;16'):
        pixels = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
    else:
        return image
    return Image.fromarray(pixels.astype(np.uint8))


class UnreadableImage(Exception):
    """ An image file that Pillow cannot decode; the message is the reason. """


def read_image(value, mode: str):
    """ The image of a `datasets.Image(decode=False)` value ({'bytes', 'path'}) in PIL mode `mode`. """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(value['bytes']) if value['bytes'] is not None else value['path']) as image:
            image.load()
            return as_8bit(image).convert(mode)
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        raise UnreadableImage('not an image file Pillow knows' if isinstance(e, UnidentifiedImageError)
                              else reason(e)) from e


class ImageClassification(torch.utils.data.Dataset):
    """ (image tensor, label) pairs from a `datasets.Dataset`, through a timm transform. Images are decoded
    here (from `datasets.Image(decode=False)` values, as load_splits returns them; decoded PIL images are
    taken as they are) and converted to `img_mode` (default: L for 1 channel, RGB for 3). An unreadable
    image is a UsageError naming it, or with `skip_bad_images` is replaced by the next readable example of
    the split (a warning on stderr the first time this process meets it; `skipped` holds their indices). """

    def __init__(self, split, transform, image_column='image', label_column='label', in_chans=3, img_mode=None,
                 skip_bad_images=False):
        self.split = split
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.pil_mode = _pil_mode(img_mode, in_chans)
        self.skip_bad_images = skip_bad_images
        self.skipped = set()

    def __len__(self):
        return len(self.split)

    def _image(self, value, index):
        if not isinstance(value, dict):  # already decoded by `datasets`
            return as_8bit(value).convert(self.pil_mode)
        try:
            return read_image(value, self.pil_mode)
        except UnreadableImage as e:
            where = value['path'] if value['bytes'] is None else (
                f'#{index} of split {self.split.split}' if self.split.split else f'#{index}')
            message = f'image {where} cannot be read ({e})'
        if not self.skip_bad_images:
            raise UsageError(f'{message}: fix or remove it, or pass --skip-bad-images')
        if index not in self.skipped:
            self.skipped.add(index)
            print(f'warning: {message}: skipped (--skip-bad-images), the next readable one used', file=sys.stderr)
        return None

    def __getitem__(self, index):
        for offset in range(len(self)):
            row = self.split[(index + offset) % len(self)]
            image = self._image(row[self.image_column], (index + offset) % len(self))
            if image is not None:
                return self.transform(image), row[self.label_column]
        raise UsageError('no image of the split can be read: fix the images or the image column')

    def __getitems__(self, indices, before=None):
        """ The examples at `indices`, in order, read from the data in one go (what a loader asks for a batch);
        `before(i)`, if given, is called before the i-th is decoded and transformed (to seed its augmentation). """
        rows = self.split[list(indices)]
        examples = []
        for i, (index, value, label) in enumerate(zip(indices, rows[self.image_column], rows[self.label_column])):
            if before is not None:
                before(i)
            image = self._image(value, index)
            examples.append(self[(index + 1) % len(self)] if image is None else (self.transform(image), label))
        return examples


def _split(dsets, name, flag):
    if name not in dsets:
        raise UsageError(f'split {name!r} not found (the data has {", ".join(dsets)}): set {flag}')
    return dsets[name]


def _column(split, split_name, key, candidates, flag):
    """ `key`, or when None the first of `candidates` in the split; present in the split. """
    if key is None:
        key = next((c for c in candidates if c in split.column_names), None)
        if key is None:
            raise UsageError(f'split {split_name!r} has no column {" or ".join(candidates)} (columns: '
                             f'{", ".join(split.column_names)}): set {flag}')
    if key not in split.column_names:
        raise UsageError(f'column {key!r} not in split {split_name!r} (columns: '
                         f'{", ".join(split.column_names)}): set {flag}')
    return key


def _first(split, n):
    """ The first `n` examples (timm's --train/val-num-samples sizes an iterable dataset; here it truncates). """
    return split if n is None else split.select(range(min(n, len(split))))


def check_classes(train, val, label_column: str, num_classes: int):
    """ Every class can be learned: at least two classes have training images, and none has validation images
    but no training images (it could only ever count as wrong). A class without validation images, or without
    any images, is a warning: training can go on, as in timm. """
    names = getattr(train.features[label_column], 'names', None) or [str(c) for c in range(num_classes)]
    in_train, in_val = (np.bincount(label_array(split, label_column).astype(np.int64), minlength=num_classes)
                        for split in (train, val))
    present = np.flatnonzero(in_train)
    if len(present) < 2:
        raise UsageError(f'the data has only one class ({names[present[0]]}): a classifier needs at least two; check '
                         f'--data-dir / the label column')
    for c in range(num_classes):
        if not in_train[c] and in_val[c]:
            raise UsageError(f'class {names[c]!r} has {in_val[c]} validation images but no training images: add '
                             f'training images of it, or remove it from the validation split')
    for what, missing in (('no validation images', in_train.astype(bool) & ~in_val.astype(bool)),
                          ('no images in either split', ~in_train.astype(bool) & ~in_val.astype(bool))):
        if missing.any():
            print(f'warning: {len(np.flatnonzero(missing))} class(es) have {what}: '
                  f'{", ".join(repr(names[c]) for c in np.flatnonzero(missing))}', file=sys.stderr)


def load_splits(args):
    """ The train and validation splits and their number of classes, after checking the columns and the
    labels (all before the model is built or training starts). The image column is left undecoded
    (`datasets.Image(decode=False)`) for ImageClassification; the resolved column names are written back
    to args.input_key and args.target_key. """
    dsets = load_dataset_dict(args.dataset, args.data_dir, args.dataset_trust_remote_code,
                              (args.train_split, args.val_split), getattr(args, 'dataset_download', False))
    train, val = _split(dsets, args.train_split, '--train-split'), _split(dsets, args.val_split, '--val-split')
    for name, split in ((args.train_split, train), (args.val_split, val)):
        args.input_key = _column(split, name, args.input_key, IMAGE_KEYS, IMAGE_FLAG)
        args.target_key = _column(split, name, args.target_key, LABEL_KEYS, LABEL_FLAG)
    train, val = _prepare_columns(train, val, args.input_key, args.target_key, args.class_map)
    num_classes = num_classes_of((train, val), args.target_key)
    for name, split in ((args.train_split, train), (args.val_split, val)):
        labels = label_array(split, args.target_key)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UsageError(f'labels of split {name!r} run from {labels.min()} to {labels.max()}, outside '
                             f'0..{num_classes - 1}: fix the labels or the label column')
    check_classes(train, val, args.target_key, num_classes)
    if args.train_subset is not None:
        keep = max(1, round(args.train_subset * len(train)))
        train = train.shuffle(seed=SPLIT_SEED).select(range(keep))
    return _first(train, args.train_num_samples), _first(val, args.val_num_samples), num_classes
