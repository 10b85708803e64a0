""" Accuracy benchmark: ERM, Mixup, SAM, G-Mix, BG-Mix, DG-Mix and the cheaper G-Mix settings on Fashion-MNIST (and,
as before, on the built-in digits), with a positive control, tuning that reaches each method's region, and paired
intervals.

    python benchmarks/accuracy.py --sizing        # one run of each method of each arm, and the total it implies
    python benchmarks/accuracy.py                 # hours on 2 CPU cores; stop and rerun to continue
    python benchmarks/accuracy.py --speed         # then each method's step time (alone: nothing else running)
    python benchmarks/accuracy.py --report-only   # rebuild the tables and plots from the CSV and JSON files
    python benchmarks/accuracy.py --suite digits  # the previous benchmark, on the built-in digits

Fashion-MNIST (`--suite fashion_mnist`, the default; Debian's `apt-get install dataset-fashion-mnist`): the
official 60,000 training images are shuffled once (SPLIT_SEED); the first FMNIST_VAL of them are the validation
split every choice is made on, and each arm's training images are the next N (the arms' subsets are nested). Test
is the official 10,000 test images, used only for the final runs. Arms (each its own model, data and schedule, the
same for every method of the arm), all with --device-data:
    fmnist-control  the positive control: resnet10t, 4,000 training images with 40% symmetric label noise, long
                    enough for ERM to fit the noise; Mixup and SAM are reported to help a lot there
    fmnist-cnn      resnet10t at 28x28 on 1 channel, SGD, on 2,000 clean training images (limited data)
    fmnist-vit      test_vit with depth 2 (4x4 patches, 49 tokens), AdamW, on the same 2,000 images
    fmnist-noisy    the harder regime: fmnist-cnn's images with 20% symmetric label noise
The digits (`--suite digits`): the arms `control`, `cnn`, `cnn-noisy` and `vit` of the previous benchmark on
scikit-learn's 8x8 digits (1,078 training images), with its results in accuracy_digits.md.
A noisy split replaces exactly round(noise x N) labels by a uniformly drawn different class (fixed seed);
validation and test stay clean. Each split is built once as a `save_to_disk` DatasetDict in benchmarks/cache/ and
read by train.py through its usual `--dataset <folder>` path (train.py has no label-noise flag, as timm's has none).

Tuning, the same rule for every method (validation split, one tuning seed):
- one-parameter methods start from a grid of four values (ERM tunes the learning rate: x0.5 to x4 the arm's);
- two-parameter methods start from the one-parameter methods' choices: rho from SAM's (MSAM: ten times it; its
  radii are of that order), alpha from Mixup's (CutMix's for none here), LookSAM's reuse alpha from 0.1, each
  with its half and its double (3 x 3 configurations; LookSAM keeps Mixup's alpha);
- a choice at an edge of what was tried extends that flag one step past the edge (halve or double), the other
  flags at their chosen values, until the choice is interior or at a hard limit (HARD_LIMITS). Every extension
  is a row of the CSV; the report lists the values each method ended with.
The budget differs between methods; the report gives the configurations each tried. The chosen configuration
(best validation accuracy, first tried wins a tie) then trains with seeds 1..N and reports test accuracy at the
last epoch. Runs of different methods with one seed share the data order and the initialization, so the
report compares them per seed: each method minus ERM, minus Mixup and minus SAM, with a paired 95% t interval;
"not separable" where the interval holds 0.

`--sizing` trains each method of each arm once (tuning seed, validation split: the second value of its start
grid, which is then its first tuning run, or the papers' rho 0.05 and alpha 0.2 for the two-parameter ones, as
phase "size" rows that tuning does not count) and states what the whole benchmark costs: each method's time
times its start grid, one extension per tuned flag and its seeds.

Each final run's exported model is kept in benchmarks/cache/accuracy/<arch>/<method>/seed<k>/ (model/ and
run.json) for benchmarks/sharpness.py. Step times come from benchmarks/speed.py on each arm's model, batch and
optimizer (`--speed`, results/speed_<arch>.json), relative to train.py's own SGD + Mixup step (`gmix_step` with
the default step guard, which every method here pays). Each run's result is appended to the CSV as it finishes;
a rerun skips what is already there.
"""
import argparse
import csv
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from runs_csv import RunsCSV

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
CACHE = ROOT / 'benchmarks' / 'cache'
# name: (fraction of the digits' training split, label noise)
NOISY_DIGITS = {'digits_10pct_20pct_noise': (0.1, 0.2), 'digits_all_40pct_noise': (1.0, 0.4)}
FMNIST_ROOT = '/usr/share/datasets/fashion-mnist'  # Debian's dataset-fashion-mnist
FMNIST_VAL = 5000  # validation images carved from the official training set
# name: (training images after the validation ones, label noise)
FASHION_MNIST = {'fmnist_2k': (2000, 0.0), 'fmnist_2k_20pct_noise': (2000, 0.2), 'fmnist_4k_40pct_noise': (4000, 0.4)}

