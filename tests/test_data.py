""" The data train.py reads: each format (image folder, save_to_disk, parquet through hfds/), the built-in
digits, column and class resolution (--input-key, --target-key, --class-map), --train/val-num-samples,
image decoding (16-bit grayscale, --input-img-mode, unreadable files and --skip-bad-images), timm's
transform flags, and bad data input as one line. """
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import RandomResizedCropAndInterpolation
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from helpers import DG_MIX, assert_bad_input, read_summary, run_train_py, train_main
from helpers.image_data import CLASSES, PER_CLASS, images_and_labels, make_image_folder, make_parquet_dataset, \
    make_saved_dataset, save_16bit_png, spoil_image
from timm_gmix.training.args import parse_args
from timm_gmix.training.data import ImageClassification, as_8bit, load_splits, read_image
from timm_gmix.training.errors import UsageError, main_guard

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model', 'resnet10t', '--img-size', '32', '-b', '8', '--epochs', '1', '--workers', '0',
        '--warmup-epochs', '0', '--lr', '0.05']
TO_TENSOR = transforms.PILToTensor()  # the decoded pixels as they are (uint8, C x H x W)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """ `datasets` caches what it converts (image folders, parquet): keep that out of the user's cache. """
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path_factory.getbasetemp() / 'hf_datasets_cache')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """ The same images and labels in each format, with the flags that select each. """
    root = tmp_path_factory.mktemp('data')
    return {
        'folder': ['--dataset', 'folder', '--data-dir', make_image_folder(root / 'images')],
        # timm's own ways: no dataset name, the folder (with val/ for validation) as --data-dir or positional
        'timm_folder': ['--data-dir', make_image_folder(root / 'timm_images', val_folder='val')],
        'positional': [root / 'timm_images'],
        'save_to_disk': ['--dataset', make_saved_dataset(root / 'saved')],
        # CIFAR-100's column names, img and fine_label, found without --input-key / --target-key
        'hfds_parquet': ['--dataset', f'hfds/{make_parquet_dataset(root / "parquet")}'],
    }


def args_for(*argv):
    """ train.py's arguments (the digits preset when no data is named, as train.py does). """
    return parse_args([str(a) for a in argv], default_config=ROOT / 'configs' / 'digits.yaml')


def pixels(value, mode='L'):
    """ The decoded pixels of an image column value, as bytes. """
    return np.asarray(read_image(value, mode)).tobytes()


def rows_of(dataset):
    """ (pixels as the model gets them, label) of each example of an ImageClassification. """
    return [(dataset[i][0].numpy().tobytes(), dataset[i][1]) for i in range(len(dataset))]


@pytest.mark.parametrize('fmt', ['folder', 'timm_folder', 'positional', 'save_to_disk', 'hfds_parquet'])
def test_each_format_reads_the_same_images_and_labels(fmt, data):
    args = args_for(*TINY, *data[fmt])
    train_split, val_split, num_classes = load_splits(args)
    assert num_classes == len(CLASSES)  # read from the data: folder names, ClassLabel, sorted strings
    assert (args.input_key, args.target_key) == (('img', 'fine_label') if fmt == 'hfds_parquet' else ('image', 'label'))
    for name, split in (('train', train_split), ('validation', val_split)):
        got = sorted((row[args.target_key], pixels(row[args.input_key], 'RGB')) for row in split)
        expected = sorted((label, np.asarray(image.convert('RGB')).tobytes())
                          for image, label, _ in images_and_labels(name))
        assert got == expected, name


