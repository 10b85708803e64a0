""" timm's `torch/<name>` datasets: torchvision's classes on `--data-dir ROOT`, with timm's names and split mapping
(timm/data/dataset_factory.py), turned into the DatasetDict that every other source of train.py gives, so that
the loader, --device-data, seeding, exact resume, --train-subset and the class names work unchanged.

    torch/mnist, torch/fashion_mnist, torch/kmnist, torch/qmnist, torch/cifar10, torch/cifar100
        torchvision's MNIST, FashionMNIST, KMNIST, QMNIST, CIFAR10, CIFAR100 on ROOT, `--dataset-download` passed
        on as `download=True`. timm's split mapping: train and training are torchvision's training split, every
        other name its test split (here: validation, val, valid, eval, evaluation, test and testing; another name
        is refused rather than silently read as the test split). The MNIST family is also read where the four IDX
        files lie (gzipped or not) in ROOT itself, the layout of Debian's dataset-fashion-mnist
        (/usr/share/datasets/fashion-mnist): they are decompressed (or linked) into a temporary folder for
        torchvision's class to read, which is removed once the arrays are in memory; nothing is written in ROOT.
    torch/image_folder (torch/folder)
        torchvision's ImageFolder on ROOT/<split> as timm finds it (timm's `_search_split`), or ROOT itself.
    torch/imagenet
        torchvision's ImageNet on ROOT (split train, or val for timm's evaluation names).

The in-memory datasets (MNIST family, CIFAR) become images encoded as uncompressed netpbm bytes (lossless, read
by Pillow; 60,000 28x28 images in well under a second) with a ClassLabel of the class's `classes`; the
folder datasets become their image paths.
"""
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import UsageError, reason

TRAIN_SPLITS = ('train', 'training')  # timm's _TRAIN_SYNONYM
EVAL_SPLITS = ('val', 'valid', 'validation', 'eval', 'evaluation')  # timm's _EVAL_SYNONYM
TEST_SPLITS = EVAL_SPLITS + ('test', 'testing')  # read as torchvision's test split (timm: any non-train name)
FOLDER_NAMES = ('image_folder', 'folder')
TITLES = {'mnist': 'MNIST', 'fashion_mnist': 'Fashion-MNIST', 'kmnist': 'Kuzushiji-MNIST', 'qmnist': 'QMNIST',
          'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100'}
DEBIAN = {'fashion_mnist': ('dataset-fashion-mnist', '/usr/share/datasets/fashion-mnist')}
NOT_READ = ('inaturalist', 'inat', 'places365')  # timm has them; too large and of other layouts for this project


def in_memory_classes() -> dict:
    """ timm's _TORCH_BASIC_DS and qmnist: name -> torchvision class. """
    from torchvision import datasets as tv
    return {'cifar10': tv.CIFAR10, 'cifar100': tv.CIFAR100, 'mnist': tv.MNIST, 'kmnist': tv.KMNIST,
            'fashion_mnist': tv.FashionMNIST, 'qmnist': tv.QMNIST}


def torch_name(dataset: str) -> str:
    """ timm's reading of `torch/<name>`: the part after the last of the first two slashes, lower-cased. """
    return dataset.split('/', 2)[-1].lower()


def known() -> str:
    return ', '.join(f'torch/{n}' for n in (*in_memory_classes(), 'image_folder', 'imagenet'))


def torch_dataset_dict(dataset: str, root, download=False, splits=()):
    """ The DatasetDict of `splits` (split names as --train-split / --val-split give them) of timm's
    `torch/<name>` dataset `dataset` on `root`. """
    import datasets

    name = torch_name(dataset)
    label = f'--dataset {dataset}'
    splits = tuple(dict.fromkeys(splits or ('train', 'test')))
    if name in NOT_READ:
        raise UsageError(f'{label}: timm\'s torch/{name} is not read here; use {known()} (or an image folder)')
    if name not in in_memory_classes() and name not in (*FOLDER_NAMES, 'imagenet'):
        raise UsageError(f'{label}: unknown torchvision dataset {name!r} (timm\'s torch/ names: {known()})')
    if not root:
        raise UsageError(f'{label} needs --data-dir ROOT, the folder that holds the data (with --dataset-download, the '
                         f'folder it is downloaded into){_how_to_get(name, root) if name in DEBIAN else ""}')
    if name in FOLDER_NAMES or name == 'imagenet':
        built = {split: _folder(name, label, root, split) for split in splits}
    else:
        train_of = {split: _is_train(name, split) for split in splits}
        tv_sets = _read_in_memory(name, label, Path(root), download, sorted(set(train_of.values()), reverse=True))
        built = {split: tv_sets[train] for split, train in train_of.items()}
    converted = {}
    for split, tv_set in built.items():
        if id(tv_set) not in converted:
            converted[id(tv_set)] = _as_columns(tv_set, label)
    out = {}
    for split, tv_set in built.items():
        images, labels, names = converted[id(tv_set)]
        features = datasets.Features({'image': datasets.Image(decode=False), 'label': datasets.ClassLabel(names=names)})
        out[split] = datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features, split=split)
    return datasets.DatasetDict(out)