# Validated (and saved) at the last epoch only: what the benchmark reports, and nothing else changes the run.
COMMON = ['--warmup-epochs', '1', '--sched', 'cosine', '--workers', '0', '--smoothing', '0.1', '--scale', '0.8',
          '1.0', '--color-jitter', '0', '--val-interval', '1000']
DIGITS_COMMON = [*COMMON, '--hflip', '0']
# Clothes are mirror-symmetric left to right; the split sits on the device (the loader's workers would decide the
# speed of these small images; device_data_accuracy.md measures the option against the loader)
FMNIST_COMMON = [*COMMON, '--hflip', '0.5', '--device-data']
CNN = ['--model', 'resnet10t', '--img-size', '32', '-b', '16', '--lr', '0.05', '--weight-decay', '5e-4']
CNN_SPEED = ['--model', 'resnet10t', '--img-size', '32', '-b', '16', '--opt', 'sgd']
VIT_KWARGS = dict(img_size=32, patch_size=4, class_token=False, depth=2)
FMNIST_CNN = ['--model', 'resnet10t', '--in-chans', '1', '--img-size', '28', '-b', '64', '--lr', '0.05',
              '--weight-decay', '5e-4']
FMNIST_VIT_KWARGS = dict(img_size=28, patch_size=4, class_token=False, depth=2)
CONTROL_EPOCHS = 30
# ERM at the lr every other method trains with: the papers' comparison. Tuned ERM's larger lr also resists the noise.
ERM_SHARED_LR = "ERM (the arm's lr)"
CONTROL_METHODS = ('ERM', ERM_SHARED_LR, 'Mixup', 'SAM', 'G-Mix')
FMNIST_METHODS = ('ERM', ERM_SHARED_LR, 'Mixup', 'SAM', 'G-Mix', 'BG-Mix', 'DG-Mix', 'G-Mix (MSAM)',
                  'DG-Mix (every 8th)')


def fmnist(name):
    return str(CACHE / name)