def test_digits_keep_their_split_and_pixels_and_the_subset_does_not_depend_on_the_seed():
    """ The benchmarks compare runs on the same digits; the limited-data benchmark compares seeds on the same
    training examples, never touching test. """
    def digest(split):
        h = hashlib.sha256()
        for row in split:
            h.update(pixels(row['image']))
            h.update(bytes([row['label']]))
        return h.hexdigest()[:16]

    def pixel_set(split):
        return {pixels(row['image']) for row in split}

    splits = {name: load_splits(args_for(*TINY, '--val-split', name))[1] for name in ('validation', 'test')}
    full_train, _, num_classes = load_splits(args_for(*TINY))
    assert num_classes == 10
    assert [len(full_train), len(splits['validation']), len(splits['test'])] == [1078, 359, 360]
    # the split and pixels of the first release (sha256 of each example's 8x8 pixels and label, in order)
    assert [digest(full_train), digest(splits['validation']), digest(splits['test'])] == \
        ['14afd87c5bee55d7', '783a0f517e78fd8c', 'a170cefe081779e0']
    parts = [pixel_set(full_train), pixel_set(splits['validation']), pixel_set(splits['test'])]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])

    subsets = [load_splits(args_for(*TINY, '--train-subset', '0.2', '--seed', seed))[0] for seed in (1, 2)]
    assert len(subsets[0]) == round(0.2 * 1078)
    assert subsets[0]['label'] == subsets[1]['label'] and pixel_set(subsets[0]) == pixel_set(subsets[1])
    assert pixel_set(subsets[0]) <= parts[0]


def test_num_samples_take_the_first_examples_of_each_split(data):
    full = load_splits(args_for(*TINY, *data['save_to_disk']))
    first = load_splits(args_for(*TINY, *data['save_to_disk'], '--train-num-samples', 5, '--val-num-samples', 7))
    assert (len(first[0]), len(first[1]), first[2]) == (5, 7, full[2])
    assert first[0][:] == full[0][:5] and first[1][:] == full[1][:7]
    more = load_splits(args_for(*TINY, *data['save_to_disk'], '--train-num-samples', 1000))[0]
    assert more[:] == full[0][:]


@pytest.mark.parametrize('fmt, workers', [('folder', 2), ('save_to_disk', 0), ('hfds_parquet', 0)])
def test_dg_mix_trains_on_each_format(fmt, workers, data, tmp_path):
    train_main([*TINY, *map(str, data[fmt]), *DG_MIX, '--workers', str(workers),
                '--output', str(tmp_path), '--experiment', 'run'])
    run_dir = tmp_path / 'run'
    rows = read_summary(run_dir)
    assert len(rows) == 1 and float(rows[0]['train_flagged_frac']) == 0.5
    model = timm.create_model(f'local-dir:{run_dir / "model"}', pretrained=True)
    assert model.num_classes == len(CLASSES)


@pytest.mark.parametrize('prefetcher', [True, False], ids=['prefetcher', 'no-prefetcher'])
def test_transform_flags_reach_timm_transforms(prefetcher, data):
    """ As timm builds them: with its prefetcher (the default) the workers' transforms end in uint8 tensors and
    random erasing runs on the device; with --no-prefetcher they normalize and erase. """
    no_prefetcher = [] if prefetcher else ['--no-prefetcher']
    args = args_for(*TINY, *data['save_to_disk'], '--aa', 'rand-m9-mstd0.5', '--reprob', '0.25', '--remode', 'const',
                    '--scale', '0.5', '1', '--ratio', '0.8', '1.25', '--hflip', '0.3', '--interpolation', 'bilinear',
                    '--train-interpolation', 'bilinear', '--crop-pct', '0.8', *no_prefetcher)
    from timm_gmix.training.loader import DeviceNormalize, with_transforms
    model = timm.create_model('resnet10t', num_classes=3)
    train_set, val_set, data_config = with_transforms(None, None, args, model)
    assert data_config['input_size'] == (3, 32, 32)
    assert data_config['interpolation'] == 'bilinear' and data_config['crop_pct'] == 0.8
    ops = {type(t): t for t in train_set.transform.transforms}
    crop = ops[RandomResizedCropAndInterpolation]
    assert crop.scale == (0.5, 1.0) and crop.ratio == (0.8, 1.25) and crop.interpolation.value == 'bilinear'
    assert ops[transforms.RandomHorizontalFlip].p == 0.3
    assert RandAugment in ops and transforms.ColorJitter not in ops  # timm: no colour jitter with AutoAugment
    erasing = DeviceNormalize(args, data_config, torch.device('cpu'), training=True).erase if prefetcher \
        else ops[RandomErasing]
    assert erasing.probability == 0.25 and erasing.mode == 'const'
    assert (RandomErasing in ops) == (not prefetcher)
    assert DeviceNormalize(args, data_config, torch.device('cpu'), training=False).erase is None
    val_ops = {type(t): t for t in val_set.transform.transforms}
    assert val_ops[transforms.Resize].size == int(32 / 0.8)

    # timm's own defaults otherwise: colour jitter 0.4, random erasing off, the model's interpolation
    args = args_for(*TINY, *data['save_to_disk'], *no_prefetcher)
    train_set, val_set, data_config = with_transforms(None, None, args, model)
    ops = {type(t): t for t in train_set.transform.transforms}
    assert transforms.ColorJitter in ops and RandomErasing not in ops
    assert data_config['interpolation'] == model.pretrained_cfg['interpolation']
    assert data_config['crop_pct'] == model.pretrained_cfg['crop_pct']



