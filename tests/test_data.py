""" train.py on data in each format it reads (image folder, save_to_disk, parquet through hfds/), timm's
transforms and augmentation flags, grayscale images, worker processes, and bad data input. """
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import RandomResizedCropAndInterpolation
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from helpers.image_data import CLASSES, PER_CLASS, images_and_labels, make_image_folder, make_parquet_dataset, \
    make_saved_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from helpers import DG_MIX, assert_bad_input, run_train_py  # noqa: E402
from timm_gmix.data import load_splits, with_transforms  # noqa: E402

TINY = ['--model', 'resnet10t', '--img-size', '32', '-b', '8', '--epochs', '1', '--workers', '0',
        '--warmup-epochs', '0', '--lr', '0.05']


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """ `datasets` caches what it converts (image folders, parquet): keep that out of the user's cache. """
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path_factory.getbasetemp() / 'hf_datasets_cache')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """ The same images and labels in three formats, with the flags that select each. """
    root = tmp_path_factory.mktemp('data')
    return {
        'folder': ['--dataset', 'folder', '--data-dir', make_image_folder(root / 'images')],
        # timm's own way: no dataset name, a folder with val/ for validation
        'timm_folder': ['--dataset', '', '--data-dir', make_image_folder(root / 'timm_images', val_folder='val')],
        'save_to_disk': ['--dataset', make_saved_dataset(root / 'saved')],
        'hfds_parquet': ['--dataset', f'hfds/{make_parquet_dataset(root / "parquet")}',
                         '--image-column', 'img', '--label-column', 'fine_label'],
    }


def args_for(*argv):
    return train.parse_args([str(a) for a in argv])


@pytest.mark.parametrize('fmt', ['folder', 'timm_folder', 'save_to_disk', 'hfds_parquet'])
def test_each_format_reads_the_same_images_and_labels(fmt, data):
    args = args_for(*TINY, *data[fmt])
    train_split, val_split, num_classes = load_splits(args)
    assert num_classes == len(CLASSES)  # read from the data: folder names, ClassLabel, sorted strings
    for name, split in (('train', train_split), ('validation', val_split)):
        got = sorted((row[args.label_column], np.asarray(row[args.image_column]).tobytes()) for row in split)
        expected = sorted((label, np.asarray(image).tobytes()) for image, label, _ in images_and_labels(name))
        assert got == expected, name


def test_digits_split_three_ways_and_the_subset_does_not_depend_on_the_seed():
    """ The limited-data benchmark compares seeds on the same training examples, never touching test. """
    def pixels_of(split):
        return {np.asarray(row['image']).tobytes() for row in split}

    splits = {name: load_splits(args_for(*TINY, '--val-split', name))[1] for name in ('validation', 'test')}
    full_train, _, num_classes = load_splits(args_for(*TINY))
    assert num_classes == 10
    assert [len(full_train), len(splits['validation']), len(splits['test'])] == [1078, 359, 360]
    parts = [pixels_of(full_train), pixels_of(splits['validation']), pixels_of(splits['test'])]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])

    subsets = [load_splits(args_for(*TINY, '--train-subset', '0.2', '--seed', seed))[0] for seed in (1, 2)]
    assert len(subsets[0]) == round(0.2 * 1078)
    assert subsets[0]['label'] == subsets[1]['label'] and pixels_of(subsets[0]) == pixels_of(subsets[1])
    assert pixels_of(subsets[0]) <= parts[0]


@pytest.mark.parametrize('fmt, workers', [('folder', 2), ('save_to_disk', 0), ('hfds_parquet', 0)])
def test_dg_mix_trains_on_each_format(fmt, workers, data, tmp_path):
    train.main([*map(str, TINY), *map(str, data[fmt]), *DG_MIX, '--workers', str(workers),
                '--output', str(tmp_path), '--experiment', 'run'])
    run_dir = tmp_path / 'run'
    import csv
    with open(run_dir / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]['train_flagged_frac']) == 0.5
    import timm
    model = timm.create_model(f'local-dir:{run_dir / "model"}', pretrained=True)
    assert model.num_classes == len(CLASSES)