# Per arm: its suite, train.py flags shared by every method, the optimizer, its lr, the speed.py flags of the same
# step (None: the suite's CNN arm's), the seeds of the final runs, the methods run (None: all) and, for --sizing,
# the arm of the same model whose runs it scales by training images x epochs (none: it is sized itself).
ARCHS = {
    'fmnist-control': dict(suite='fashion_mnist', argv=['--dataset', fmnist('fmnist_4k_40pct_noise'), *FMNIST_CNN,
                                                        '--epochs', '20'],
                           base='sgd', lr=0.05, speed=None, seeds=5, methods=CONTROL_METHODS, sized_as='fmnist-cnn'),
    'fmnist-cnn': dict(suite='fashion_mnist', argv=['--dataset', fmnist('fmnist_2k'), *FMNIST_CNN, '--epochs', '30'],
                       base='sgd', lr=0.05, seeds=5, methods=FMNIST_METHODS,
                       speed=['--model', 'resnet10t', '--img-size', '28', '-b', '64', '--opt', 'sgd']),
    'fmnist-vit': dict(suite='fashion_mnist', argv=['--dataset', fmnist('fmnist_2k'), '--model', 'test_vit',
                                                    '--in-chans', '1', '--img-size', '28', '-b', '64',
                                                    '--model-kwargs',
                                                    *[f'{k}={v}' for k, v in FMNIST_VIT_KWARGS.items()], '--gp', 'avg',
                                                    '--epochs', '30', '--warmup-epochs', '2', '--lr', '2e-3',
                                                    '--weight-decay', '0.05'],
                       base='adamw', lr=2e-3, seeds=5, methods=FMNIST_METHODS,
                       speed=['--model', 'test_vit', '--model-kwargs',
                              json.dumps({**FMNIST_VIT_KWARGS, 'global_pool': 'avg'}), '--img-size', '28', '-b', '64',
                              '--opt', 'adamw']),
    'fmnist-noisy': dict(suite='fashion_mnist', argv=['--dataset', fmnist('fmnist_2k_20pct_noise'), *FMNIST_CNN,
                                                      '--epochs', '30'],
                         base='sgd', lr=0.05, speed=None, seeds=5, methods=(*CONTROL_METHODS, 'DG-Mix'),
                         sized_as='fmnist-cnn'),
    'control': dict(suite='digits', argv=['--dataset', str(CACHE / 'digits_all_40pct_noise'), *CNN, '--epochs',
                                          str(CONTROL_EPOCHS)],
                    base='sgd', lr=0.05, speed=None, seeds=5, methods=CONTROL_METHODS),
    'cnn': dict(suite='digits', argv=['--dataset', 'digits', '--train-subset', '0.2', *CNN, '--epochs', '12'],
                base='sgd', lr=0.05, speed=CNN_SPEED, seeds=10, methods=None),
    'cnn-noisy': dict(suite='digits', argv=['--dataset', str(CACHE / 'digits_10pct_20pct_noise'), *CNN, '--epochs',
                                            '20'],
                      base='sgd', lr=0.05, speed=None, seeds=10, methods=None),
    'vit': dict(suite='digits', argv=['--dataset', 'digits', '--model', 'test_vit', '--img-size', '32', '-b', '32',
                                      '--model-kwargs', *[f'{k}={v}' for k, v in VIT_KWARGS.items()], '--gp', 'avg',
                                      '--epochs', '20', '--warmup-epochs', '2', '--lr', '2e-3', '--weight-decay',
                                      '0.05'], base='adamw', lr=2e-3,
                speed=['--model', 'test_vit', '--model-kwargs', json.dumps({**VIT_KWARGS, 'global_pool': 'avg'}),
                       '--img-size', '32', '-b', '32', '--opt', 'adamw'], seeds=5, methods=None),
}
# suite -> its flags, the runs' CSV, the report and its plot, the arm whose step times stand for arms without
# their own, and the report's title and opening
SUITES = {
    'fashion_mnist': dict(
        common=FMNIST_COMMON, csv='accuracy_runs.csv', md='accuracy.md', png='accuracy_pareto.png',
        speed='fmnist-cnn', title='Accuracy on Fashion-MNIST: a positive control, three arms, exact and cheaper G-Mix',
        intro=f'Data: Fashion-MNIST (Debian\'s dataset-fashion-mnist, read by timm\'s torch/fashion_mnist). The '
              f'official training set shuffled once: its first {FMNIST_VAL:,} images are the validation split of '
              f'every choice, the arms train on the next 2,000 or 4,000; test is the official 10,000 test images (one '
              f'image is 0.01 points). Published reference points on the full 60,000 training images (the dataset\'s '
              f'benchmark table): a 2-conv network 91.6%, ResNet18 94.9%, WRN-28-10 95.9%, WRN-40-4 96.7%.'),
    'digits': dict(
        common=DIGITS_COMMON, csv='accuracy_digits_runs.csv', md='accuracy_digits.md', png='accuracy_digits_pareto.png',
        speed='cnn', title='Accuracy on the built-in digits: a positive control, three arms, exact and cheaper G-Mix',
        intro='Data: scikit-learn\'s 1,797 8x8 digits, split 60/20/20 (one test image is 0.28 points).\n\n'
              '**Note (added after the run):** the DG-Mix rows of the `cnn` and `cnn-noisy` arms (DG-Mix, DG-Mix '
              'every 8th, LookSAM DG-Mix) were trained with the release whose DG-Mix descent batch was padded with '
              'zero-weight rows that entered resnet10t\'s BatchNorm statistics; they are not of exact DG-Mix and have '
              'not been rerun. The `vit` arm (no BatchNorm) is exact.'),
}
SAM = ['--opt', 'gmix_sam', '--sam-base', '{base}']
# method -> (fixed flags, where its tuned flags start, speed.py mode of its step). A start is a tuple of values (a
# one-parameter grid), or (method, flag, scale): the value another method chose for `flag`, times `scale`.
METHODS = {
    'ERM': (['--opt', '{base}'], {'--lr': ('x0.5', 'x1', 'x2', 'x4')}, 'sgd_mixup_guarded'),
    ERM_SHARED_LR: (['--opt', '{base}'], {}, 'sgd_mixup_guarded'),
    'Mixup': (['--opt', '{base}'], {'--mixup': (0.1, 0.2, 0.5, 1.0)}, 'sgd_mixup_guarded'),
    'CutMix': (['--opt', '{base}'], {'--cutmix': (0.1, 0.2, 0.5, 1.0)}, 'sgd_mixup_guarded'),
    'SAM': (SAM, {'--rho': (0.01, 0.02, 0.05, 0.1)}, 'sam'),
    'ASAM': ([*SAM, '--asam'], {'--rho': (0.25, 0.5, 1.0, 2.0)}, 'sam:adaptive'),
    'G-Mix': ([*SAM, '--mixup-mode', 'g'], {'--rho': ('SAM', 1), '--mixup': ('Mixup', 1)}, 'g'),
    'BG-Mix': ([*SAM, '--mixup-mode', 'bg'], {'--rho': ('SAM', 1), '--mixup': ('Mixup', 1)}, 'bg'),
    'DG-Mix': ([*SAM, '--mixup-mode', 'dg'], {'--rho': ('SAM', 1), '--mixup': ('Mixup', 1)}, 'dg'),
    'G-Mix (MSAM)': ([*SAM, '--mixup-mode', 'g', '--sam-perturb', 'momentum'],
                     {'--rho': ('SAM', 10), '--mixup': ('Mixup', 1)}, 'g:perturb=momentum'),
    'DG-Mix (every 8th)': ([*SAM, '--mixup-mode', 'dg', '--sam-interval', '8'],
                           {'--rho': ('SAM', 1), '--mixup': ('Mixup', 1)}, 'dg:interval=8'),
    'DG-Mix (LookSAM, every 8th)': ([*SAM, '--mixup-mode', 'dg', '--sam-interval', '8'],
                                    {'--rho': ('SAM', 1), '--sam-reuse': (0.1,), '--mixup': ('Mixup', 1, 'fixed')},
                                    'dg:interval=8,reuse=0.1'),
}
# The smallest and largest value tuning may reach, per flag (lr: times the arm's).
HARD_LIMITS = {'--lr': (1 / 16, 16), '--mixup': (0.025, 8.0), '--cutmix': (0.025, 8.0), '--rho': (0.005, 8.0),
               '--sam-reuse': (0.0125, 1.6)}