@pytest.mark.parametrize('in_chans, img_mode, channels', [(3, None, 'RGB'), (1, None, 'L'), (4, 'RGBA', 'RGBA'),
                                                          (1, 'L', 'L')])
def test_images_are_converted_to_the_model_channels(in_chans, img_mode, channels, data):
    """ --input-img-mode, by default the model's channels: grayscale to RGB gives three equal channels. """
    train_split, val_split, _ = load_splits(args_for(*TINY, *data['save_to_disk']))
    dataset = ImageClassification(val_split, TO_TENSOR, in_chans=in_chans, img_mode=img_mode)
    for i, (image, label, _) in enumerate(images_and_labels('validation')):
        x, y = dataset[i]
        assert y == label and x.shape == (in_chans, 16, 16)
        assert torch.equal(x, TO_TENSOR(image.convert(channels)))
    assert {image.mode for image, _, _ in images_and_labels('validation')} == {'L', 'RGB'}


@pytest.mark.parametrize('in_chans, img_mode, expected', [
    (2, None, 'images are read as grayscale or RGB, so the model must take 1 or 3 channels, not 2: '
              'set --in-chans 1 or 3 (or --input-img-mode)'),
    (3, 'RGBX2', '--input-img-mode RGBX2 is not a PIL image mode: use L, RGB or RGBA'),
    (3, 'L', '--input-img-mode L gives 1 channel(s), but the model takes 3: set --input-img-mode or --in-chans'),
    (1, 'I;16', '--input-img-mode I;16 is not 8 bits per channel: use L, RGB or RGBA'),
])
def test_image_mode_the_model_cannot_take_is_one_line(in_chans, img_mode, expected):
    with pytest.raises(UsageError) as error:
        ImageClassification(None, TO_TENSOR, in_chans=in_chans, img_mode=img_mode)
    assert str(error.value) == expected


def test_16_bit_grayscale_png_keeps_its_top_8_bits(tmp_path):
    """ PIL's own conversion clips I;16 at 255: all white. """
    values = [[0, 255, 256, 4660], [32768, 65280, 65534, 65535]]
    path = save_16bit_png(tmp_path / 'deep.png', values)
    assert Image.open(path).mode == 'I;16'
    expected = np.array([[0, 0, 1, 18], [128, 255, 255, 255]], dtype=np.uint8)  # v >> 8
    assert np.array_equal(np.asarray(read_image({'bytes': None, 'path': str(path)}, 'L')), expected)
    assert np.array_equal(np.asarray(read_image({'bytes': path.read_bytes(), 'path': None}, 'RGB')),
                          np.repeat(expected[..., None], 3, axis=-1))


def test_32_bit_integer_and_float_images_become_8_bit():
    """ I: 16-bit values (clipped to 0..65535, then v >> 8); F: 0..1 (v * 255, rounded, clipped). """
    ints = Image.fromarray(np.array([[-5, 0, 511, 65535, 70000]], dtype=np.int32))
    floats = Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], dtype=np.float32))
    assert (ints.mode, floats.mode) == ('I', 'F')
    assert np.asarray(as_8bit(ints)).tolist() == [[0, 0, 1, 255, 255]]
    assert np.asarray(as_8bit(floats)).tolist() == [[0, 0, 128, 255, 255]]
    rgb = Image.new('RGB', (2, 2), (1, 2, 3))
    assert as_8bit(rgb) is rgb


