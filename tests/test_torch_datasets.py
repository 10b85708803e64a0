""" timm's torch/<name> datasets through torchvision's own classes and parsers, on small files written here:
IDX files (MNIST, Fashion-MNIST, KMNIST, QMNIST) in torchvision's layout (ROOT/<class>/raw/) and in Debian's
(the gzipped files in ROOT itself, read-only), and CIFAR python batches. What is read equals what was written,
the splits are timm's, bad or missing data is one line, and train.py trains on it (also with --device-data, and
resumed mid-epoch exactly).

CIFAR: torchvision's CIFAR10/CIFAR100 check each file's md5 against the official archive's before reading, which
synthetic files cannot pass. The tests show that check refusing them (one line), then give the classes the md5s
of the files written here (the checksum table only: torchvision's integrity check, unpickling and reshaping run
as they are).
"""
import gzip
import hashlib
import json
import pickle
import struct
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from helpers import assert_bad_input, read_summary, stopped_and_resumed, train_main
from timm_gmix.training.args import parse_args
from timm_gmix.training.data import load_splits, read_image
from timm_gmix.training.errors import UsageError

N_TRAIN, N_TEST = 48, 20
IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def idx_bytes(array: np.ndarray) -> bytes:
    """ The IDX format: magic (0, 0, type, dims), big-endian dims, the data big-endian (0x08 uint8, 0x0C int32). """
    kind = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    return (struct.pack('>BBBB', 0, 0, kind, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
            + array.astype(array.dtype.newbyteorder('>')).tobytes())


def mnist_arrays(seed=0):
    """ {file stem: array}: images whose brightness follows the label (learnable), labels 0..9, both splits. """
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (('train', N_TRAIN), ('t10k', N_TEST)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (rng.integers(0, 40, (n, 28, 28)) + 20 * labels[:, None, None]).astype(np.uint8)
        images[:, :4, :] = rng.integers(0, 256, (n, 4, 28))  # every value somewhere
        out[f'{prefix}-images-idx3-ubyte'], out[f'{prefix}-labels-idx1-ubyte'] = images, labels
    return out


def write_mnist(root: Path, layout: str, cls_name='FashionMNIST', seed=0) -> dict:
    """ `layout` torchvision: ROOT/<cls_name>/raw/<file>; debian: ROOT/<file>.gz. The arrays written. """
    arrays = mnist_arrays(seed)
    folder = root / cls_name / 'raw' if layout == 'torchvision' else root
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        if layout == 'torchvision':
            (folder / stem).write_bytes(idx_bytes(array))
        else:
            with gzip.open(folder / f'{stem}.gz', 'wb') as f:
                f.write(idx_bytes(array))
    return arrays


def args_for(*flags):
    return parse_args([*map(str, flags), '--model', 'resnet10t', '--img-size', '28'])


def pixels(split, i, mode='L'):
    return np.asarray(read_image(split[i]['image'], mode))


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob('*'))}


@pytest.fixture(scope='module')
def debian(tmp_path_factory):
    """ Debian's layout, read-only (its package's folder belongs to root). """
    root = tmp_path_factory.mktemp('fashion-mnist')
    arrays = write_mnist(root, 'debian')
    for p in root.iterdir():
        p.chmod(0o444)
    root.chmod(0o555)
    yield root, arrays
    root.chmod(0o755)


@pytest.mark.parametrize('name, cls_name', [('fashion_mnist', 'FashionMNIST'), ('mnist', 'MNIST'),
                                            ('kmnist', 'KMNIST')])
def test_torchvision_layout_reads_what_was_written_as_torchvision_does(name, cls_name, tmp_path):
    arrays = write_mnist(tmp_path, 'torchvision', cls_name)
    args = args_for('--dataset', f'torch/{name}', '--data-dir', tmp_path)
    train, val, num_classes = load_splits(args)
    cls = getattr(torchvision.datasets, cls_name)
    assert num_classes == 10 and train.features['label'].names == list(cls.classes)
    theirs = cls(str(tmp_path), train=True)
    assert train['label'] == arrays['train-labels-idx1-ubyte'].tolist() == [int(y) for _, y in theirs]
    assert val['label'] == arrays['t10k-labels-idx1-ubyte'].tolist()  # validation: torchvision's test split
    for i in range(N_TRAIN):
        assert np.array_equal(pixels(train, i), arrays['train-images-idx3-ubyte'][i]), i
        assert np.array_equal(pixels(train, i), np.asarray(theirs[i][0])), i
    for i in range(N_TEST):
        assert np.array_equal(pixels(val, i), arrays['t10k-images-idx3-ubyte'][i]), i