EXACT = ('ERM', 'Mixup', 'CutMix', 'SAM', 'ASAM', 'G-Mix', 'BG-Mix', 'DG-Mix')
REFERENCES = ('ERM', ERM_SHARED_LR, 'Mixup', 'SAM')  # the paired comparisons
TUNING_SEED = 101  # apart from the reported seeds 1..N
SPEED_REFERENCE = 'sgd_mixup_guarded'
FIELDS = ['arch', 'method', 'phase', 'hparams', 'seed', 'split', 'top1', 'loss', 'seconds']


def slug(method: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', method.lower()).strip('-')


def methods_of(arch):
    return ARCHS[arch]['methods'] or tuple(METHODS)


def with_noisy_labels(train, noise, seed=0):
    """ `train` with exactly round(noise x N) labels replaced by a uniformly drawn different class. """
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.array(train['label'])
    classes = train.features['label'].num_classes
    flipped = rng.choice(len(labels), size=round(noise * len(labels)), replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, classes, size=len(flipped))) % classes
    return train.remove_columns('label').add_column('label', labels.tolist()).cast(train.features)


def save_splits(splits, path):
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        splits.save_to_disk(tmp)
        shutil.copytree(tmp, path)


def build_noisy_digits(name, fraction, noise):
    """ CACHE/name: a fixed `fraction` of the digits' training split, `noise` of its labels replaced; validation and
    test as they are. """
    from timm_gmix.training.data import SPLIT_SEED, digits_dataset

    path = CACHE / name
    if (path / 'dataset_dict.json').is_file():
        return
    splits = digits_dataset()
    train = splits['train'].shuffle(seed=SPLIT_SEED).select(range(round(fraction * len(splits['train']))))
    splits['train'] = with_noisy_labels(train, noise)
    save_splits(splits, path)


def build_fashion_mnist(name, size, noise):
    """ CACHE/name: validation the first FMNIST_VAL images of the shuffled official training set, train the next
    `size` with `noise` of their labels replaced, test the official test set; read through timm's torch/ reader. """
    import datasets
    from timm_gmix.training.data import SPLIT_SEED
    from timm_gmix.training.torch_datasets import torch_dataset_dict

    path = CACHE / name
    if (path / 'dataset_dict.json').is_file():
        return
    if not Path(FMNIST_ROOT, 'train-images-idx3-ubyte.gz').is_file():
        sys.exit(f'error: Fashion-MNIST is not in {FMNIST_ROOT}: apt-get install dataset-fashion-mnist')
    official = torch_dataset_dict('torch/fashion_mnist', FMNIST_ROOT, splits=('train', 'test'))
    pool = official['train'].shuffle(seed=SPLIT_SEED)
    splits = datasets.DatasetDict(validation=pool.select(range(FMNIST_VAL)),
                                  train=with_noisy_labels(pool.select(range(FMNIST_VAL, FMNIST_VAL + size)), noise),
                                  test=official['test'])
    save_splits(splits, path)


def build_data(suite):
    if suite == 'digits':
        for name, (fraction, noise) in NOISY_DIGITS.items():
            build_noisy_digits(name, fraction, noise)
    else:
        for name, (size, noise) in FASHION_MNIST.items():
            build_fashion_mnist(name, size, noise)


def train_argv(arch, method, hparams, seed, split):
    fixed = METHODS[method][0]
    base = ARCHS[arch]['base']
    return [*SUITES[ARCHS[arch]['suite']]['common'], *ARCHS[arch]['argv'], *[a.format(base=base) for a in fixed],
            *itertools.chain.from_iterable((k, f'{v:g}') for k, v in hparams.items()),
            '--seed', str(seed), '--val-split', split]