def test_string_labels_are_numbered_in_sorted_order(data):
    train_split, _, num_classes = load_splits(args_for(*TINY, *data['hfds_parquet']))
    assert train_split.features['fine_label'].names == sorted(CLASSES) and num_classes == 3
    assert sorted(train_split['fine_label']) == sorted(list(range(3)) * PER_CLASS)


@pytest.mark.parametrize('fmt', ['folder', 'hfds_parquet'])
@pytest.mark.parametrize('suffix', ['.txt', '.pkl'])
def test_class_map_numbers_the_classes(fmt, suffix, data, tmp_path):
    """ timm's --class-map: line i of the file (or the pickled {name: i}) is label i, with one class more
    than the data has. """
    names = ['emu', 'dog', 'cat', 'yak']
    class_map = tmp_path / f'classes{suffix}'
    if suffix == '.pkl':
        class_map.write_bytes(pickle.dumps({name: i for i, name in enumerate(names)}))
    else:
        class_map.write_text('\n'.join(names) + '\n')
    plain = load_splits(args_for(*TINY, *data[fmt]))
    args = args_for(*TINY, *data[fmt], '--class-map', class_map)
    mapped = load_splits(args)
    assert mapped[2] == 4 and mapped[0].features[args.target_key].names == names
    for before, after in zip(plain[:2], mapped[:2]):
        assert after[args.target_key] == [2 - y for y in before[args.target_key]]
        assert after[args.input_key] == before[args.input_key]


def bad_image_folder(root, how):
    """ The tiny image folder with one bad training image; (folder, bad file, the one error line). """
    folder = make_image_folder(root)
    bad = spoil_image(folder / 'train' / 'dog' / '10.png', how)
    reason = {'truncated': 'image file is truncated', 'text file': 'not an image file Pillow knows'}[how]
    return folder, bad, f'error: image {bad} cannot be read ({reason}): fix or remove it, or pass --skip-bad-images'


@pytest.mark.parametrize('workers', [0, 2])
@pytest.mark.parametrize('how', ['truncated', 'text file', 'decompression bomb'])
def test_unreadable_image_is_one_line_also_from_a_loader_worker(how, workers, tmp_path, capsys, monkeypatch):
    """ torch re-raises a worker's error with the worker's traceback in the message: still one line. """
    if how == 'decompression bomb':  # Pillow's guard, its limit lowered below half of 32x32
        folder, bad, _ = bad_image_folder(tmp_path / 'images', 'truncated')
        images_and_labels('train')[0][0].resize((32, 32)).save(bad)
        monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 500)
        line = (f'error: image {bad} cannot be read (Image size (1024 pixels) exceeds limit of 1000 pixels, could '
                f'be decompression bomb DOS attack): fix or remove it, or pass --skip-bad-images')
    else:
        folder, bad, line = bad_image_folder(tmp_path / 'images', how)
    train_split, _, _ = load_splits(args_for(*TINY, folder))
    loader = torch.utils.data.DataLoader(ImageClassification(train_split, TO_TENSOR), batch_size=4,
                                         num_workers=workers)
    capsys.readouterr()  # `datasets`' progress bars
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: list(loader))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == line + '\n'


@pytest.mark.parametrize('split', ['train', None])
def test_unreadable_image_stored_in_the_data_is_named_by_its_index(split, data):
    import datasets
    good = load_splits(args_for(*TINY, *data['save_to_disk']))[0][0]['image']
    features = datasets.Features({'image': datasets.Image(decode=False), 'label': datasets.Value('int64')})
    stored = datasets.Dataset.from_dict({'image': [good, {'bytes': b'junk', 'path': None}], 'label': [0, 1]},
                                        features=features, split=split)
    with pytest.raises(UsageError) as error:
        ImageClassification(stored, TO_TENSOR)[1]
    where = '#1 of split train' if split else '#1'
    assert str(error.value) == (f'image {where} cannot be read (not an image file Pillow knows): fix or remove it, '
                                f'or pass --skip-bad-images')


