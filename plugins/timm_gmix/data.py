""" Datasets for train.py, all through Hugging Face `datasets` and timm's transforms.

    digits              built in: scikit-learn's 1,797 real 8x8 handwritten digits, no download;
                        fixed train / validation / test split (60/20/20)
    hfds/<name>         `datasets.load_dataset(name)` (a Hub name, or a local folder of parquet/csv/...)
    <save_to_disk dir>  `datasets.load_from_disk`
    folder              an image folder, `--data-dir` with one subfolder per split, as timm reads it
"""
import os
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config

from .config import UsageError

DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = {'train': 0.6, 'validation': 0.2, 'test': 0.2}


def digits_dataset():
    """ scikit-learn's bundled digits as a DatasetDict of PIL images, split once with a fixed seed. """
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8), mode='L') for img in digits.images]
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
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
    if name == 'folder':
        if not data_dir or not Path(data_dir).is_dir():
            raise UsageError(f'--data-dir {data_dir} is not a folder: give an image folder with one '
                             f'subfolder per split (train/, validation/), each with one subfolder per class')
        return datasets.load_dataset('imagefolder', data_dir=data_dir)
    if Path(name).is_dir() and (Path(name) / 'dataset_dict.json').is_file():
        return datasets.load_from_disk(name)
    if name.startswith('hfds/'):
        try:
            return datasets.load_dataset(name[len('hfds/'):], data_dir=data_dir)
        except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
            hint = ' (offline: set HF_DATASETS_OFFLINE=0 with network, or save it with save_to_disk and pass ' \
                   'that folder)' if os.environ.get('HF_DATASETS_OFFLINE') or os.environ.get('HF_HUB_OFFLINE') else ''
            raise UsageError(f'could not load dataset {name!r}: {str(e).splitlines()[0]}{hint}')
    raise UsageError(f'unknown --dataset {name!r}: use digits, hfds/<name or path>, a save_to_disk folder, '
                     f'or folder with --data-dir')


def num_classes_of(split, label_column: str) -> int:
    feature = split.features[label_column]
    return feature.num_classes if hasattr(feature, 'num_classes') else int(max(split[label_column])) + 1


class ImageClassification(torch.utils.data.Dataset):
    """ (image tensor, label) pairs from a `datasets.Dataset`, through a timm transform. """

    def __init__(self, split, transform, image_column='image', label_column='label', in_chans=3):
        self.split = split
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.pil_mode = 'RGB' if in_chans == 3 else 'L'

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
    for column in (args.image_column, args.label_column):
        if column not in train.column_names:
            flag = '--image-column' if column == args.image_column else '--label-column'
            raise UsageError(f'column {column!r} not in the data (columns: {", ".join(train.column_names)}): '
                             f'set {flag}')
    num_classes = num_classes_of(train, args.label_column)
    for name, split in ((args.train_split, train), (args.val_split, val)):
        labels = np.asarray(split[args.label_column])
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UsageError(f'labels of split {name!r} run from {labels.min()} to {labels.max()}, outside '
                             f'0..{num_classes - 1}: fix the labels or the label column')
    if args.train_subset is not None:
        keep = max(1, round(args.train_subset * len(train)))
        train = train.shuffle(seed=args.seed).select(range(keep))
    return train, val, num_classes


def with_transforms(train, val, args, model):
    """ torch datasets applying timm's train/eval transforms for `model`, and the resolved data config. """
    data_config = resolve_data_config(vars(args), model=model)
    train_tf = create_transform(
        **data_config, is_training=True, hflip=args.hflip, scale=args.scale, ratio=args.ratio,
        color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob)
    eval_tf = create_transform(**data_config, is_training=False)
    in_chans = data_config['input_size'][0]
    columns = dict(image_column=args.image_column, label_column=args.label_column, in_chans=in_chans)
    return ImageClassification(train, train_tf, **columns), ImageClassification(val, eval_tf, **columns), data_config