def train_once(arch, method, phase, hparams, seed, split):
    """ One train.py run in this worker process; returns its CSV row. A final run keeps its model. """
    import torch
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState
    sys.path.insert(0, str(ROOT))
    import train

    argv = train_argv(arch, method, hparams, seed, split)
    AcceleratorState._reset_state(True)
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        train.main([*argv, '--output', out, '--experiment', 'run'])
        with open(Path(out) / 'run' / 'summary.csv') as f:
            last = list(csv.DictReader(f))[-1]
        top1 = float(last['eval_top1'])
        if phase == 'final':
            keep = CACHE / 'accuracy' / arch / slug(method) / f'seed{seed}'
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(Path(out) / 'run' / 'model', keep / 'model')
            (keep / 'run.json').write_text(json.dumps(dict(arch=arch, method=method, seed=seed, hparams=hparams,
                                                           argv=argv, test_top1=top1), indent=1) + '\n')
    return dict(arch=arch, method=method, phase=phase, hparams=json.dumps(hparams, sort_keys=True), seed=seed,
                split=split, top1=top1, loss=float(last['eval_loss']), seconds=round(time.time() - start, 1))


class Runner(RunsCSV):
    """ Runs jobs `workers` at a time, appending each result to the CSV as it finishes. """

    def __init__(self, csv_path, workers):
        super().__init__(csv_path, FIELDS)
        self.workers = workers
        self.started = time.time()

    def done(self, job):
        arch, method, phase, hparams, seed, _ = job
        key = (arch, method, phase, json.dumps(hparams, sort_keys=True), str(seed))
        return any((r['arch'], r['method'], r['phase'], r['hparams'], r['seed']) == key for r in self.rows)

    def run(self, jobs):
        """ Run the jobs not yet in the CSV. """
        jobs = list({json.dumps(j, sort_keys=True): j for j in jobs if not self.done(j)}.values())
        if not jobs:
            return
        with ProcessPoolExecutor(self.workers) as pool:
            for n, future in enumerate(as_completed([pool.submit(train_once, *job) for job in jobs]), 1):
                row = future.result()
                self.append(row)
                print(f'[{n}/{len(jobs)} of this stage, {(time.time() - self.started) / 60:.0f} min] {row["arch"]} '
                      f'{row["method"]} {row["phase"]} {row["hparams"]} seed {row["seed"]}: {row["top1"]:.2f}% '
                      f'({row["seconds"]}s)', flush=True)


# ----------------------------------------------------------------------------------------------
# Tuning


def tuned(rows, arch, method):
    """ {hparams json: validation accuracy} of the tuning runs so far, in the order they were run. """
    return {r['hparams']: float(r['top1']) for r in rows
            if r['arch'] == arch and r['method'] == method and r['phase'] == 'tune'}


def chosen(rows, arch, method):
    """ The tried configuration with the best validation accuracy (the first tried wins a tie); {} for a method
    that tunes nothing. """
    if not METHODS[method][1]:
        return {}
    accs = tuned(rows, arch, method)
    return json.loads(max(accs, key=accs.get)) if accs else None


def _value(arch, flag, value):
    """ A start value as a number: 'x2' is twice the arm's lr. """
    return ARCHS[arch]['lr'] * float(value[1:]) if isinstance(value, str) else float(value)


def _limits(arch, flag):
    low, high = HARD_LIMITS[flag]
    return (low * ARCHS[arch]['lr'], high * ARCHS[arch]['lr']) if flag == '--lr' else (low, high)


def start_grid(rows, arch, method):
    """ The first configurations of `method`, or None while a method it starts from has not chosen yet. """
    axes = {}
    for flag, start in METHODS[method][1].items():
        if start and isinstance(start[0], str) and start[0] in METHODS:
            source = chosen(rows, arch, start[0])
            if source is None or not is_settled(rows, arch, start[0]):
                return None
            center = source[flag if flag in source else next(iter(source))] * start[1]
            axes[flag] = (center,) if 'fixed' in start else (center / 2, center, center * 2)
        elif len(start) == 1:  # a one-value start of a two-parameter method: it and its half and double
            axes[flag] = (start[0] / 2, start[0], start[0] * 2)
        else:
            axes[flag] = tuple(_value(arch, flag, v) for v in start)
    for flag, values in axes.items():
        low, high = _limits(arch, flag)
        axes[flag] = tuple(sorted({min(max(v, low), high) for v in values}))
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def fixed_flags(method):
    return {flag for flag, start in METHODS[method][1].items() if start and 'fixed' in start}


