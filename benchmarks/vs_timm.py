""" train.py against timm's own train.py: the same image folder, the same flags, alternating runs.

    python benchmarks/vs_timm.py --timm-train benchmarks/cache/timm/train.py        # this machine's CPU
    python benchmarks/vs_timm.py --timm-train PATH --preset gpu-resnet18             # on a GPU
    python benchmarks/vs_timm.py --timm-train PATH --preset gpu-resnet50
    python benchmarks/vs_timm.py --timm-train PATH --bare --methods sgd_mixup sgd_mixup_device g g_device   # issue 25

timm's train.py is not in the timm wheel: PATH is the train.py of a timm checkout at (or near) the installed
version. Keep it in benchmarks/cache/, which git ignores; it is never committed.

Each round runs, one at a time and alone on the machine, in a shuffled order: timm's train.py with SGD + Mixup,
and train.py with SGD + Mixup, G-Mix, BG-Mix, DG-Mix, MSAM G-Mix and DG-Mix every 8th update, all on the same
flags (a preset's) and the same image folder (built once under benchmarks/cache/ from the built-in digits,
upscaled). Two figures per run:
- training images/s, as each script reports it for each epoch, averaged over the epochs: timm's running
  average over the epoch's updates, train.py's images over the epoch's training time; both span the epoch from
  the first batch fetched to the last update (validation and checkpoints excluded);
- the whole run's wall time, measured from outside: start-up, data, every epoch, validation, checkpoints and,
  for train.py, the exported model.
With --compile both scripts get --torchcompile (inductor): the first epoch, which compiles, is reported apart,
and images/s are those of the later epochs.
The ratios are taken within each round (so drift in machine speed cancels) and their medians reported against
the targets of issue 18: train.py's SGD + Mixup at least 0.97 of timm's images/s and at most 1.10 of its wall
time; a G-Mix step at most 2.05 of timm's SGD + Mixup step, DG-Mix at most 2.4, MSAM G-Mix and DG-Mix every 8th
at most 1.15 (step time is the inverse of images/s). --device-data (issue 25): SGD + Mixup at least 1.15 of timm's
images/s and at least 0.95 of the bare loop's (--bare: `benchmarks/bare_loop.py`, the model, SGD and Mixup on one
batch already in memory, run in the same rounds).
"""
import argparse
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / 'benchmarks' / 'cache'

# name: (image side, training images, validation images, flags both scripts get)
PRESETS = {
    'cpu': (28, 2048, 512, ['--model', 'resnet18', '--img-size', '32', '-b', '64', '--epochs', '2', '--lr', '0.05',
                            '--mixup', '0.8', '--workers', '2', '--device', 'cpu']),
    # Fashion-MNIST's size, at the data's own resolution
    'cpu-resnet10t': (28, 4096, 512, ['--model', 'resnet10t', '--img-size', '28', '-b', '128', '--epochs', '2',
                                      '--lr', '0.05', '--mixup', '0.8', '--workers', '2', '--device', 'cpu']),
    # the data pipeline decides: a small model on small images in large batches
    'gpu-resnet18': (28, 16384, 2048, ['--model', 'resnet18', '--img-size', '32', '-b', '256', '--epochs', '3',
                                       '--lr', '0.2', '--mixup', '0.8', '--workers', '8', '--pin-mem']),
    # issue 25's GPU target: --device-data against timm's workers, bf16 and channels-last on every side
    'gpu-resnet18-bf16': (28, 16384, 2048, ['--model', 'resnet18', '--img-size', '32', '-b', '256', '--epochs', '3',
                                            '--lr', '0.2', '--mixup', '0.8', '--workers', '8', '--pin-mem', '--amp',
                                            '--amp-dtype', 'bfloat16', '--channels-last']),
    # the model decides: timm's prefetcher and channels-last on both sides
    'gpu-resnet50': (224, 8192, 1024, ['--model', 'resnet50', '--img-size', '224', '-b', '128', '--epochs', '2',
                                       '--lr', '0.1', '--mixup', '0.8', '--workers', '12', '--pin-mem', '--amp',
                                       '--amp-dtype', 'bfloat16', '--channels-last']),
}
# name: train.py's flags for the method (timm's train.py runs 'sgd_mixup' only)
METHODS = {
    'sgd_mixup': ['--opt', 'sgd'],
    'g': ['--opt', 'gmix_sam', '--mixup-mode', 'g'],
    'bg': ['--opt', 'gmix_sam', '--mixup-mode', 'bg'],
    'dg': ['--opt', 'gmix_sam', '--mixup-mode', 'dg'],
    'msam_g': ['--opt', 'gmix_sam', '--mixup-mode', 'g', '--sam-perturb', 'momentum', '--rho', '0.5'],
    'dg_every_8': ['--opt', 'gmix_sam', '--mixup-mode', 'dg', '--sam-interval', '8'],
    'sgd_mixup_device': ['--opt', 'sgd', '--device-data'],
    'g_device': ['--opt', 'gmix_sam', '--mixup-mode', 'g', '--device-data'],
}
LABELS = {'sgd_mixup': 'SGD + Mixup', 'g': 'G-Mix', 'bg': 'BG-Mix', 'dg': 'DG-Mix', 'msam_g': 'G-Mix (MSAM)',
          'dg_every_8': 'DG-Mix (every 8th)', 'sgd_mixup_device': 'SGD + Mixup, --device-data',
          'g_device': 'G-Mix, --device-data'}
