""" The bare training loop a data pipeline is measured against: a timm model, SGD and timm's Mixup on one batch
that is already in memory (no data loading, no augmentation, no checks, no validation or checkpoints).

    python benchmarks/bare_loop.py --model resnet18 --img-size 32 -b 64 --epochs 2 --lr 0.05 --mixup 0.8

Takes the flags `benchmarks/vs_timm.py` gives both scripts (others are ignored) and prints one line per epoch of
`--steps` updates in train.py's format (`epoch i/n | ... | train N img/s`), the rate over the epoch's updates.
"""
import argparse
import time

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--mixup', type=float, default=0.8)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--steps', type=int, default=32, help='updates per epoch (vs_timm: training images / -b)')
    parser.add_argument('--in-chans', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--amp-dtype', default='float16')
    parser.add_argument('--channels-last', action='store_true')
    args, _ = parser.parse_known_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    model = model.to(device, memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=2e-5)
    mixup = Mixup(mixup_alpha=args.mixup, label_smoothing=0.1, num_classes=args.num_classes)
    loss_fn = SoftTargetCrossEntropy()
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and args.amp_dtype == 'float16')
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, device=device).to(memory_format=layout)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for _ in range(args.steps):
            inputs, targets = mixup(x.clone(), y)
            with torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype), enabled=args.amp):
                loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        rate = args.steps * args.batch_size / (time.perf_counter() - start)
        print(f'epoch {epoch + 1}/{args.epochs} | loss {loss.item():.4f} | train {rate:.0f} img/s', flush=True)


if __name__ == '__main__':
    main()