def extensions(rows, arch, method):
    """ The configurations that take the choice one step past an edge of what was tried: for each flag whose
    chosen value is the smallest or largest tried (and not at its hard limit), half or double it, the other flags
    at their chosen values. """
    best = chosen(rows, arch, method)
    tried = [json.loads(h) for h in tuned(rows, arch, method)]
    new = []
    for flag, value in best.items():
        if flag in fixed_flags(method):
            continue
        values = sorted({t[flag] for t in tried})
        low, high = _limits(arch, flag)
        for edge, step, limit in ((values[0], 0.5, low), (values[-1], 2.0, high)):
            if value == edge and len(values) > 0 and not math.isclose(value, limit):
                beyond = min(max(value * step, low), high)
                candidate = {**best, flag: beyond}
                if json.dumps(candidate, sort_keys=True) not in tuned(rows, arch, method):
                    new.append(candidate)
    return new


def missing_starts(rows, arch, method):
    """ The start configurations not yet tried, or None while a method it starts from has not settled. """
    grid = start_grid(rows, arch, method)
    tried = tuned(rows, arch, method)
    return None if grid is None else [hp for hp in grid if json.dumps(hp, sort_keys=True) not in tried]


def is_settled(rows, arch, method):
    """ Tuning is over: the start grid tried, and no extension left to try. """
    return missing_starts(rows, arch, method) == [] and not extensions(rows, arch, method)


def tuning_jobs(rows, arms):
    """ The next tuning runs: each method's start once what it starts from has settled (the part of it not yet
    tried, after a stop), then its extensions. """
    jobs = []
    for arch in arms:
        for method in filter(lambda m: METHODS[m][1], methods_of(arch)):
            missing = missing_starts(rows, arch, method)
            configs = extensions(rows, arch, method) if missing == [] else missing
            jobs += [(arch, method, 'tune', hp, TUNING_SEED, 'validation') for hp in configs or []]
    return jobs


def final_jobs(rows, arms):
    """ Seed by seed, so that a benchmark stopped early has every method of every arm on its first seeds. """
    jobs = [(arch, method, 'final', chosen(rows, arch, method), s, 'test')
            for arch in arms for method in methods_of(arch) for s in range(1, ARCHS[arch]['seeds'] + 1)]
    return sorted(jobs, key=lambda job: job[4])


SIZING_VALUES = {'--rho': 0.05, '--mixup': 0.2, '--sam-reuse': 0.1}  # the papers' values, for methods tuned later
SIZED_AS = {ERM_SHARED_LR: 'ERM'}  # its run is ERM's at the arm's lr, which sizing trains


def sizing_config(arch, method):
    """ The configuration `--sizing` times: each flag at the second value of its start grid, or at SIZING_VALUES
    (times the start's scale) where the start comes from another method's choice. """
    config = {}
    for flag, start in METHODS[method][1].items():
        if isinstance(start[0], str) and start[0] in METHODS:
            config[flag] = SIZING_VALUES[flag] * start[1]
        else:
            config[flag] = _value(arch, flag, start[min(1, len(start) - 1)])
    return config


def sizing_jobs(arms):
    """ One run of each method: a tuning run where its configuration starts the method's grid (the one-parameter
    methods), else a "size" run that tuning does not count. """
    jobs = []
    for arch in dict.fromkeys(ARCHS[arch].get('sized_as', arch) for arch in arms):
        for method in methods_of(arch):
            if method in SIZED_AS:
                continue
            config = sizing_config(arch, method)
            phase = 'tune' if METHODS[method][1] and config in (start_grid([], arch, method) or []) else 'size'
            jobs.append((arch, method, phase, config, TUNING_SEED, 'validation'))
    return jobs


def planned_runs(arch, method):
    """ (tuning runs, final runs) of `method` on `arch` before the extensions are known: its start grid and one
    extension per tuned flag (the digits benchmark averaged 0.9), then its seeds. """
    starts = METHODS[method][1]
    grid = math.prod(1 if 'fixed' in start else 3 if len(start) == 1 or start[0] in METHODS else len(start)
                     for start in starts.values())
    tuned_flags = sum('fixed' not in start for start in starts.values())
    return (grid + tuned_flags if starts else 0), ARCHS[arch]['seeds']


def work(arch) -> int:
    """ Training images x epochs of one run of `arch` (a Fashion-MNIST arm). """
    argv = ARCHS[arch]['argv']
    name = Path(argv[argv.index('--dataset') + 1]).name
    return FASHION_MNIST[name][0] * int(argv[argv.index('--epochs') + 1])