DEFAULT_METHODS = ['sgd_mixup', 'g', 'bg', 'dg', 'msam_g', 'dg_every_8']
# method: (figure, at most or at least, target) from issues 18 and 25 ('bare': images/s against the bare loop)
TARGETS = {'sgd_mixup': [('images/s', '>=', 0.97), ('wall', '<=', 1.10)], 'g': [('step', '<=', 2.05)],
           'dg': [('step', '<=', 2.4)], 'msam_g': [('step', '<=', 1.15)], 'dg_every_8': [('step', '<=', 1.15)],
           'sgd_mixup_device': [('images/s', '>=', 1.15), ('bare', '>=', 0.95)]}
# the GPU target of issue 25 (gpu-resnet18-bf16): 3x timm's train.py
GPU_TARGETS = {'sgd_mixup_device': [('images/s', '>=', 3.0)]}
TIMM_RATE = re.compile(r'^Train: (\d+) \[\s*(\d+)/(\d+) .*\(\s*[\d.]+s,\s*([\d.]+)/s\)', re.M)
OURS_RATE = re.compile(r'^epoch \d+/\d+ .*\| train (\d+) img/s', re.M)


def image_folder(side: int, num_train: int, num_val: int) -> Path:
    """ CACHE/digits<side>-<train>: the built-in digits upscaled to side x side PNGs in an image folder, the
    training split cycling through a fixed permutation of all 1,797 images, validation through the same from
    another offset. Built once. """
    root = CACHE / f'digits{side}-{num_train}'
    if (root / 'done').is_file():
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    for split, count, offset in (('train', num_train, 0), ('validation', num_val, len(order) // 2)):
        for k in range(count):
            i = order[(offset + k) % len(order)]
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, 'L').resize((side, side), Image.BILINEAR).save(folder / f'{k}.png')
    (root / 'done').write_text('')
    return root


def run(cmd, is_timm: bool) -> tuple:
    """ (training images/s of each epoch, wall seconds) of one run, which must succeed. """
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run([*cmd, '--output', out], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f'failed ({proc.returncode}): {" ".join(cmd)}\n{text[-3000:]}')
    if is_timm:  # the running average on the last update of each epoch
        last = {}
        for epoch, update, updates, rate in TIMM_RATE.findall(text):
            if int(update) + 1 == int(updates):
                last[epoch] = float(rate)
        rates = list(last.values())
    else:
        rates = [float(r) for r in OURS_RATE.findall(text)]
    if not rates:
        raise SystemExit(f'no training rate in the output of {" ".join(cmd)}:\n{text[-3000:]}')
    return rates, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--timm-train', required=True, help="timm's train.py (from a timm checkout)")
    parser.add_argument('--preset', default='cpu', choices=PRESETS)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--methods', nargs='+', default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument('--bare', action='store_true',
                        help='also run the bare loop (benchmarks/bare_loop.py: the model, SGD and Mixup on one batch '
                             'in memory) and report images/s against it')
    parser.add_argument('--seed', type=int, default=0, help='of the shuffled order of the runs in a round')
    parser.add_argument('--compile', action='store_true', help='--torchcompile (inductor) on both sides')
    parser.add_argument('--out', default=None, help='Markdown file (default benchmarks/results/vs_timm_<preset>.md)')
    args = parser.parse_args()
    if not Path(args.timm_train).is_file():
        parser.error(f'--timm-train {args.timm_train} is not a file: give the train.py of a timm checkout')
    side, num_train, num_val, flags = PRESETS[args.preset]
    data = image_folder(side, num_train, num_val)
    common = [str(data), *flags, '--num-classes', '10', *(['--torchcompile'] if args.compile else [])]
    runs = {'timm': [sys.executable, str(Path(args.timm_train).resolve()), *common]}
    if args.bare:
        batch = int(flags[flags.index('-b') + 1])
        runs['bare'] = [sys.executable, str(ROOT / 'benchmarks' / 'bare_loop.py'), *common, '--steps',
                        str(num_train // batch)]
    runs.update({m: [sys.executable, str(ROOT / 'train.py'), *common, *METHODS[m]] for m in args.methods})
    order = random.Random(args.seed)
    epochs = {name: [] for name in runs}  # [(images/s of each epoch, wall s)] per round
    for r in range(args.rounds):
        names = list(runs)
        order.shuffle(names)
        for name in names:
            epochs[name].append(run(runs[name], is_timm=name == 'timm'))
            print(f'round {r + 1}/{args.rounds} {name}: {epochs[name][-1]}', flush=True)
    # images/s: the mean over epochs; compiled, over the epochs after the first, which compiles
    first = 1 if args.compile else 0
    results = {name: [(statistics.mean(rates[first:] or rates), wall) for rates, wall in rows]
               for name, rows in epochs.items()}
    report(args, results, runs, epochs if args.compile else None, num_train)


def report(args, results, runs, epochs=None, num_train=0):
    timm = results['timm']

    def ratios(name, figure):
        pairs = zip(results[name], timm)
        if figure == 'bare':
            return statistics.median(ours[0] / ref[0] for ours, ref in zip(results[name], results['bare'])) \
                if 'bare' in results else float('nan')
        if figure == 'images/s':
            return statistics.median(ours[0] / ref[0] for ours, ref in pairs)
        if figure == 'step':
            return statistics.median(ref[0] / ours[0] for ours, ref in pairs)
        return statistics.median(ours[1] / ref[1] for ours, ref in pairs)

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.preset != 'cpu' else \
        f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'
    lines = [
        f"train.py against timm's train.py ({Path(args.timm_train).name} of a timm checkout; timm "
        f'{__import__("timm").__version__} installed), preset `{args.preset}`, {args.rounds} rounds of alternating '
        f'runs, each alone; {device}, torch {torch.__version__}.',
        '',
        f'Command: `python benchmarks/vs_timm.py {" ".join(sys.argv[1:])}`',
        '',
        f'Flags of every run: `{" ".join(runs["timm"][2:]).replace(str(ROOT) + "/", "")}`, plus the method\'s.',
        '',
        '| run | training images/s (median) | wall s (median) | images/s / timm SGD + Mixup | step time / timm SGD + '
        'Mixup | wall / timm SGD + Mixup | images/s / bare loop | target | met |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |',
        f'| timm train.py, SGD + Mixup | {statistics.median(r[0] for r in timm):.0f} | '
        f'{statistics.median(r[1] for r in timm):.1f} | 1 | 1 | 1 | {ratios("timm", "bare"):.3f} | | |',
    ]
    summary = {}
    for name in results:
        if name == 'timm':
            continue
        figures = {figure: ratios(name, figure) for figure in ('images/s', 'step', 'wall', 'bare')}
        targets = (GPU_TARGETS if args.preset == 'gpu-resnet18-bf16' else TARGETS).get(name, [])
        met = [figures[f] >= t if op == '>=' else figures[f] <= t for f, op, t in targets]
        summary[name] = {**figures, 'met': all(met) if targets else None}
        label = 'bare loop (`benchmarks/bare_loop.py`)' if name == 'bare' else \
            f'train.py, {LABELS[name]} (`{" ".join(METHODS[name])}`)'
        lines.append(
            f'| {label} | '
            f'{statistics.median(r[0] for r in results[name]):.0f} | {statistics.median(r[1] for r in results[name]):.1f}'
            f' | {figures["images/s"]:.3f} | {figures["step"]:.3f} | {figures["wall"]:.3f} | {figures["bare"]:.3f} | '
            f'{", ".join(f"{f} {op} {t}" for f, op, t in targets)} | '
            f'{"" if not targets else "yes" if all(met) else "no"} |')
    own = [(g, sgd) for g, sgd in (('g', 'sgd_mixup'), ('g_device', 'sgd_mixup_device')) if g in results and sgd in results]
    if own:
        lines += ['', "G-Mix's step against train.py's own SGD + Mixup step with the same data path (median of per-round "
                  'ratios): ' + ', '.join(f'{LABELS[g]} {statistics.median(b[0] / a[0] for a, b in zip(results[g], results[sgd])):.3f}'
                                          for g, sgd in own)]
    if epochs is not None:
        lines += ['', 'Compilation: the first epoch against the later ones (median over rounds), seconds:', '']
        lines += [f'- {name}: first epoch {statistics.median(num_train / rates[0] for rates, _ in rows):.1f} s, a later '
                  f'epoch {statistics.median(num_train / statistics.mean(rates[1:]) for rates, _ in rows):.1f} s'
                  for name, rows in epochs.items() if all(len(rates) > 1 for rates, _ in rows)]
    lines += ['', 'Every run (images/s, wall s), by round:', '']
    lines += [f'- {name}: ' + ', '.join(f'({r[0]:.0f}, {r[1]:.1f})' for r in rows) for name, rows in results.items()]
    out = Path(args.out or ROOT / 'benchmarks' / 'results' / f'vs_timm_{args.preset}.md')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text('\n'.join(lines) + '\n')
    out.with_suffix('.json').write_text(json.dumps({'runs': results, 'ratios': summary}, indent=1) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
