#!/usr/bin/env python3
""" timm-style image classification training with G-Mix, BG-Mix and DG-Mix, on Hugging Face Accelerate.

    python train.py                                  # G-Mix on the built-in digits (configs/digits.yaml)
    python train.py -c configs/digits_dg.yaml --epochs 5
    accelerate launch train.py --opt gmix_sam --mixup 0.8 --mixup-mode dg --model resnet50 ...

Every baseline runs through this script too (--opt sgd, --mixup 0, --cutmix 1.0, ...).
"""
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, set_seed
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, accuracy, update_summary
from tqdm import tqdm

from timm_gmix import SensitivityMeter, cross_entropy_per_example, gmix_step
from timm_gmix.checkpoint import export_model, load_checkpoint, resolve_checkpoint, save_checkpoint, trim_summary
from timm_gmix.config import UsageError, main_guard, mixed_precision, parse_args
from timm_gmix.data import load_splits, with_transforms
from timm_gmix.factory import check_input_size, create_mixup, create_model, create_optimizer

DEFAULT_CONFIG = Path(__file__).parent / 'configs' / 'digits.yaml'


@dataclasses.dataclass
class TrainState:
    """ Counters that a resumed run continues from (checkpointed with the rest). """
    epoch: int = -1
    num_updates: int = 0
    bad_steps: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


def train_one_epoch(epoch, model, optimizer, loader, mixup_fn, loss_fn, scheduler, ema, state, accelerator, args):
    model.train()
    loss_sum, steps, skipped = torch.zeros((), device=accelerator.device), 0, 0
    meter = SensitivityMeter()
    bar = tqdm(loader, desc=f'epoch {epoch}', leave=False, disable=not accelerator.is_local_main_process)
    for inputs, targets in bar:
        result = gmix_step(model, optimizer, inputs, targets, mixup_fn, loss_fn, accelerator,
                           clip_grad=args.clip_grad, clip_mode=args.clip_mode, sync_ascent=args.sync_ascent,
                           accum_steps=args.grad_accum_steps)
        steps += 1
        if result.skipped:
            skipped += 1
            state.bad_steps += 1
            if state.bad_steps >= args.max_bad_steps:
                raise SystemExit(f'error: {state.bad_steps} steps in a row had a non-finite loss or gradient; '
                                 f'stopped (lower --lr or set --clip-grad); the last checkpoint is intact')
        else:
            state.bad_steps = 0
            loss_sum += result.loss
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=state.num_updates)
        if result.sensitivity is not None:
            meter.update(result.sensitivity, result.flagged, result.mixes_two_classes)
        state.num_updates += 1
        scheduler.step_update(num_updates=state.num_updates)
        bar.set_postfix(loss=f'{result.loss.item():.3f}')
    counts = accelerator.reduce(torch.tensor([steps - skipped, skipped], device=accelerator.device), 'sum')
    loss = accelerator.reduce(loss_sum, 'sum') / counts[0].clamp(min=1)
    return {'loss': loss.item(), 'skipped': int(counts[1]), **meter.compute(accelerator)}