def _is_train(name, split) -> bool:
    if split in TRAIN_SPLITS:
        return True
    if split in TEST_SPLITS:
        return False
    raise UsageError(f'split {split!r} is not one of torch/{name}\'s: set --train-split to train (or training) and '
                     f'--val-split to validation, val, valid, eval, evaluation or test (all torchvision\'s test split, '
                     f'as in timm)')


def _how_to_get(name, root) -> str:
    if name in DEBIAN:
        package, folder = DEBIAN[name]
        return (f'; install them with `apt-get install {package}` and pass --data-dir {folder}, or pass '
                f'--dataset-download (network needed)')
    if name in FOLDER_NAMES or name == 'imagenet':
        return ''
    return '; pass --dataset-download (network needed) to fetch them with torchvision'


# ----------------------------------------------------------------------------------------------
# MNIST family and CIFAR: torchvision reads the files into arrays


def _mnist_files(cls) -> list:
    """ The file names torchvision's MNIST-family class reads in ROOT/<class name>/raw (all of them, for either
    split: its existence check asks for every one). """
    resources = cls.resources
    if isinstance(resources, dict):  # QMNIST: per subset; train and test
        resources = resources['train'] + resources['test']
    return [os.path.splitext(os.path.basename(url))[0] for url, _ in resources]


def _layout(cls, root: Path) -> str:
    if hasattr(cls, 'base_folder'):  # CIFAR
        return f'{root / cls.base_folder}/ ({", ".join(f for f, _ in cls.train_list + cls.test_list)}, ' \
               f'{cls.meta["filename"]})'
    return f'{root / cls.__name__ / "raw"}/ or {root}/ ({", ".join(_mnist_files(cls))}, or the same .gz)'


def _construct(cls, root, train, label, **kwargs):
    """ torchvision's class; a file it cannot parse is one line. """
    try:
        return cls(str(root), train=train, **kwargs)
    except RuntimeError:
        raise
    except Exception as e:  # torchvision's parsers assert or raise TypeError/ValueError on a damaged file
        raise UsageError(f'{label}: torchvision cannot read the files in {root} ({type(e).__name__}: '
                         f'{reason(e) if str(e) else "not the format it reads"}): replace them with the original '
                         f'files') from e


def _read_in_memory(name, label, root: Path, download, trains) -> dict:
    """ {train: torchvision dataset} for each of `trains` (True: the training split, False: the test split). """
    cls = in_memory_classes()[name]
    try:  # torchvision's own layout (or MNIST's legacy processed/ files), as it finds it
        return {train: _construct(cls, root, train, label) for train in trains}
    except RuntimeError as e:
        not_there = e
    if not hasattr(cls, 'base_folder'):
        found = {f: _find(f, (root / cls.__name__ / 'raw', root)) for f in _mnist_files(cls)}
        if all(found.values()):
            return _staged(cls, found, label, trains)
    elif all((root / cls.base_folder / f).is_file() for f, _ in cls.train_list + cls.test_list + [
            [cls.meta['filename'], None]]) and not download:
        raise UsageError(f'{label}: the files in {root / cls.base_folder} do not match torchvision\'s checksums '
                         f'of {TITLES[name]} ({reason(not_there)}): replace them with the original python version '
                         f'({cls.filename}), or pass --dataset-download to fetch it again')
    if not download:
        raise UsageError(f'{label}: no {TITLES[name]} files in {root} (torchvision looks for {_layout(cls, root)})'
                         f'{_how_to_get(name, root)}')
    try:  # torchvision downloads (and extracts) in the constructor
        return {train: cls(str(root), train=train, download=True) for train in trains}
    except Exception as e:  # no network (URLError, RuntimeError with every mirror's error), a folder not writable
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = lines[-1] if lines else type(e).__name__
        how = _how_to_get(name, root).replace(', or pass --dataset-download (network needed)', '')
        how = how if name in DEBIAN else '; download where there is network, or copy the files'
        raise UsageError(f'{label}: no {TITLES[name]} files in {root}, and --dataset-download could not fetch them '
                         f'({why}){how} (torchvision looks for {_layout(cls, root)})') from e


def _find(filename, folders):
    for folder in folders:
        for candidate in (folder / filename, folder / f'{filename}.gz'):
            if candidate.is_file():
                return candidate
    return None


