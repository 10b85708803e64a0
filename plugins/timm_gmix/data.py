""" Datasets for train.py, all through Hugging Face `datasets` and timm's transforms.

    --dataset digits              built in: scikit-learn's 1,797 real 8x8 handwritten digits, no download;
                                  fixed train / validation / test split (60/20/20)
    --dataset hfds/<name>         `datasets.load_dataset(name)`: a Hub dataset, or a local folder of
                                  parquet/csv/images; --data-dir is the download cache, as in timm
    --dataset <folder>            a DatasetDict saved with `save_to_disk`, or any folder that
                                  `datasets.load_dataset` reads (parquet, csv, image folder)
    --dataset folder --data-dir D an image folder D/<split>/<class>/<image> (timm's layout; timm's
                                  empty --dataset means the same); val/ or valid/ count as validation

Images are converted to the model's channels (grayscale to RGB for a 3-channel model, RGB to L for a
1-channel one). Labels may be integers or strings (strings are numbered in sorted order); the number
of classes is read from the data.
"""
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config

from .config import UsageError, reason

SPLIT_SEED = 0  # the digits split and --train-subset: the same examples for every --seed
DIGITS_SPLITS = {'train': 0.6, 'validation': 0.2, 'test': 0.2}


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


def load_dataset_dict(name: str, data_dir=None):
    """ The DatasetDict that `--dataset` (and `--data-dir`) name. """
    import datasets

    if name == 'digits':
        return digits_dataset()
    if name in ('folder', ''):
        if not data_dir or not Path(data_dir).is_dir():
            raise UsageError(f'--data-dir {data_dir} is not a folder: give an image folder with one subfolder per '
                             f'split (train/, validation/), each with one subfolder of images per class')
        return _load(data_dir, datasets.load_dataset, 'imagefolder', data_dir=data_dir)
    if name.lower().startswith('hfds/'):
        path = name[len('hfds/'):]
        try:
            return datasets.load_dataset(path, cache_dir=data_dir)
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
    raise UsageError(f'unknown --dataset {name!r}: use digits, hfds/<Hub name or folder>, a folder with the data, '
                     f'or folder with --data-dir')


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
    return int(max(np.max(np.asarray(split[label_column])) for split in splits)) + 1


def _prepare_columns(train, val, image_column, label_column):
    """ Decode the image column as images, and number string labels (sorted, shared by both splits). """
    import datasets

    if not isinstance(train.features[image_column], datasets.Image):
        try:
            train, val = (split.cast_column(image_column, datasets.Image()) for split in (train, val))
        except Exception as e:
            raise UsageError(f'column {image_column!r} does not hold images ({reason(e)}): '
                             f'set --image-column') from e
    feature = train.features[label_column]
    if isinstance(feature, datasets.Value) and feature.dtype in ('string', 'large_string'):
        names = sorted(set(train[label_column]) | set(val[label_column]))
        label = datasets.ClassLabel(names=names)
        train, val = (split.cast_column(label_column, label) for split in (train, val))
    elif not (isinstance(feature, datasets.ClassLabel) or
              (isinstance(feature, datasets.Value) and feature.dtype.startswith(('int', 'uint')))):
        raise UsageError(f'column {label_column!r} holds {feature}, not class labels: set --label-column')
    return train, val


PIL_MODES = {1: 'L', 3: 'RGB'}


class ImageClassification(torch.utils.data.Dataset):
    """ (image tensor, label) pairs from a `datasets.Dataset`, through a timm transform. """

    def __init__(self, split, transform, image_column='image', label_column='label', in_chans=3):
        if in_chans not in PIL_MODES:
            raise UsageError(f'images are read as grayscale or RGB, so the model must take 1 or 3 channels, '
                             f'not {in_chans}: set --in-chans 1 or 3')
        self.split = split
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.pil_mode = PIL_MODES[in_chans]

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        row = self.split[index]
        return self.transform(row[self.image_column].convert(self.pil_mode)), row[self.label_column]


def _split(dsets, name, flag):
    if name not in dsets:
        raise UsageError(f'split {name!r} not found (the data has {", ".join(dsets)}): set {flag}')
    return dsets[name]


def load_splits(args):
    """ The train and validation splits and their number of classes, after checking the columns and the
    label range (all before the model is built or training starts). """
    dsets = load_dataset_dict(args.dataset, args.data_dir)
    train, val = _split(dsets, args.train_split, '--train-split'), _split(dsets, args.val_split, '--val-split')
    for name, split in ((args.train_split, train), (args.val_split, val)):
        for column, flag in ((args.image_column, '--image-column'), (args.label_column, '--label-column')):
            if column not in split.column_names:
                raise UsageError(f'column {column!r} not in split {name!r} (columns: '
                                 f'{", ".join(split.column_names)}): set {flag}')
    train, val = _prepare_columns(train, val, args.image_column, args.label_column)
    num_classes = num_classes_of((train, val), args.label_column)
    for name, split in ((args.train_split, train), (args.val_split, val)):
        labels = np.asarray(split[args.label_column])
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UsageError(f'labels of split {name!r} run from {labels.min()} to {labels.max()}, outside '
                             f'0..{num_classes - 1}: fix the labels or the label column')
    if args.train_subset is not None:
        keep = max(1, round(args.train_subset * len(train)))
        train = train.shuffle(seed=SPLIT_SEED).select(range(keep))
    return train, val, num_classes


def with_transforms(train, val, args, model):
    """ torch datasets applying timm's train/eval transforms for `model`, and the resolved data config. """
    data_config = resolve_data_config(vars(args), model=model)
    in_chans = data_config['input_size'][0]
    for key in ('mean', 'std'):  # a model made for a different number of channels (e.g. --in-chans 1)
        if len(data_config[key]) != in_chans:
            data_config[key] = (float(np.mean(data_config[key])),) * in_chans
    train_tf = create_transform(
        **data_config, is_training=True, hflip=args.hflip, scale=args.scale, ratio=args.ratio,
        color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount)
    eval_tf = create_transform(**data_config, is_training=False)
    columns = dict(image_column=args.image_column, label_column=args.label_column, in_chans=in_chans)
    return ImageClassification(train, train_tf, **columns), ImageClassification(val, eval_tf, **columns), data_config