def test_transform_flags_reach_timm_transforms(data):
    args = args_for(*TINY, *data['save_to_disk'], '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25', '--remode', 'const',
                    '--scale', '0.5', '1', '--ratio', '0.8', '1.25', '--hflip', '0.3', '--interpolation', 'bilinear',
                    '--crop-pct', '0.8')
    import timm
    model = timm.create_model('resnet10t', num_classes=3)
    train_set, val_set, data_config = with_transforms(None, None, args, model)
    assert data_config['input_size'] == (3, 32, 32)
    assert data_config['interpolation'] == 'bilinear' and data_config['crop_pct'] == 0.8
    ops = {type(t): t for t in train_set.transform.transforms}
    crop = ops[RandomResizedCropAndInterpolation]
    assert crop.scale == (0.5, 1.0) and crop.ratio == (0.8, 1.25) and crop.interpolation.value == 'bilinear'
    assert ops[transforms.RandomHorizontalFlip].p == 0.3
    assert RandAugment in ops and transforms.ColorJitter not in ops  # timm: no colour jitter with AutoAugment
    assert ops[RandomErasing].probability == 0.25 and ops[RandomErasing].mode == 'const'
    val_ops = {type(t): t for t in val_set.transform.transforms}
    assert val_ops[transforms.Resize].size == int(32 / 0.8)

    # timm's own defaults otherwise: colour jitter 0.4, random erasing off, the model's interpolation
    args = args_for(*TINY, *data['save_to_disk'])
    train_set, val_set, data_config = with_transforms(None, None, args, model)
    ops = {type(t): t for t in train_set.transform.transforms}
    assert transforms.ColorJitter in ops and RandomErasing not in ops
    assert data_config['interpolation'] == model.pretrained_cfg['interpolation']
    assert data_config['crop_pct'] == model.pretrained_cfg['crop_pct']


@pytest.mark.parametrize('in_chans', [3, 1])
def test_grayscale_and_rgb_images_fit_the_model_channels(in_chans, data):
    import timm
    args = args_for(*TINY, *data['save_to_disk'], '--in-chans', in_chans)
    train_split, val_split, _ = load_splits(args)
    model = timm.create_model('resnet10t', num_classes=3, in_chans=in_chans)
    _, val_set, data_config = with_transforms(train_split, val_split, args, model)
    assert len(data_config['mean']) == len(data_config['std']) == in_chans
    modes = {val_split[i]['image'].mode for i in range(len(val_split))}
    assert modes == {'L', 'RGB'}
    batch = torch.stack([val_set[i][0] for i in range(len(val_set))])
    assert batch.shape == (len(val_split), in_chans, 32, 32)
    if in_chans == 3:  # a grayscale image becomes three equal channels (before normalization)
        gray = val_set[0][0] * torch.tensor(data_config['std'])[:, None, None] + \
            torch.tensor(data_config['mean'])[:, None, None]
        assert val_split[0]['image'].mode == 'L'
        torch.testing.assert_close(gray[0], gray[1])
        torch.testing.assert_close(gray[1], gray[2])


def test_string_labels_are_numbered_in_sorted_order(data):
    train_split, _, num_classes = load_splits(args_for(*TINY, *data['hfds_parquet']))
    assert train_split.features['fine_label'].names == sorted(CLASSES) and num_classes == 3
    assert sorted(train_split['fine_label']) == sorted(list(range(3)) * PER_CLASS)



BAD_DATA = {
    'missing image folder': (['--dataset', 'folder', '--data-dir', '/nonexistent/images'],
                             '--data-dir', 'not a folder'),
    'missing dataset folder': (['--dataset', '/nonexistent/data'], '/nonexistent/data', 'does not exist'),
    'missing image column': (['--dataset', 'SAVED', '--image-column', 'img'], "'img'", '--image-column'),
    'missing label column': (['--dataset', 'SAVED', '--label-column', 'fine_label'], "'fine_label'", '--label-column'),
    'image column without images': (['--dataset', 'SAVED', '--image-column', 'label'], 'images', '--image-column'),
    'missing split': (['--dataset', 'SAVED', '--val-split', 'test'], "'test'", '--val-split'),
    'image size the model cannot take': (['--dataset', 'SAVED', '--model', 'test_vit', '--img-size', '30'],
                                         'cannot take', '30x30'),
    'channels the images cannot have': (['--dataset', 'SAVED', '--in-chans', '2'], '--in-chans 1 or 3'),
    'num classes disagree': (['--dataset', 'SAVED', '--num-classes', '4'], '--num-classes 4', '3 classes'),
}


@pytest.mark.parametrize('case', sorted(BAD_DATA))
def test_bad_data_input_is_one_clear_line(case, data, capsys, tmp_path):
    argv, *expected = BAD_DATA[case]
    argv = [data['save_to_disk'][1] if a == 'SAVED' else a for a in argv]
    assert_bad_input(capsys, tmp_path, [*TINY, *DG_MIX, *argv], *expected)


def test_hub_dataset_offline_says_how_to_get_it(tmp_path):
    """ Offline and not cached: one line naming the dataset and the save_to_disk way to train offline. """
    proc = run_train_py(tmp_path, *TINY, '--dataset', 'hfds/uoft-cs/cifar10',
                        HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and "'uoft-cs/cifar10'" in last and 'save_to_disk' in last, proc.stderr
    assert not any(tmp_path.rglob('summary.csv'))