def sizing_report(rows, arms, workers) -> list:
    """ The sizing table: each method's measured run (or, for an arm sized as another, that run scaled by the work)
    and what the planned runs of it cost. """
    lines = ['## Sizing: one run of each method, and the benchmark it implies', '',
             f'`python benchmarks/accuracy.py --sizing`: each method trained once on each model ({workers} workers '
             f'side by side, one thread each, as the benchmark runs); an arm of the same model is that run times its '
             f'training images x epochs over the measured arm\'s. Planned runs: the start grid, one extension per '
             f'tuned flag, the final seeds.', '',
             '| arm | method | one run (s) | planned tuning + final runs | core-hours |',
             '| --- | --- | ---: | ---: | ---: |']
    total = 0.0
    for arch in arms:
        measured = ARCHS[arch].get('sized_as', arch)
        scale = work(arch) / work(measured) if measured != arch else 1.0
        for method in methods_of(arch):
            sized = SIZED_AS.get(method, method)
            config = json.dumps(sizing_config(measured, sized), sort_keys=True)
            times = [float(r['seconds']) for r in rows
                     if (r['arch'], r['method'], r['hparams']) == (measured, sized, config)
                     and r['phase'] in ('size', 'tune') and int(r['seed']) == TUNING_SEED]
            if not times:
                continue
            seconds = times[-1] * scale
            tune, final = planned_runs(arch, method)
            total += seconds * (tune + final)
            estimate = '' if measured == arch else f' (from {measured}: x{scale:.2f})'
            lines.append(f'| {arch} | {method} | {seconds:.0f}{estimate} | {tune} + {final} | '
                         f'{seconds * (tune + final) / 3600:.2f} |')
    lines += ['', f'Total: {total / 3600:.1f} core-hours, about {total / 3600 / workers:.1f} hours with {workers} '
                  f'workers.', '']
    return lines


# ----------------------------------------------------------------------------------------------
# Report


def finals(rows):
    """ (arch, method) -> (chosen hparams, {seed: test accuracy}). """
    groups = {}
    for r in rows:
        if r['phase'] == 'final':
            groups.setdefault((r['arch'], r['method']), (r['hparams'], {}))[1][int(r['seed'])] = float(r['top1'])
    return groups


def mean_sd(values):
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: dict, b: dict):
    """ (mean of a - b over the seeds both have, 95% t interval low, high, seeds). """
    from scipy.stats import t
    seeds = sorted(a.keys() & b.keys())
    diffs = [a[s] - b[s] for s in seeds]
    m, sd = mean_sd(diffs)
    half = t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return m, m - half, m + half, len(seeds)


def interval(a, b) -> str:
    m, low, high, _ = paired(a, b)
    verdict = 'not separable' if low <= 0 <= high else ('better' if low > 0 else 'worse')
    return f'{m:+.2f} [{low:+.2f}, {high:+.2f}] {verdict}'


def step_times(out_dir):
    """ arch -> {method: step time / train.py's SGD + Mixup step}, for the arms whose speed was measured. """
    times = {}
    for arch, cfg in ARCHS.items():
        path = out_dir / f'speed_{arch if cfg["speed"] else SUITES[cfg["suite"]]["speed"]}.json'
        if path.is_file():
            ratios = json.loads(path.read_text())
            times[arch] = {m: ratios[mode] / ratios[SPEED_REFERENCE] for m, (_, _, mode) in METHODS.items()
                           if mode in ratios}
    return times


def trained_arms(groups, arms):
    return [arch for arch in arms if any(a == arch for a, _ in groups)]


def grid_text(rows, arch, method) -> str:
    """ The values each tuned flag ended with (the chosen one in bold). """
    best = chosen(rows, arch, method)
    tried = [json.loads(h) for h in tuned(rows, arch, method)]
    return '; '.join(f'{flag} ' + ', '.join(f'**{v:g}**' if v == best[flag] else f'{v:g}'
                                            for v in sorted({t[flag] for t in tried})) for flag in best)