def _staged(cls, found: dict, label, trains) -> dict:
    """ The class read from a temporary ROOT whose <class name>/raw holds the found files, decompressed (.gz) or
    linked; the folder is removed once torchvision has read them into memory. """
    with tempfile.TemporaryDirectory(prefix='timm_gmix_torch_') as tmp:
        raw = Path(tmp) / cls.__name__ / 'raw'
        raw.mkdir(parents=True)
        for filename, source in found.items():
            if source.suffix == '.gz':
                try:
                    with gzip.open(source, 'rb') as src, open(raw / filename, 'wb') as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (OSError, EOFError) as e:
                    raise UsageError(f'{label}: {source} cannot be decompressed ({reason(e)}): replace it with the '
                                     f'original file') from e
            else:
                os.symlink(source.resolve(), raw / filename)
        try:
            return {train: _construct(cls, tmp, train, label) for train in trains}
        except RuntimeError as e:  # not expected: every file torchvision checks for is there
            raise UsageError(f'{label}: torchvision cannot read {", ".join(map(str, found.values()))} '
                             f'({reason(e)})') from e


def netpbm(pixels: np.ndarray) -> bytes:
    """ An H x W (grayscale, P5) or H x W x 3 (RGB, P6) uint8 image as netpbm bytes, which Pillow decodes. """
    kind = b'P5' if pixels.ndim == 2 else b'P6'
    return b'%s\n%d %d\n255\n' % (kind, pixels.shape[1], pixels.shape[0]) + np.ascontiguousarray(pixels).tobytes()


def _class_names(tv_set) -> list:
    classes = list(tv_set.classes)
    if classes and isinstance(classes[0], (tuple, list)):  # ImageNet: each class's names; the first, made unique
        wnids = getattr(tv_set, 'wnids', [str(i) for i in range(len(classes))])
        first = [c[0] for c in classes]
        classes = [f'{n} ({w})' if first.count(n) > 1 else n for n, w in zip(first, wnids)]
    return [str(c) for c in classes]


def _as_columns(tv_set, label):
    """ (image values, labels, class names) of a torchvision dataset. """
    names = _class_names(tv_set)
    if hasattr(tv_set, 'samples'):  # ImageFolder, ImageNet: files
        images = [{'path': path, 'bytes': None} for path, _ in tv_set.samples]
        labels = [int(y) for _, y in tv_set.samples]
    else:
        data = tv_set.data.numpy() if hasattr(tv_set.data, 'numpy') else np.asarray(tv_set.data)
        targets = tv_set.targets.numpy() if hasattr(tv_set.targets, 'numpy') else np.asarray(tv_set.targets)
        if len(data) != len(targets):
            raise UsageError(f'{label}: the files hold {len(data)} images but {len(targets)} labels: replace them '
                             f'with the original files')
        if data.dtype == np.uint8 and (data.ndim == 3 or (data.ndim == 4 and data.shape[-1] == 3)) \
                and targets.ndim == 1:
            images = [{'bytes': netpbm(pixels), 'path': None} for pixels in data]  # what __getitem__ makes a PIL of
            labels = targets.astype(np.int64).tolist()
        else:  # anything else (QMNIST's targets): through the class's own __getitem__
            pairs = [tv_set[i] for i in range(len(tv_set))]
            images = [{'bytes': netpbm(np.asarray(image)), 'path': None} for image, _ in pairs]
            labels = [int(y) for _, y in pairs]
    if labels and (min(labels) < 0 or max(labels) >= len(names)):
        raise UsageError(f'{label}: labels run from {min(labels)} to {max(labels)}, but the dataset names '
                         f'{len(names)} classes: replace the label files with the original ones')
    return images, labels, names


# ----------------------------------------------------------------------------------------------
# Folders: torchvision lists the files


def _folder(name, label, root, split):
    from torchvision import datasets as tv

    if not Path(root).is_dir():
        raise UsageError(f'--data-dir {root} is not a folder: give the folder {label} reads')
    try:
        if name == 'imagenet':
            return tv.ImageNet(str(root), split='val' if split in EVAL_SPLITS else split)
        from timm.data.dataset_factory import _search_split  # timm's own search for ROOT/<split>
        return tv.ImageFolder(_search_split(str(root), split))
    except Exception as e:  # FileNotFoundError (no class folders, no images), ValueError (split), RuntimeError (meta)
        what = ('ROOT/train|val/<wnid>/<image> and meta.bin (or the ILSVRC2012 archives) in ROOT' if name == 'imagenet'
                else 'ROOT/<split>/<class>/<image> or ROOT/<class>/<image>')
        raise UsageError(f'{label}: torchvision cannot read split {split!r} in {root} ({reason(e)}): give {what}') \
            from e
