""" The default `python train.py` of this checkout against an earlier release's, run back to back.

    python benchmarks/vs_release.py --commit cea07b0 --rounds 3

The earlier release is checked out with `git worktree` under benchmarks/cache/ (ignored by git) and run with its
own `timm_gmix` (PYTHONPATH) in this environment. Each round runs both, alone, in alternating order; the figures
are the whole run's wall time (measured from outside) and the validation accuracy each prints. Results go to
benchmarks/results/vs_release.md.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = re.compile(r'Validation top-1 accuracy: ([\d.]+)%')


def checkout(commit: str) -> Path:
    """ The release's tree, as a git worktree under benchmarks/cache/ (made once). """
    folder = ROOT / 'benchmarks' / 'cache' / f'release-{commit}'
    if not (folder / 'train.py').is_file():
        subprocess.run(['git', 'worktree', 'add', '--detach', str(folder), commit], cwd=ROOT, check=True,
                       capture_output=True)
    return folder


def run(tree: Path, extra) -> tuple:
    """ (wall seconds, validation top-1) of `python train.py` in `tree`. """
    env = {**os.environ, 'PYTHONPATH': str(tree / 'plugins')}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, 'train.py', *extra, '--output', out], cwd=tree, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f'train.py in {tree} failed:\n{proc.stderr[-3000:]}')
    return wall, float(ACCURACY.findall(proc.stdout)[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--commit', default='cea07b0', help='the earlier release')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'vs_release.md'))
    parser.add_argument('extra', nargs='*', help='flags for both runs (default: none, as a user runs it)')
    args = parser.parse_args()
    trees = {'this checkout': ROOT, f'release {args.commit}': checkout(args.commit)}
    results = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            results[name].append(run(trees[name], args.extra))
            print(f'round {r + 1}: {name}: {results[name][-1][0]:.1f} s, {results[name][-1][1]:.2f}%', flush=True)
    now, then = results.values()
    ratio = statistics.median(a[0] / b[0] for a, b in zip(now, then))
    lines = [
        f'`python train.py {" ".join(args.extra)}`'.replace(' `', '`') + f' of this checkout against release '
        f'{args.commit}, {args.rounds} rounds, back to back, each alone.',
        '',
        f'Command: `python benchmarks/vs_release.py {" ".join(sys.argv[1:])}`',
        '',
        '| train.py | wall s (median) | validation top-1 (each round) |',
        '| --- | ---: | --- |',
        *[f'| {name} | {statistics.median(r[0] for r in rows):.1f} | {", ".join(f"{r[1]:.2f}%" for r in rows)} |'
          for name, rows in results.items()],
        '',
        f'Wall time, this checkout / release {args.commit} (median of per-round ratios): {ratio:.3f}.',
    ]
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