def report(rows, out_dir, suite, command, workers):
    suite_cfg, arms = SUITES[suite], [arch for arch in ARCHS if ARCHS[arch]['suite'] == suite]
    groups, times = finals(rows), step_times(out_dir)
    lines = [f'# {suite_cfg["title"]}', '', suite_cfg['intro'], '',
             f'Reproduce: `{command}`, then `{command} --speed` alone (results: `{suite_cfg["csv"]}`, '
             f'`speed_<arch>.json`).', '',
             f'Common settings: `{" ".join(suite_cfg["common"])}`. Test accuracy (%) at the last epoch: mean ± standard '
             f'deviation over seeds. Differences are paired by seed (same data order and initialization): mean [95% t '
             f'interval]; "not separable" where the interval holds 0. Tuning on the validation split with seed '
             f'{TUNING_SEED}: the grids each method ended with are listed (chosen value in bold), with the number of '
             f'configurations it tried. Step time: relative to train.py\'s SGD + Mixup step, measured with '
             f'benchmarks/speed.py on the arm\'s model, batch and optimizer.', '']
    for arch in trained_arms(groups, arms):
        cfg = ARCHS[arch]
        argv = ' '.join(cfg['argv']).replace(f'{ROOT}/', '')
        refs = [m for m in REFERENCES if (arch, m) in groups]
        lines += [f'## {arch}: `{argv}`, base optimizer {cfg["base"]}', '',
                  '| method | test top-1 | seeds | ' + ' | '.join(f'− {r}' for r in refs) +
                  ' | step time | configurations tried | grid (chosen in bold) |',
                  '| --- | ---: | ---: | ' + ' --- |' * len(refs) + ' ---: | ---: | --- |']
        for method in methods_of(arch):
            if (arch, method) not in groups:
                continue
            _, accs = groups[arch, method]
            m, sd = mean_sd(accs.values())
            diffs = ['' if r == method else interval(accs, groups[arch, r][1]) for r in refs]
            t = times.get(arch, {}).get(method)
            lines.append(f'| {method} | {m:.2f} ± {sd:.2f} | {len(accs)} | ' + ' | '.join(diffs) +
                         f' | {"" if t is None else f"{t:.2f}"} | {len(tuned(rows, arch, method))} | '
                         f'{grid_text(rows, arch, method)} |')
        lines.append('')
    if any(r['phase'] == 'size' and r['arch'] in arms for r in rows):
        lines += sizing_report(rows, arms, workers)
    (out_dir / suite_cfg['md']).write_text('\n'.join(lines) + '\n')
    plot(groups, times, out_dir / suite_cfg['png'], arms)
    print('\n'.join(lines))


def plot(groups, times, path, arms):
    """ One panel per arm: test accuracy (mean, error bar: standard error) against relative step time. """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    arms = [arch for arch in trained_arms(groups, arms) if arch in times]
    if not arms:
        return
    fig, axes = plt.subplots(1, len(arms), figsize=(6 * len(arms), 4.8), squeeze=False)
    for ax, arch in zip(axes[0], arms):
        for i, method in enumerate(METHODS):
            if (arch, method) not in groups or method not in times.get(arch, {}):
                continue
            accs = list(groups[arch, method][1].values())
            m, sd = mean_sd(accs)
            ax.errorbar(times[arch][method], m, yerr=sd / math.sqrt(len(accs)), fmt='o' if method in EXACT else 's',
                        capsize=3, color=plt.cm.tab20(i), label=method)
        ax.set(xlabel="step time / train.py's SGD + Mixup step", ylabel='test top-1 (%)', title=arch)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=6, fontsize='small')
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


def measure_speed(out_dir, rounds, arms):
    """ benchmarks/speed.py on each arm's step, every method's mode, in one process (run it alone). """
    modes = list(dict.fromkeys(['sgd_mixup', SPEED_REFERENCE, *(mode for _, _, mode in METHODS.values())]))
    out_dir = os.path.relpath(out_dir, ROOT)  # speed.py writes its command into the table: no machine's paths
    for arch in arms:
        cfg = ARCHS[arch]
        if cfg['speed']:
            subprocess.run([sys.executable, 'benchmarks/speed.py', *cfg['speed'], '--rounds', str(rounds), '--steps',
                            '8', '--modes', *modes, '--json', f'{out_dir}/speed_{arch}.json', '--out',
                            f'{out_dir}/speed_{arch}.md'], check=True, cwd=ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--suite', default='fashion_mnist', choices=list(SUITES))
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--out', default=str(RESULTS))
    parser.add_argument('--report-only', action='store_true')
    parser.add_argument('--sizing', action='store_true', help='train each method of each arm once, then report')
    parser.add_argument('--speed', action='store_true', help="measure each method's step time (alone), then report")
    parser.add_argument('--speed-rounds', type=int, default=15)
    parser.add_argument('--arms', nargs='+', choices=list(ARCHS), help="the arms to train (default: the suite's)")
    args = parser.parse_args()
    arms = args.arms or [arch for arch in ARCHS if ARCHS[arch]['suite'] == args.suite]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(out_dir / SUITES[args.suite]['csv'], args.workers)
    if args.speed:
        measure_speed(out_dir, args.speed_rounds, arms)
    elif not args.report_only:
        CACHE.mkdir(parents=True, exist_ok=True)
        build_data(args.suite)
        if args.sizing:
            runner.run(sizing_jobs(arms))
        else:
            while jobs := tuning_jobs(runner.rows, arms):
                runner.run(jobs)
            runner.run(final_jobs(runner.rows, arms))
    report(runner.rows, out_dir, args.suite, 'python benchmarks/accuracy.py' + (
        f' --suite {args.suite}' if args.suite != 'fashion_mnist' else ''), args.workers)


if __name__ == '__main__':
    main()
