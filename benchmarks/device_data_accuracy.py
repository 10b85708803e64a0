""" Accuracy with --device-data against the loader: the same runs of train.py, seed by seed, with and without the
option, and the paired difference of their final validation top-1.

    python benchmarks/device_data_accuracy.py                      # the default run (configs/digits.yaml), seeds 0-4
    python benchmarks/device_data_accuracy.py --seeds 3 -- --epochs 6 --model resnet10t

Flags after `--` go to every run. The two sides draw different augmentations (the loader per example from
(seed, epoch, example) in its workers, the device per batch from (seed, epoch, batch)), so they are two samples
of the same training, and what is compared is whether their accuracies differ beyond seed noise: the mean paired
difference with a 95% t interval. Runs are one at a time with --workers as given (default 0 here: the digits are
small), each with OMP_NUM_THREADS from the environment. Writes benchmarks/results/device_data_accuracy.md.
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r'Validation top-1 accuracy: ([\d.]+)%')


def final_top1(flags) -> float:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *flags, '--output', out], cwd=ROOT,
                              capture_output=True, text=True)
    found = FINAL.search(proc.stdout)
    if proc.returncode or not found:
        raise SystemExit(f'failed ({proc.returncode}): {" ".join(flags)}\n{(proc.stdout + proc.stderr)[-3000:]}')
    return float(found.group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, default=5)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'device_data_accuracy.md'))
    args, flags = parser.parse_known_args()
    flags = [f for f in flags if f != '--']
    rows = []
    for seed in range(args.seeds):
        loader = final_top1([*flags, '--seed', str(seed)])
        device = final_top1([*flags, '--seed', str(seed), '--device-data'])
        rows.append((seed, loader, device))
        print(f'seed {seed}: loader {loader:.2f}%, --device-data {device:.2f}%', flush=True)
    diffs = [d - l for _, l, d in rows]
    mean = statistics.mean(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0
    loaders, devices = [l for _, l, _ in rows], [d for _, _, d in rows]
    lines = [
        '# Accuracy with --device-data against the loader',
        '',
        f'Command: `python benchmarks/device_data_accuracy.py {" ".join(sys.argv[1:])}` (train.py flags: '
        f'`{" ".join(flags) or "none: configs/digits.yaml"}`). Final validation top-1 (%), paired by seed.',
        '',
        '| seed | loader | --device-data | difference |',
        '| ---: | ---: | ---: | ---: |',
        *[f'| {s} | {l:.2f} | {d:.2f} | {d - l:+.2f} |' for s, l, d in rows],
        f'| mean ± sd | {statistics.mean(loaders):.2f} ± {statistics.pstdev(loaders):.2f} | '
        f'{statistics.mean(devices):.2f} ± {statistics.pstdev(devices):.2f} | {mean:+.2f} [{mean - half:+.2f}, '
        f'{mean + half:+.2f}] |',
        '',
        f'The difference is {"not separable from 0" if mean - half <= 0 <= mean + half else "separable from 0"} '
        f'(95% t interval over {len(diffs)} seeds).',
    ]
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