@pytest.mark.parametrize('workers', [0, 2])
@pytest.mark.parametrize('how', ['truncated', 'text file'])
def test_train_py_stops_at_an_unreadable_image_with_one_line(how, workers, tmp_path):
    folder, _, line = bad_image_folder(tmp_path / 'images', how)
    proc = run_train_py(tmp_path / 'out', *TINY, folder, '--workers', workers,
                        HF_DATASETS_CACHE=str(tmp_path / 'hf_cache'))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == line, proc.stderr


def test_train_py_skips_bad_images_when_asked(tmp_path):
    folder, bad, _ = bad_image_folder(tmp_path / 'images', 'truncated')
    proc = run_train_py(tmp_path / 'out', *TINY, folder, '--skip-bad-images', '--experiment', 'run',
                        HF_DATASETS_CACHE=str(tmp_path / 'hf_cache'))
    assert proc.returncode == 0, proc.stderr
    assert f'warning: image {bad} cannot be read' in proc.stderr
    assert len(read_summary(tmp_path / 'out' / 'run')) == 1


def test_skip_bad_images_takes_the_next_readable_example(tmp_path, capsys):
    folder, bad, line = bad_image_folder(tmp_path / 'images', 'text file')
    train_split, _, _ = load_splits(args_for(*TINY, folder))
    index = [value['path'] for value in train_split['image']].index(str(bad))
    dataset = ImageClassification(train_split, TO_TENSOR, skip_bad_images=True)
    capsys.readouterr()  # `datasets`' progress bars
    got = rows_of(dataset)
    assert got[index] == got[index + 1] and dataset.skipped == {index}
    reference = rows_of(ImageClassification(train_split.select([i for i in range(len(train_split)) if i != index]),
                                            TO_TENSOR))
    assert got[:index] + got[index + 1:] == reference
    assert rows_of(dataset) == got  # deterministic; warned once
    warning = line.replace('error: ', 'warning: ').replace(
        'fix or remove it, or pass --skip-bad-images', 'skipped (--skip-bad-images), the next readable one used')
    assert capsys.readouterr().err == warning + '\n'


def one_class_folder(root):
    folder = make_image_folder(root)
    for split in ('train', 'validation'):
        for name in CLASSES[1:]:
            shutil.rmtree(folder / split / name)
    return folder


def images_outside_class_folders(root):
    """ The image folder with two training images lying in train/ itself. """
    folder = make_image_folder(root)
    for name in ('0.png', '1.png'):
        (folder / 'train' / 'cat' / name).rename(folder / 'train' / name)
    return folder


def empty_val_folder(root):
    """ The image folder (timm's names) with its val/ there but empty. """
    folder = make_image_folder(root, val_folder='val')
    shutil.rmtree(folder / 'val')
    (folder / 'val').mkdir()
    return folder


def folder_without(root, split, name):
    """ The image folder with class `name`'s folder of `split` emptied (the folder stays). """
    folder = make_image_folder(root)
    for image in (folder / split / name).iterdir():
        image.unlink()
    return folder


def saved_without_training_rows(root, label):
    """ A save_to_disk dataset whose class `label` is in the validation split only. """
    import datasets
    saved = datasets.load_from_disk(make_saved_dataset(root / 'source'))
    saved['train'] = saved['train'].filter(lambda y: y != label, input_columns='label')
    saved.save_to_disk(root / 'saved')
    return root / 'saved'


