""" Worker for tests/test_loader.py, started by `accelerate launch` with two CPU processes:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... loader_worker.py OUT

Each rank writes OUT/rank<r>.pt = {'whole': epoch 1 of a fresh loader, 'resumed': epoch 1 from batch
SKIP of a loader that served epoch 0 first} (lists of (inputs, targets)), with --workers 2, random erasing in the
workers (--no-prefetcher). """
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_loader import epoch, train_loader  # noqa: E402

SKIP = 1

if __name__ == '__main__':
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    whole = epoch(train_loader('--workers', '2', '--no-prefetcher'), 1)
    loader = train_loader('--workers', '2', '--no-prefetcher')
    epoch(loader, 0)
    resumed = epoch(loader, 1, skip=SKIP)
    torch.save({'whole': whole, 'resumed': resumed}, out / f'rank{torch.distributed.get_rank()}.pt')