def test_debian_layout_is_read_as_it_is_and_left_untouched(debian, tmp_path, monkeypatch):
    """ Read-only as the package installs it (the tests may run as root, whom chmod does not stop: nothing new
    or changed in the folder is the check), with or without --dataset-download (the files are there: no download);
    the temporary folder the files were decompressed into is gone afterwards. """
    root, arrays = debian
    before = snapshot(root)
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    for download in ([], ['--dataset-download']):
        train, val, _ = load_splits(args_for('--dataset', 'torch/fashion_mnist', '--data-dir', root, *download))
        assert snapshot(root) == before, 'something was written in the data folder'
        assert not any(tmp_path.iterdir()), 'the decompressed files were left behind'
    assert train['label'] == arrays['train-labels-idx1-ubyte'].tolist()
    assert val['label'] == arrays['t10k-labels-idx1-ubyte'].tolist()
    assert all(np.array_equal(pixels(train, i), arrays['train-images-idx3-ubyte'][i]) for i in range(N_TRAIN))
    assert all(np.array_equal(pixels(val, i), arrays['t10k-images-idx3-ubyte'][i]) for i in range(N_TEST))
    assert pixels(train, 0, 'RGB').shape == (28, 28, 3)  # a 3-channel model gets the gray image in each channel


@pytest.mark.parametrize('train_split, val_split, expect', [
    ('train', 'validation', ('train', 't10k')), ('training', 'test', ('train', 't10k')),
    ('train', 'val', ('train', 't10k')), ('train', 'eval', ('train', 't10k')), ('train', 'train', ('train', 'train')),
])
def test_splits_as_timm_maps_them(train_split, val_split, expect, debian):
    root, arrays = debian
    train, val, _ = load_splits(args_for('--dataset', 'torch/fashion_mnist', '--data-dir', root,
                                         '--train-split', train_split, '--val-split', val_split))
    assert train['label'] == arrays[f'{expect[0]}-labels-idx1-ubyte'].tolist()
    assert val['label'] == arrays[f'{expect[1]}-labels-idx1-ubyte'].tolist()


def test_timm_names_its_prefix_and_case():
    from timm_gmix.training.torch_datasets import torch_name
    assert torch_name('torch/fashion_mnist') == torch_name('TORCH/Fashion_MNIST') == 'fashion_mnist'


def test_qmnist_goes_through_torchvision_getitem(tmp_path):
    """ QMNIST's labels are 8 columns (int32); torchvision's compat mode takes the first, as here. """
    raw = tmp_path / 'QMNIST' / 'raw'
    raw.mkdir(parents=True)
    arrays = mnist_arrays()
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        labels = np.zeros((len(arrays[f'{prefix}-labels-idx1-ubyte']), 8), np.int32)
        labels[:, 0] = arrays[f'{prefix}-labels-idx1-ubyte']
        labels[:, 1] = 7  # another column (the writer), not the class
        (raw / f'qmnist-{split}-images-idx3-ubyte').write_bytes(idx_bytes(arrays[f'{prefix}-images-idx3-ubyte']))
        (raw / f'qmnist-{split}-labels-idx2-int').write_bytes(idx_bytes(labels))
    train, val, _ = load_splits(args_for('--dataset', 'torch/qmnist', '--data-dir', tmp_path))
    assert train['label'] == arrays['train-labels-idx1-ubyte'].tolist()
    assert val['label'] == arrays['t10k-labels-idx1-ubyte'].tolist()
    assert np.array_equal(pixels(val, 3), arrays['t10k-images-idx3-ubyte'][3])


# ----------------------------------------------------------------------------------------------
# CIFAR


