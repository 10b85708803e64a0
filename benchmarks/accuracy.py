""" Accuracy benchmark: ERM, Mixup, CutMix, SAM, ASAM, G-Mix, BG-Mix, DG-Mix and the cheaper G-Mix settings on
three arms of the built-in digits, with a Pareto plot of test accuracy against step time.

    python benchmarks/accuracy.py                 # about 2 h 10 min on 2 CPU cores; stop and rerun to continue
    python benchmarks/accuracy.py --speed         # then each method's step time (alone: nothing else running)
    python benchmarks/accuracy.py --report-only   # rebuild the tables and plots from the CSV and JSON files

Arms (each its own model, data and schedule, the same for every method of the arm):
    cnn        resnet10t at 32x32, SGD, 12 epochs, on a fixed 20% of the digits' training split (216 images)
    cnn-noisy  the same CNN, 20 epochs, on a fixed 10% of the training split (108 images) with 20% symmetric label
               noise: exactly 22 labels replaced by a uniformly drawn different class (fixed seed); validation and
               test clean. Built once as a `save_to_disk` DatasetDict in benchmarks/cache/ and read by train.py
               through its usual `--dataset <folder>` path (train.py has no label-noise flag, as timm's has none)
    vit        test_vit with depth 2 at 32x32 (4x4 patches, 64 tokens), AdamW, 20 epochs, on the whole training split
               (1,078 images), so that ERM learns (90.5% test top-1 over 5 seeds; with 8 epochs its tuning runs
               reached 40-62% validation, so 8 is not enough)

The CNN arms' epochs are what fits the 2-core machine: 198 runs of 25-120 s each, about 75 minutes with two
workers. The vit arm adds 99 runs of 45-105 s (about an hour more): `--arms` picks the arms to run.

Protocol: every run goes through train.py itself (`train.main`). Each method has the same number of tuning
configurations (4) and the same tuning seed; the configuration with the best validation accuracy is kept
(first listed wins a tie), then `--seeds` runs report test accuracy at the last epoch (no selection on test).
ERM, which has no hyperparameter of its own, tunes the learning rate (x0.5 to x4 the arm's). The cheaper settings
tune the same way; MSAM (a perturbation along the momentum) tunes larger radii, as its paper does.

Each final run's exported model is kept in benchmarks/cache/accuracy/<arch>/<method>/seed<k>/ (model/ and
run.json) for benchmarks/sharpness.py. Step times come from benchmarks/speed.py on each arm's model, batch and
optimizer (`--speed`, results/speed_<arch>.json), relative to train.py's own SGD + Mixup step (`gmix_step` with
its undo and finiteness checks, which every method here pays). Each run's result is appended to the CSV as it
finishes; a rerun skips what is already there.
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
NOISY_DIGITS = CACHE / 'digits_10pct_20pct_noise'

COMMON = ['--warmup-epochs', '1', '--sched', 'cosine', '--workers', '0', '--smoothing', '0.1', '--hflip', '0',
          '--scale', '0.8', '1.0', '--color-jitter', '0']
CNN = ['--model', 'resnet10t', '--img-size', '32', '-b', '16', '--lr', '0.05', '--weight-decay', '5e-4']
VIT_KWARGS = dict(img_size=32, patch_size=4, class_token=False, depth=2)
# Per arm: train.py flags shared by every method, the optimizer, and speed.py's flags for the same step.
ARCHS = {
    'cnn': dict(argv=['--dataset', 'digits', '--train-subset', '0.2', *CNN, '--epochs', '12'], base='sgd', lr=0.05,
                speed=['--model', 'resnet10t', '--img-size', '32', '-b', '16', '--opt', 'sgd']),
    'cnn-noisy': dict(argv=['--dataset', str(NOISY_DIGITS), *CNN, '--epochs', '20'], base='sgd', lr=0.05,
                      speed=None),  # the cnn arm's step
    'vit': dict(argv=['--dataset', 'digits', '--model', 'test_vit', '--img-size', '32', '-b', '32', '--model-kwargs',
                      *[f'{k}={v}' for k, v in VIT_KWARGS.items()], '--gp', 'avg', '--epochs', '20',
                      '--warmup-epochs', '2', '--lr', '2e-3', '--weight-decay', '0.05'], base='adamw', lr=2e-3,
                speed=['--model', 'test_vit', '--model-kwargs', json.dumps({**VIT_KWARGS, 'global_pool': 'avg'}),
                       '--img-size', '32', '-b', '32', '--opt', 'adamw']),
}
ALPHAS = (0.1, 0.2, 0.5, 1.0)
GMIX_GRID = {'--rho': (0.02, 0.05), '--mixup': (0.2, 1.0)}
MSAM_GRID = {'--rho': (0.2, 0.5), '--mixup': (0.2, 1.0)}
# LookSAM's alpha decides whether it works at all here: 0.7, its paper's ViT value, gave G-Mix every 8th 76%
# validation (95.5% without reuse); with 0.1 DG-Mix every 8th kept 95.3%. Its step time does not depend on alpha.
LOOKSAM_GRID = {'--rho': (0.02, 0.05), '--sam-reuse': (0.1, 0.3)}
SAM = ['--opt', 'gmix_sam', '--sam-base', '{base}']
# method -> (fixed flags, {flag: values to tune} (4 configurations each), speed.py mode of its step)
METHODS = {
    'ERM': (['--opt', '{base}'], {'--lr': ('x0.5', 'x1', 'x2', 'x4')}, 'sgd_mixup_guarded'),
    'Mixup': (['--opt', '{base}'], {'--mixup': ALPHAS}, 'sgd_mixup_guarded'),
    'CutMix': (['--opt', '{base}'], {'--cutmix': ALPHAS}, 'sgd_mixup_guarded'),
    'SAM': (SAM, {'--rho': (0.01, 0.02, 0.05, 0.1)}, 'sam'),
    'ASAM': ([*SAM, '--asam'], {'--rho': (0.25, 0.5, 1.0, 2.0)}, 'sam:adaptive'),
    'G-Mix': ([*SAM, '--mixup-mode', 'g'], GMIX_GRID, 'g'),
    'BG-Mix': ([*SAM, '--mixup-mode', 'bg'], GMIX_GRID, 'bg'),
    'DG-Mix': ([*SAM, '--mixup-mode', 'dg'], GMIX_GRID, 'dg'),
    'G-Mix (MSAM)': ([*SAM, '--mixup-mode', 'g', '--sam-perturb', 'momentum'], MSAM_GRID, 'g:perturb=momentum'),
    'DG-Mix (every 8th)': ([*SAM, '--mixup-mode', 'dg', '--sam-interval', '8'], GMIX_GRID, 'dg:interval=8'),
    'DG-Mix (LookSAM, every 8th)': ([*SAM, '--mixup-mode', 'dg', '--sam-interval', '8', '--mixup', '0.2'],
                                    LOOKSAM_GRID, 'dg:interval=8,reuse=0.1'),
}
EXACT = ('ERM', 'Mixup', 'CutMix', 'SAM', 'ASAM', 'G-Mix', 'BG-Mix', 'DG-Mix')
TUNING_SEEDS = (101,)  # apart from the reported seeds 1..N
SPEED_REFERENCE = 'sgd_mixup_guarded'
FIELDS = ['arch', 'method', 'phase', 'hparams', 'seed', 'split', 'top1', 'loss', 'seconds']


def slug(method: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', method.lower()).strip('-')


def run_key(arch, method, phase, hparams, seed):
    return arch, method, phase, json.dumps(hparams, sort_keys=True), str(seed)


def build_noisy_digits(path=NOISY_DIGITS, fraction=0.1, noise=0.2, seed=0):
    """ The cnn-noisy arm's data: a fixed `fraction` of the digits' training split, `noise` of its labels replaced
    by a uniformly drawn different class; validation and test as they are. """
    import numpy as np
    from timm_gmix.training.data import SPLIT_SEED, digits_dataset

    if (path / 'dataset_dict.json').is_file():
        return
    splits = digits_dataset()
    train = splits['train'].shuffle(seed=SPLIT_SEED).select(range(round(fraction * len(splits['train']))))
    rng = np.random.default_rng(seed)
    labels = np.array(train['label'])
    flipped = rng.choice(len(labels), size=round(noise * len(labels)), replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    splits['train'] = train.remove_columns('label').add_column('label', labels.tolist()).cast(train.features)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        splits.save_to_disk(tmp)
        shutil.copytree(tmp, path)


def train_argv(arch, method, hparams, seed, split):
    fixed, _, _ = METHODS[method]
    base, lr = ARCHS[arch]['base'], ARCHS[arch]['lr']
    tuned = {k: (f'{lr * float(v[1:]):g}' if isinstance(v, str) and v.startswith('x') else str(v))
             for k, v in hparams.items()}
    return [*COMMON, *ARCHS[arch]['argv'], *[a.format(base=base) for a in fixed],
            *itertools.chain.from_iterable(tuned.items()), '--seed', str(seed), '--val-split', split]


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
    return dict(zip(FIELDS, (*run_key(arch, method, phase, hparams, seed)[:4], seed, split, top1,
                             float(last['eval_loss']), round(time.time() - start, 1))))


class Runner(RunsCSV):
    """ Runs jobs `workers` at a time, appending each result to the CSV as it finishes. """

    def __init__(self, csv_path, workers, arms):
        super().__init__(csv_path, FIELDS)
        self.workers = workers
        self.arms = arms
        self.started = time.time()
        self.finished_here = 0

    def done(self, job):
        return any(run_key(r['arch'], r['method'], r['phase'], json.loads(r['hparams']), r['seed']) == run_key(*job[:5])
                   for r in self.rows)

    def run(self, jobs, total):
        """ Run the jobs not yet in the CSV; `total` is the number of runs of the arms being trained. """
        jobs = [j for j in jobs if not self.done(j)]
        if not jobs:
            return
        with ProcessPoolExecutor(self.workers) as pool:
            for future in as_completed([pool.submit(train_once, *job) for job in jobs]):
                row = future.result()
                self.append(row)
                self.finished_here += 1
                left = total - sum(r['arch'] in self.arms for r in self.rows)
                eta = (time.time() - self.started) / self.finished_here * left / 60
                print(f'[{len(self.rows)} runs done, {left} to go, ~{eta:.0f} min left] {row["arch"]} '
                      f'{row["method"]} {row["phase"]} {row["hparams"]} seed {row["seed"]}: '
                      f'{row["top1"]:.2f}% ({row["seconds"]}s)', flush=True)


def grid(tuned):
    return [dict(zip(tuned, values)) for values in itertools.product(*tuned.values())]


def tuning_jobs(arms):
    return [(arch, method, 'tune', hp, seed, 'validation') for arch in arms for method, (_, tuned, _) in METHODS.items()
            for hp in grid(tuned) for seed in TUNING_SEEDS]


def chosen(rows, arch, method):
    """ The configuration with the best mean validation accuracy over the tuning seeds (first listed wins a tie). """
    accs = {}
    for r in rows:
        if r['arch'] == arch and r['method'] == method and r['phase'] == 'tune':
            accs.setdefault(r['hparams'], []).append(float(r['top1']))
    order = {json.dumps(hp, sort_keys=True): i for i, hp in enumerate(grid(METHODS[method][1]))}
    best = max(accs, key=lambda hp: (statistics.mean(accs[hp]), -order[hp]))
    return json.loads(best)


def final_jobs(rows, arms, seeds):
    return [(arch, method, 'final', chosen(rows, arch, method), s, 'test')
            for arch in arms for method in METHODS for s in seeds]


def finals(rows):
    """ (arch, method) -> (chosen hparams, test accuracies over seeds). """
    groups = {}
    for r in rows:
        if r['phase'] == 'final':
            groups.setdefault((r['arch'], r['method']), (r['hparams'], []))[1].append(float(r['top1']))
    return groups


def mean_se(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), sd, sd / math.sqrt(len(values))


def step_times(out_dir):
    """ arch -> {method: step time / train.py's SGD + Mixup step}, for the arms whose speed was measured. """
    times = {}
    for arch, cfg in ARCHS.items():
        path = out_dir / f'speed_{arch if cfg["speed"] else "cnn"}.json'
        if path.is_file():
            ratios = json.loads(path.read_text())
            times[arch] = {m: ratios[mode] / ratios[SPEED_REFERENCE] for m, (_, _, mode) in METHODS.items()
                           if mode in ratios}
    return times


def trained_arms(groups):
    return [arch for arch in ARCHS if any(a == arch for a, _ in groups)]


def report(rows, out_dir, command):
    groups, times = finals(rows), step_times(out_dir)
    lines = ['# Accuracy on the built-in digits: three arms, exact and cheaper G-Mix', '',
             f'Reproduce: `{command}`, then `python benchmarks/accuracy.py --speed` alone (results: '
             f'`accuracy_runs.csv`, `speed_<arch>.json`).', '',
             f'Common settings: `{" ".join(COMMON)}`; test accuracy (%) at the last epoch over seeds: mean ± standard '
             f'deviation (standard error); 4 tuning configurations per method chosen on the validation split with '
             f'seed {", ".join(map(str, TUNING_SEEDS))}. Step time: relative to train.py\'s SGD + Mixup step, '
             f'measured with benchmarks/speed.py on the arm\'s model, batch and optimizer.', '']
    for arch in trained_arms(groups):
        cfg = ARCHS[arch]
        argv = ' '.join(cfg['argv']).replace(f'{ROOT}/', '')  # the noisy data's folder, relative to the checkout
        lines += [f'## {arch}: `{argv}`, base optimizer {cfg["base"]}', '',
                  '| method | test top-1 (mean ± std (SE)) | seeds | step time | chosen on validation |',
                  '| --- | ---: | ---: | ---: | --- |']
        for method in METHODS:
            if (arch, method) in groups:
                hp, accs = groups[arch, method]
                m, sd, se = mean_se(accs)
                t = times.get(arch, {}).get(method)
                lines.append(f'| {method} | {m:.2f} ± {sd:.2f} ({se:.2f}) | {len(accs)} | '
                             f'{"" if t is None else f"{t:.2f}"} | {hp} |')
        lines.append('')
    (out_dir / 'accuracy.md').write_text('\n'.join(lines) + '\n')
    plot(groups, times, out_dir / 'accuracy_pareto.png')
    print('\n'.join(lines))


def plot(groups, times, path):
    """ One panel per arm: test accuracy (mean, error bar: standard error) against relative step time. """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    arms = trained_arms(groups)
    fig, axes = plt.subplots(1, len(arms), figsize=(6 * len(arms), 4.8), squeeze=False)
    for ax, arch in zip(axes[0], arms):
        for i, method in enumerate(METHODS):
            if (arch, method) not in groups or method not in times.get(arch, {}):
                continue
            m, _, se = mean_se(groups[arch, method][1])
            ax.errorbar(times[arch][method], m, yerr=se, fmt='o' if method in EXACT else 's', capsize=3,
                        color=plt.cm.tab20(i), label=method)
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
    parser.add_argument('--seeds', type=int, default=5)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--out', default=str(RESULTS))
    parser.add_argument('--report-only', action='store_true')
    parser.add_argument('--speed', action='store_true', help="measure each method's step time (alone), then report")
    parser.add_argument('--speed-rounds', type=int, default=15)
    parser.add_argument('--arms', nargs='+', default=list(ARCHS), choices=list(ARCHS), help='the arms to train')
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(out_dir / 'accuracy_runs.csv', args.workers, args.arms)
    seeds = list(range(1, args.seeds + 1))
    tune = tuning_jobs(args.arms)
    total = len(tune) + len(args.arms) * len(METHODS) * len(seeds)
    if args.speed:
        measure_speed(out_dir, args.speed_rounds, args.arms)
    elif not args.report_only:
        CACHE.mkdir(parents=True, exist_ok=True)
        build_noisy_digits()
        runner.run(tune, total)
        runner.run(final_jobs(runner.rows, args.arms, seeds), total)
    report(runner.rows, out_dir, 'python benchmarks/accuracy.py' + (f' --seeds {args.seeds}' if args.seeds != 5 else ''))


if __name__ == '__main__':
    main()