BAD_DATA = {  # case: (flags, words of the one line); upper-case flags are made by the bad_data fixture
    'no data': (['-c', 'MODEL_ONLY_YAML'],
                'no data given: pass train.py DIR or --data-dir DIR (an image folder), or --dataset (hfds/<name>, '
                'a folder with the data, or digits)'),
    'timm reader not read here': (['--dataset', 'tfds/cifar10'], "--dataset tfds/cifar10: timm's tfds/ datasets "
                                  'are not read here; use an image folder (train.py DIR), hfds/<Hub name or folder>, '
                                  'torch/<name>, a folder with the data, or digits'),
    'missing image folder': (['--dataset', 'folder', '--data-dir', '/nonexistent/images'],
                             '--data-dir /nonexistent/images is not a folder'),
    'missing dataset folder': (['--dataset', '/nonexistent/data'], '/nonexistent/data', 'does not exist'),
    'missing image column': (['--dataset', 'SAVED', '--image-column', 'img'],
                             "column 'img' not in split 'train' (columns: image, label, coarse): "
                             'set --image-column (--input-key)'),
    'missing label column': (['--dataset', 'SAVED', '--target-key', 'fine_label'],
                             "column 'fine_label' not in split 'train' (columns: image, label, coarse): "
                             'set --label-column (--target-key)'),
    'no image column to default to': (['--dataset', 'PICTURE_COLUMN'],
                                      "split 'train' has no column image or img (columns: picture, label, coarse): "
                                      'set --image-column (--input-key)'),
    'image column of labels': (['--dataset', 'SAVED', '--image-column', 'label'],
                               "column 'label' holds class labels, not images: set --image-column (--input-key) "
                               'to the image column'),
    'image column of text': (['--dataset', 'PARQUET', '--image-column', 'fine_label'],
                             "column 'fine_label' holds text, not image files ('cat' is no file): "
                             'set --image-column (--input-key) to the image column'),
    'label column of images': (['--dataset', 'SAVED', '--label-column', 'image'],
                               "column 'image' holds images, not class labels: set --label-column (--target-key) "
                               'to the label column'),
    'one class': (['ONE_CLASS_FOLDER'], 'the data has only one class (cat): a classifier needs at least two; '
                                        'check --data-dir / the label column'),
    'empty training folder of a class': (['NO_TRAINING_EMUS'], "class 'emu' has 8 validation images but no training "
                                         'images: add training images of it, or remove it from the validation split'),
    'class in the validation split only': (['--dataset', 'EMUS_IN_VALIDATION_ONLY'], "class 'emu' has 8 validation "
                                           'images but no training images'),
    'class missing from the class map': (['--dataset', 'SAVED', '--class-map', 'CATS_AND_DOGS'],
                                         "class 'emu' of the data is not in --class-map", 'add it'),
    'class map for numbers': (['--dataset', 'INT_LABELS', '--class-map', 'CATS_AND_DOGS'],
                              "--class-map maps class names, but column 'label' holds numbers: drop --class-map"),
    'missing split': (['--dataset', 'SAVED', '--val-split', 'test'], "'test'", '--val-split'),
    'images outside a class folder': (['LOOSE_IMAGES'], '/train holds 2 image(s) outside a class folder (',
                                      '/train/0.png, ', '/train/1.png): move them into ',
                                      '/train/<class>/, the folder naming their class'),
    'empty validation folder': (['EMPTY_VAL'], '/val is empty: put the validation images in ', '/val/<class>/<image>'),
    'image size the model cannot take': (['--dataset', 'SAVED', '--model', 'test_vit', '--img-size', '30'],
                                         'cannot take', '30x30'),
    'channels the images cannot have': (['--dataset', 'SAVED', '--in-chans', '2'], '--in-chans 1 or 3'),
    'num classes disagree': (['--dataset', 'SAVED', '--num-classes', '4'], '--num-classes 4', '3 classes'),
}


@pytest.fixture(scope='module')
def bad_data(tmp_path_factory, data):
    root = tmp_path_factory.mktemp('bad_data')
    (root / 'model_only.yaml').write_text('model: resnet10t\n')
    (root / 'cats_and_dogs.txt').write_text('cat\ndog\n')
    return {
        'SAVED': data['save_to_disk'][1],
        'PARQUET': data['hfds_parquet'][1],
        'MODEL_ONLY_YAML': root / 'model_only.yaml',
        'PICTURE_COLUMN': make_saved_dataset(root / 'picture', image_column='picture'),
        'INT_LABELS': make_saved_dataset(root / 'int_labels', labels='int'),
        'ONE_CLASS_FOLDER': one_class_folder(root / 'one_class'),
        'NO_TRAINING_EMUS': folder_without(root / 'no_training_emus', 'train', 'emu'),
        'LOOSE_IMAGES': images_outside_class_folders(root / 'loose_images'),
        'EMPTY_VAL': empty_val_folder(root / 'empty_val'),
        'EMUS_IN_VALIDATION_ONLY': saved_without_training_rows(root / 'emus_in_validation_only', CLASSES.index('emu')),
        'CATS_AND_DOGS': root / 'cats_and_dogs.txt',
    }