def write_cifar(root: Path, cls) -> dict:
    """ torchvision's python-version layout of `cls` (CIFAR10: data_batch_1..5, test_batch, batches.meta;
    CIFAR100: train, test, meta), a few 32x32 images each: {file: (images N x 32 x 32 x 3, labels)}. """
    rng = np.random.default_rng(1)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    key, names_key = ('labels', 'label_names') if cls is torchvision.datasets.CIFAR10 else ('fine_labels',
                                                                                           'fine_label_names')
    num_classes = 10 if cls is torchvision.datasets.CIFAR10 else 100
    written = {}
    for i, (filename, _) in enumerate(cls.train_list + cls.test_list):
        n = 6
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = [(i + k) % n for k in range(n)]  # classes 0..5 in every file (the test split's are trained)
        rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # the official layout: 1024 R, then G, then B
        with open(folder / filename, 'wb') as f:
            pickle.dump({'data': rows, key: labels, 'batch_label': filename}, f)
        written[filename] = (images, labels)
    with open(folder / cls.meta['filename'], 'wb') as f:
        pickle.dump({names_key: [f'class{c}' for c in range(num_classes)]}, f)
    return written


def with_md5s_of(monkeypatch, cls, root):
    """ torchvision's checksum table for `cls`, with the md5s of the files in `root` (written by write_cifar). """
    md5 = lambda name: hashlib.md5((root / cls.base_folder / name).read_bytes()).hexdigest()  # noqa: E731
    monkeypatch.setattr(cls, 'train_list', [[f, md5(f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, 'test_list', [[f, md5(f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, 'meta', {**cls.meta, 'md5': md5(cls.meta['filename'])})


@pytest.mark.parametrize('name, cls', [('cifar10', torchvision.datasets.CIFAR10),
                                       ('cifar100', torchvision.datasets.CIFAR100)])
def test_cifar_batches_are_read_through_torchvision(name, cls, tmp_path, monkeypatch):
    written = write_cifar(tmp_path, cls)
    args = args_for('--dataset', f'torch/{name}', '--data-dir', tmp_path)
    with pytest.raises(UsageError, match=r"do not match torchvision's checksums"):
        load_splits(args)  # synthetic files are not the official archive's
    with_md5s_of(monkeypatch, cls, tmp_path)
    train, val, num_classes = load_splits(args_for('--dataset', f'torch/{name}', '--data-dir', tmp_path))
    assert num_classes == len(train.features['label'].names) == (10 if name == 'cifar10' else 100)
    assert train.features['label'].names[3] == 'class3'
    train_files = [f for f, _ in cls.train_list]
    images = np.concatenate([written[f][0] for f in train_files])
    assert train['label'] == [y for f in train_files for y in written[f][1]]
    assert all(np.array_equal(pixels(train, i, 'RGB'), images[i]) for i in range(len(images)))
    test_images, test_labels = written[cls.test_list[0][0]]
    assert val['label'] == test_labels
    assert all(np.array_equal(pixels(val, i, 'RGB'), test_images[i]) for i in range(len(test_images)))


# ----------------------------------------------------------------------------------------------
# torch/image_folder


def test_image_folder_through_torchvision(tmp_path):
    from helpers.image_data import CLASSES, make_image_folder
    folder = make_image_folder(tmp_path / 'images', val_folder='val')
    train, val, num_classes = load_splits(args_for('--dataset', 'torch/image_folder', '--data-dir', folder))
    theirs = torchvision.datasets.ImageFolder(str(folder / 'val'))  # timm finds val/ for validation
    assert num_classes == 3 and train.features['label'].names == list(CLASSES)
    assert [v['path'] for v in val['image']] == [p for p, _ in theirs.samples]
    assert val['label'] == theirs.targets
    assert all(Path(v['path']).parent.parent.name == 'train' for v in train['image'])


def test_imagenet_through_torchvision(tmp_path):
    """ torchvision's ImageNet on an extracted ROOT (meta.bin, train/ and val/ of wnid folders); timm's evaluation
    names are its val split; class names are each class's first name, with the wnid where two share it. """
    from PIL import Image
    meta = {'n01': ('crane', 'grus'), 'n02': ('tench', 'Tinca tinca'), 'n03': ('crane',)}
    torch.save((meta, []), tmp_path / 'meta.bin')
    for split, value in (('train', 10), ('val', 200)):
        for k, wnid in enumerate(meta):
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), value + k, np.uint8)).save(tmp_path / split / wnid / f'{i}.png')
    train, val, num_classes = load_splits(args_for('--dataset', 'torch/imagenet', '--data-dir', tmp_path))
    assert num_classes == 3 and train.features['label'].names == ['crane (n01)', 'tench', 'crane (n03)']
    assert train['label'] == val['label'] == [0, 0, 1, 1, 2, 2]
    assert pixels(train, 2, 'RGB')[0, 0, 0] == 11 and pixels(val, 5, 'RGB')[0, 0, 0] == 202


# ----------------------------------------------------------------------------------------------
# Missing and bad data: one line


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    assert_bad_input(capsys, tmp_path / 'out', ['--dataset', 'torch/fashion_mnist', '--data-dir', tmp_path],
                     f'--dataset torch/fashion_mnist: no Fashion-MNIST files in {tmp_path}',
                     'apt-get install dataset-fashion-mnist', '--data-dir /usr/share/datasets/fashion-mnist',
                     '--dataset-download')


@pytest.mark.parametrize('name, title, how', [('fashion_mnist', 'Fashion-MNIST', 'apt-get install dataset-fashion-mnist'),
                                             ('cifar10', 'CIFAR-10', 'download where there is network')])
def test_download_offline_is_one_line(name, title, how, tmp_path, capsys, monkeypatch):
    """ --dataset-download as in timm (torchvision's download into ROOT); without network, one line. """
    for proxy in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY'):
        monkeypatch.setenv(proxy, 'http://127.0.0.1:9')  # refused at once: offline, whatever this machine has
    monkeypatch.delenv('no_proxy', raising=False)
    monkeypatch.delenv('NO_PROXY', raising=False)
    monkeypatch.setattr(urllib.request, '_opener', None)  # urlopen builds its opener (and proxies) anew
    root = tmp_path / 'data'
    assert_bad_input(capsys, tmp_path / 'out', ['--dataset', f'torch/{name}', '--data-dir', root, '--dataset-download'],
                     f'no {title} files in {root}, and --dataset-download could not fetch them', how)


def test_damaged_files_are_one_line(tmp_path, capsys):
    arrays = write_mnist(tmp_path, 'debian')
    (tmp_path / 'train-labels-idx1-ubyte.gz').write_bytes(b'not gzip')
    assert_bad_input(capsys, tmp_path / 'out', ['--dataset', 'torch/fashion_mnist', '--data-dir', tmp_path],
                     'train-labels-idx1-ubyte.gz cannot be decompressed', 'replace it')
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(idx_bytes(arrays['train-labels-idx1-ubyte'][:10]))  # fewer labels than images
    assert_bad_input(capsys, tmp_path / 'out', ['--dataset', 'torch/fashion_mnist', '--data-dir', tmp_path],
                     f'the files hold {N_TRAIN} images but 10 labels')
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(b'\x00\x00\x08\x07' + bytes(20))  # seven dimensions
    assert_bad_input(capsys, tmp_path / 'out', ['--dataset', 'torch/fashion_mnist', '--data-dir', tmp_path],
                     'torchvision cannot read the files')


# ----------------------------------------------------------------------------------------------
# train.py


RUN = ['--dataset', 'torch/fashion_mnist', '--model', 'resnet10t', '--img-size', '28', '--in-chans', '1', '-b', '8',
       '--workers', '0', '--epochs', '1', '--lr', '0.05', '--warmup-epochs', '0']


@pytest.mark.parametrize('extra', [[], ['--device-data', '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'dg']],
                         ids=['loader', 'device-data'])
def test_train_py_trains_on_it(extra, debian, tmp_path):
    root, _ = debian
    train_main([*RUN, '--data-dir', root, *extra, '--output', tmp_path, '--experiment', 'run'])
    [row] = read_summary(tmp_path / 'run')
    assert row['train_skipped'] == '0' and float(row['eval_loss']) > 0
    config = json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())  # the class names, exported
    assert config['label_names'] == torchvision.datasets.FashionMNIST.classes


def test_a_run_resumed_mid_epoch_equals_the_uninterrupted_one(debian, tmp_path, monkeypatch, capsys):
    root, _ = debian
    run = [*RUN, '--data-dir', root, '--epochs', '2', '--recovery-interval', '2']
    whole, cut = stopped_and_resumed(run, tmp_path, monkeypatch)
    assert 'resumed from' in capsys.readouterr().out
    assert read_summary(cut) == read_summary(whole)
    assert (cut / 'last/model.safetensors').read_bytes() == (whole / 'last/model.safetensors').read_bytes()