@torch.no_grad()
def validate(model, loader, accelerator):
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0.0, 0.0, 0
    for inputs, targets in loader:
        with accelerator.autocast():
            logits = model(inputs)
        logits, targets = accelerator.gather_for_metrics((logits.float(), targets))
        acc1, acc5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[-1])))
        loss_sum += F.cross_entropy(logits, targets, reduction='sum').item()
        top1, top5, count = top1 + acc1.item() * len(targets), top5 + acc5.item() * len(targets), count + len(targets)
    return {'loss': loss_sum / count, 'top1': top1 / count, 'top5': top5 / count}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not any(a.split('=')[0] in ('-c', '--config', '--dataset') for a in argv):
        argv = ['-c', str(DEFAULT_CONFIG), *argv]  # the built-in digits train with their own preset
    args = parse_args(argv)
    set_seed(args.seed)
    if args.resume:
        resolve_checkpoint(args.resume)
    model_name = Path(args.model.split(':', 1)[-1]).name  # hf-hub:timm/<name>, local-dir:<folder>
    experiment = args.experiment or f'{model_name}-{args.opt}-{args.mixup_mode}-{args.seed}'
    run_dir = Path(args.output) / experiment

    train_split, val_split, num_classes = load_splits(args)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UsageError(f'--num-classes {args.num_classes} disagrees with the data, which has {num_classes} '
                         f'classes: drop --num-classes or fix the label column')
    model = create_model(args, num_classes)
    train_set, val_set, data_config = with_transforms(train_split, val_split, args, model)
    check_input_size(model, args, data_config['input_size'])

    accelerator = Accelerator(
        mixed_precision=mixed_precision(args),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UsageError(f'{accelerator.distributed_type.value} is not supported: the SAM step needs whole '
                         f'parameters on each process; use DDP (accelerate launch --multi_gpu)')
    if len(train_set) < args.batch_size * accelerator.num_processes:
        raise UsageError(f'{len(train_set)} training examples are fewer than one batch of {args.batch_size} '
                         f'per process: lower --batch-size')

    loader_args = dict(num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                       persistent_workers=args.workers > 0)
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, args.validation_batch_size or args.batch_size, **loader_args)
    optimizer = create_optimizer(args, model)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, device=accelerator.device) if args.model_ema else None
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # timm schedulers are stepped by hand: Accelerate would step a prepared one once per process.
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=len(train_loader))
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *([ema] if ema is not None else []))
    if args.resume:
        accelerator.print(f'resumed from {load_checkpoint(accelerator, args.resume)}')
        if state.epoch + 1 >= num_epochs:
            raise UsageError(f'the run in {args.resume} already trained all {num_epochs} epochs: '
                             f'raise --epochs to train longer')
        if accelerator.is_main_process:
            trim_summary(run_dir / 'summary.csv', state.epoch)

    mixup_fn = create_mixup(args, num_classes)
    loss_fn = partial(cross_entropy_per_example, smoothing=args.smoothing)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / 'args.yaml').write_text(yaml.safe_dump(vars(args), sort_keys=False))
    accelerator.print(f'{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) | '
                      f'{args.opt} | mixup-mode {args.mixup_mode} | {len(train_set)} train / {len(val_set)} val '
                      f'images, {num_classes} classes | {accelerator.num_processes} process(es), '
                      f'precision {accelerator.mixed_precision} | {run_dir}')

    for epoch in range(state.epoch + 1, num_epochs):
        start = time.time()
        train_loader.set_epoch(epoch)
        train_metrics = train_one_epoch(epoch, model, optimizer, train_loader, mixup_fn, loss_fn, scheduler,
                                        ema, state, accelerator, args)
        images_per_sec = len(train_loader) * args.batch_size * accelerator.num_processes / (time.time() - start)
        eval_metrics = validate(model, val_loader, accelerator)
        if ema is not None:
            eval_metrics.update({f'ema_{k}': v for k, v in validate(ema, val_loader, accelerator).items()})
        scheduler.step(epoch + 1, eval_metrics['top1'])
        state.epoch = epoch
        if eval_metrics['top1'] > state.best_top1:
            state.best_top1, state.best_epoch = eval_metrics['top1'], epoch
        lr = optimizer.param_groups[0]['lr']
        if accelerator.is_main_process:
            # The row goes first: if the save below is interrupted, resuming from the previous checkpoint
            # trims this row and repeats the epoch; the other order would lose the row for good.
            update_summary(epoch, train_metrics, eval_metrics, run_dir / 'summary.csv', lr=lr)
        save_checkpoint(accelerator, run_dir, epoch)
        extra = ''.join(f' | {k} {v:.4g}' for k, v in train_metrics.items() if k not in ('loss', 'skipped'))
        accelerator.print(f'epoch {epoch + 1}/{num_epochs} | train loss {train_metrics["loss"]:.4f} | '
                          f'val loss {eval_metrics["loss"]:.4f} | val top1 {eval_metrics["top1"]:.2f}% | '
                          f'lr {lr:.3g} | skipped {train_metrics["skipped"]}{extra} | train {images_per_sec:.0f} img/s | '
                          f'{time.time() - start:.1f}s')

    final = ema.module if ema is not None and args.export_ema else accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        export_model(final, run_dir / 'model', model_args=args.model_kwargs, data_config=data_config)
    accelerator.print(f'Validation top-1 accuracy: {eval_metrics["top1"]:.2f}% '
                      f'(best {state.best_top1:.2f}% at epoch {state.best_epoch + 1}); model in {run_dir / "model"}')


if __name__ == '__main__':
    main_guard(main)
