""" The accuracy benchmark's data: Fashion-MNIST's splits carved as its protocol says (validation from the training
set, test the official test set, the arms' subsets nested), and label noise replacing exactly its share. """
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from test_torch_datasets import N_TEST, write_mnist
from timm_gmix.training.torch_datasets import torch_dataset_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import accuracy  # noqa: E402


def pixels_of(split) -> list:
    return [bytes(image['bytes']) for image in split['image']]


@pytest.fixture
def built(tmp_path, monkeypatch):
    """ Two of the benchmark's splits, built from small Debian-layout IDX files with 48 training images. """
    root = tmp_path / 'fashion-mnist'
    write_mnist(root, 'debian')
    monkeypatch.setattr(accuracy, 'FMNIST_ROOT', str(root))
    monkeypatch.setattr(accuracy, 'CACHE', tmp_path / 'cache')
    monkeypatch.setattr(accuracy, 'FMNIST_VAL', 10)
    (tmp_path / 'cache').mkdir()
    accuracy.build_fashion_mnist('clean', 20, 0.0)
    accuracy.build_fashion_mnist('noisy', 30, 0.4)
    official = torch_dataset_dict('torch/fashion_mnist', str(root), splits=('train', 'test'))
    return (datasets.load_from_disk(str(tmp_path / 'cache' / 'clean')),
            datasets.load_from_disk(str(tmp_path / 'cache' / 'noisy')), official)


def test_validation_is_carved_from_training_and_test_is_the_official_test_set(built):
    clean, noisy, official = built
    assert (len(clean['validation']), len(clean['train']), len(clean['test'])) == (10, 20, N_TEST)
    train_images = set(pixels_of(official['train']))
    assert set(pixels_of(clean['validation'])) <= train_images
    assert not set(pixels_of(clean['validation'])) & set(pixels_of(clean['train']))
    assert pixels_of(clean['test']) == pixels_of(official['test'])
    assert clean['test']['label'] == official['test']['label']
    # the arms share the validation split, and the smaller training subset is the start of the larger one
    assert pixels_of(noisy['validation']) == pixels_of(clean['validation'])
    assert pixels_of(noisy['train'])[:20] == pixels_of(clean['train'])


def test_label_noise_replaces_exactly_its_share_by_other_classes(built):
    clean, noisy, official = built
    truth = dict(zip(pixels_of(official['train']), official['train']['label']))
    assert [truth[p] for p in pixels_of(clean['train'])] == clean['train']['label']
    labels = np.array(noisy['train']['label'])
    original = np.array([truth[p] for p in pixels_of(noisy['train'])])
    assert (labels != original).sum() == round(0.4 * 30)
    assert labels.min() >= 0 and labels.max() < 10
    assert noisy['validation']['label'] == clean['validation']['label'] == \
        [truth[p] for p in pixels_of(clean['validation'])]
    assert noisy['train'].features == official['train'].features


def test_planned_runs_count_each_methods_start_grid_and_its_seeds():
    assert accuracy.planned_runs('fmnist-cnn', 'ERM') == (4 + 1, 5)
    assert accuracy.planned_runs('fmnist-cnn', accuracy.ERM_SHARED_LR) == (0, 5)
    assert accuracy.planned_runs('fmnist-cnn', 'G-Mix') == (9 + 2, 5)
    assert accuracy.planned_runs('cnn', 'DG-Mix (LookSAM, every 8th)') == (3 * 3 + 2, 10)
    assert accuracy.sizing_config('fmnist-cnn', 'ERM') == {'--lr': 0.05}
    assert accuracy.sizing_config('fmnist-vit', 'G-Mix (MSAM)') == {'--rho': 0.5, '--mixup': 0.2}