@pytest.fixture
def no_progress_bars():
    """ `datasets`' progress bars (reading an image folder the first time) are not part of the error line
    that assert_bad_input reads from stderr. """
    import datasets
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.mark.parametrize('case', sorted(BAD_DATA))
def test_bad_data_input_is_one_clear_line(case, bad_data, capsys, tmp_path, no_progress_bars):
    argv, *expected = BAD_DATA[case]
    argv = [bad_data.get(a, a) if isinstance(a, str) else a for a in argv]
    assert_bad_input(capsys, tmp_path, [*TINY, *DG_MIX, *argv], *expected)


def test_hub_dataset_offline_says_how_to_get_it(tmp_path):
    """ Offline and not cached: one line naming the dataset and the save_to_disk way to train offline. """
    proc = run_train_py(tmp_path, *TINY, '--dataset', 'hfds/uoft-cs/cifar10',
                        HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and "'uoft-cs/cifar10'" in last and 'save_to_disk' in last, proc.stderr
    assert not any(tmp_path.rglob('summary.csv'))


def test_a_class_without_validation_images_is_a_warning(tmp_path, capsys, no_progress_bars):
    """ Training can go on (as in timm), and one line names the class. """
    folder = folder_without(tmp_path / 'data', 'validation', 'emu')
    train_main([*TINY, *DG_MIX, folder, '--output', tmp_path / 'runs'])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning: ')]
    assert warnings == ["warning: 1 class(es) have no validation images: 'emu'"]


def test_the_folder_reader_reads_every_format_pillow_reads(tmp_path, capsys, no_progress_bars):
    """ timm's reader takes .png, .jpg and .jpeg only; here a .bmp, .webp, .tif or .gif image is read too, and
    a file of no image format is named in one warning. """
    folder = make_image_folder(tmp_path / 'images')
    for n, suffix in enumerate(('.bmp', '.webp', '.tif', '.gif', '.JPG')):
        path = folder / 'train' / 'dog' / f'{8 + n}.png'
        Image.open(path).save(path.with_suffix(suffix))
        path.unlink()
    (folder / 'train' / 'dog' / 'notes.txt').write_text('not an image')
    train_split, val_split, num_classes = load_splits(args_for(*TINY, folder))
    assert (len(train_split), len(val_split), num_classes) == (3 * PER_CLASS, 3 * PER_CLASS, 3)
    dogs = [row['image']['path'] for row in train_split if row['label'] == CLASSES.index('dog')]
    assert sorted(Path(path).suffix for path in dogs) == ['.JPG', '.bmp', '.gif', '.png', '.png', '.png', '.tif',
                                                          '.webp']
    assert all(read_image(row['image'], 'RGB').size == (16, 16) for row in train_split)
    assert capsys.readouterr().err == (f'warning: 1 file(s) of {folder} are left out, their extensions being of no '
                                       f'image format Pillow reads: {folder / "train" / "dog" / "notes.txt"}\n')


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path, capsys, no_progress_bars):
    """ Jupyter's .ipynb_checkpoints/ (empty, or with a copy of an image) and macOS's .DS_Store are not data. """
    folder = make_image_folder(tmp_path / 'images')
    (folder / 'train' / '.ipynb_checkpoints').mkdir()
    (folder / 'validation' / 'cat' / '.ipynb_checkpoints').mkdir()
    shutil.copy(folder / 'validation' / 'cat' / '0.png', folder / 'validation' / 'cat' / '.ipynb_checkpoints')
    (folder / 'train' / '.DS_Store').write_bytes(b'\0')
    train_split, val_split, num_classes = load_splits(args_for(*TINY, folder))
    assert num_classes == 3 and train_split.features['label'].names == list(CLASSES)
    assert (len(train_split), len(val_split)) == (3 * PER_CLASS, 3 * PER_CLASS)
    assert 'warning' not in capsys.readouterr().err
