#!/usr/bin/env python3
""" timm-style image classification training with G-Mix, BG-Mix and DG-Mix, on Hugging Face Accelerate.

    python train.py                                  # G-Mix on the built-in digits (configs/digits.yaml)
    python train.py /data/imagenet --model resnet50 --opt gmix_sam --mixup 0.8 --mixup-mode dg
    accelerate launch train.py -c configs/digits_dg.yaml

timm's flags keep timm's meanings; every baseline runs through this script too (--opt sgd, --mixup 0, ...).
"""
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, TorchDynamoPlugin, broadcast_object_list, gather_object, set_seed
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, accuracy, distribute_bn
from tqdm import tqdm

from timm_gmix import SensitivityMeter, gmix_step
from timm_gmix.sam import find_wrapped
from timm_gmix.training.args import mixed_precision, parse_args, resolve_lr
from timm_gmix.training.checkpoint import (
    LAST, RECOVERY, CheckpointKeeper, RunLock, Stopped, all_finite, copy_run, describe, load_state, new_run_dir,
    on_disk, resolve_resume, save_state, set_aside_recovery, writing)
from timm_gmix.training.data import load_splits
from timm_gmix.training.errors import UsageError, main_guard
from timm_gmix.training.export import check_push_to_hub, export_model, push_to_hub
from timm_gmix.training.factory import check_input_size, configure_model, create_mixup, create_model, create_optimizer
from timm_gmix.training.loader import batches, create_loaders, epoch_batches, with_transforms
from timm_gmix.training.losses import create_loss
from timm_gmix.training.resume import CommandLineSettings, changed_flags, check_mid_epoch, epoch_plan, step_to
from timm_gmix.training.tracking import log_epoch, log_step, start_tracking, tracker_names, trim_summary, write_summary

DEFAULT_CONFIG = Path(__file__).parent / 'configs' / 'digits.yaml'


@dataclasses.dataclass
class TrainState:
    """ Where training stands, checkpointed with the rest: a resumed run continues from here, mid-epoch
    included (`updates_in_epoch` updates of epoch `epoch + 1` done, with that epoch's running sums, one entry
    per process: Accelerate saves registered objects from the main process only). """
    epoch: int = -1
    updates_in_epoch: int = 0
    num_updates: int = 0
    bad_steps: int = 0
    history: list = dataclasses.field(default_factory=list)  # [[metric, epoch], ...], best first
    epoch_sums: list = dataclasses.field(default_factory=list)

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


class EpochMeter:
    """ Running sums of one epoch (on the device: no host sync per step), kept in TrainState at recovery points. """

    def __init__(self, device, sums=None):
        self.loss, self.steps, self.skipped = torch.zeros((), device=device), 0, 0
        self.flagging = SensitivityMeter()
        if sums:
            self.loss, self.steps, self.skipped = sums['loss'].to(device), sums['steps'], sums['skipped']
            flagging = sums['flagging']['sums']
            self.flagging.load_state_dict({'sums': None if flagging is None else flagging.to(device)})

    def update(self, result):
        self.steps += 1
        self.skipped += int(result.skipped)
        if not result.skipped:
            self.loss += result.loss.detach().float()
        if result.sensitivity is not None:
            self.flagging.update(result.sensitivity, result.flagged, result.mixes_two_classes)

    def state_dict(self):
        sums = self.flagging.state_dict()['sums']
        return {'loss': self.loss.cpu(), 'steps': self.steps, 'skipped': self.skipped,
                'flagging': {'sums': None if sums is None else sums.cpu()}}

    def compute(self, accelerator):
        counts = accelerator.reduce(torch.tensor([self.steps - self.skipped, self.skipped], device=self.loss.device), 'sum')
        loss = accelerator.reduce(self.loss, 'sum') / counts[0].clamp(min=1)
        return {'loss': loss.item(), 'skipped': int(counts[1]), **self.flagging.compute(accelerator)}


def mean_lr(optimizer) -> float:
    """ The lr train.py logs, as timm does: the mean over the parameter groups (they differ under --layer-decay). """
    lrs = [group['lr'] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def set_cuda_backends(device: torch.device):
    """ timm's CUDA settings when training on CUDA: TF32 matmuls and cuDNN autotuning (cudnn.benchmark). """
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


@torch.no_grad()
def sync_lookahead(optimizer):
    """ timm's end-of-epoch `sync_lookahead()`: the weights become the slow weights, one Lookahead update early.
    timm's `update_slow` skips parameters without a gradient, and gradients are None after every update (in
    timm's loop too, where the call therefore changes nothing); they get a zero gradient for the call. """
    # around SAM (lookahead_gmix_sam) or as SAM's base (--sam-base lookahead_sgd), inside Accelerate's wrapper
    lookahead = find_wrapped(optimizer, lambda o: hasattr(o, 'sync_lookahead'))
    if lookahead is None:
        return
    missing = [p for group in lookahead.param_groups for p in group['params'] if p.requires_grad and p.grad is None]
    for p in missing:
        p.grad = torch.zeros_like(p)
    try:
        lookahead.sync_lookahead()
    finally:
        for p in missing:
            p.grad = None


def diverged(what: str, run_dir, args, accelerator) -> Stopped:
    """ The stop of a run that diverged: a recovery state of this epoch may be past the divergence, so it is set
    aside, and the one line names the last validated state and the command that continues it at a lower lr. """
    if accelerator.is_main_process:
        set_aside_recovery(run_dir)
    accelerator.wait_for_everyone()
    return Stopped(f'error: {what}; {on_disk(run_dir)}; continue it at a lower learning rate (or with --clip-grad): '
                   f'python train.py -c {run_dir / "args.yaml"} --resume {run_dir} --lr {args.lr / 10:.3g}')


def train_one_epoch(epoch, model, optimizer, loader, mixup_fn, loss_fn, scheduler, ema, state, accelerator, args,
                    run_dir, save):
    model.train()
    meter = EpochMeter(accelerator.device, state.epoch_sums[accelerator.process_index] if state.epoch_sums else None)
    accum = args.grad_accum_steps
    updates = math.ceil(len(loader) / accum)
    batches = iter(epoch_batches(loader, epoch, skip=state.updates_in_epoch * accum))
    bar = tqdm(range(state.updates_in_epoch, updates), desc=f'epoch {epoch}', leave=False,
               disable=not accelerator.is_local_main_process)
    for update in bar:
        # timm's --grad-accum-steps: one update from `accum` loader batches (the last update takes what is left)
        group = [next(batches) for _ in range(min(accum, len(loader) - update * accum))]
        inputs, targets = group[0] if len(group) == 1 else (torch.cat(t) for t in zip(*group))
        result = gmix_step(model, optimizer, inputs, targets, mixup_fn, loss_fn, accelerator,
                           clip_grad=args.clip_grad, clip_mode=args.clip_mode, sync_ascent=args.sync_ascent,
                           accum_steps=len(group), guard=args.step_guard)
        meter.update(result)
        state.bad_steps = state.bad_steps + 1 if result.skipped else 0
        if state.bad_steps >= args.max_bad_steps:
            raise diverged(f'{state.bad_steps} steps in a row had a non-finite loss, gradient or update in epoch '
                           f'{epoch + 1}', run_dir, args, accelerator)
        state.num_updates += 1
        if ema is not None and not result.skipped:  # timm: step = the updates made, this one included
            ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=state.num_updates)
        scheduler.step_update(num_updates=state.num_updates)
        if args.synchronize_step and torch.cuda.is_available():
            torch.cuda.synchronize()
        if (update + 1) % args.log_interval == 0 or update + 1 == updates:
            values = {'loss': result.loss.item(), 'lr': mean_lr(optimizer), 'skipped': meter.skipped}
            if result.flagged is not None:
                values['flagged_two_class'] = int((result.flagged & result.mixes_two_classes).sum())
            bar.set_postfix(loss=f'{values["loss"]:.3f}')
            log_step(accelerator, state.num_updates, values)
            if args.save_images and accelerator.is_main_process:
                import torchvision
                with writing(run_dir / f'train-batch-{epoch}-{update}.jpg') as tmp:
                    torchvision.utils.save_image(inputs, tmp, format='jpeg', normalize=True)
        if args.recovery_interval and (update + 1) % args.recovery_interval == 0 and update + 1 < updates:
            state.updates_in_epoch, state.epoch_sums = update + 1, gather_object([meter.state_dict()])
            save(RECOVERY, epoch, update + 1)
    state.updates_in_epoch, state.epoch_sums = 0, []
    sync_lookahead(optimizer)  # before every validation, checkpoint and export: the slow weights
    return meter.compute(accelerator)


@torch.no_grad()
def validate(model, loader, accelerator, args):
    """ Loss, top-1 and top-5 over the validation split (summed on the device, read once at the end). """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top-1, top-5 (in %), examples
    for inputs, targets in batches(loader):
        with accelerator.autocast():
            logits = model(inputs)
        if args.tta > 1:  # timm's test-time augmentation reduction
            logits, targets = logits.unfold(0, args.tta, args.tta).mean(dim=2), targets[::args.tta]
        logits, targets = accelerator.gather_for_metrics((logits.float(), targets))
        acc1, acc5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[-1])))
        sums += torch.stack([F.cross_entropy(logits, targets, reduction='sum'), acc1 * len(targets),
                             acc5 * len(targets), torch.tensor(len(targets), device=logits.device)]).double()
    loss, top1, top5, count = sums.tolist()
    return {'loss': loss / count, 'top1': top1 / count, 'top5': top5 / count}


def make_accelerator(args) -> Accelerator:
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)] if args.no_ddp_bb else []
    dynamo = TorchDynamoPlugin(backend=args.torchcompile, mode=args.torchcompile_mode) if args.torchcompile else None
    accelerator = Accelerator(
        cpu=args.device == 'cpu', mixed_precision=mixed_precision(args), log_with=tracker_names(args),
        project_dir=args.output or 'output/train',  # start_tracking points the trackers at the run folder
        kwargs_handlers=handlers, dynamo_plugin=dynamo,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                  non_blocking=args.pin_mem))
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UsageError(f'{accelerator.distributed_type.value} is not supported: the SAM step needs whole '
                         f'parameters on each process; use DDP (accelerate launch --multi_gpu)')
    return accelerator


def open_run(args, accelerator, resume):
    """ The run folder, shared by every process, and its lock: the resumed run's own folder when continuing from
    its newest state (or starting again a run that stopped before its first checkpoint); otherwise a new folder
    (with the older run's args and summary when continuing from an older state). """
    run_dir = lock = None
    if accelerator.is_main_process:
        if resume is not None and resume.newest:
            run_dir = resume.run_dir
        else:
            model_name = Path(args.model.split(':', 1)[-1]).name  # hf-hub:timm/<name>, local-dir:<folder>
            run_dir = new_run_dir(args.output, args.experiment, f'{model_name}-{args.img_size or "default"}')
        lock = RunLock(run_dir)
        if resume is not None and not resume.newest:
            copy_run(resume.run_dir, run_dir)
        elif (resume is None or resume.state is None) and (run_dir / 'args.yaml').is_file():
            print(f'{run_dir} holds no checkpoint yet (its run stopped before the first): starting it again')
    run_dir = Path(broadcast_object_list([run_dir])[0])
    return run_dir, lock


def parse_and_check(argv):
    """ (args, resume): the command line over its preset, checked, and the state --resume names (None without it),
    checked against the flags that cannot change mid-epoch. """
    args = parse_args(sys.argv[1:] if argv is None else argv, default_config=DEFAULT_CONFIG)
    for module in args.device_modules or ():
        __import__(module)
    resume = resolve_resume(args.resume) if args.resume else None
    if resume is not None and resume.state is not None:
        check_mid_epoch(resume, args)
    tracker_names(args)
    check_push_to_hub(args)
    return args, resume


@dataclasses.dataclass
class Data:
    """ The training and validation sets as the model takes them, and what the model card says of them. """
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    num_classes: int
    label_names: Optional[list]
    config: dict  # timm's data config for the model: input size, interpolation, mean, std, crop


def load_data_and_model(args):
    """ (Data, model): the splits, checked before the model is built for them, and timm's transforms for it. """
    train_split, val_split, num_classes = load_splits(args)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UsageError(f'--num-classes {args.num_classes} disagrees with the data, which has {num_classes} '
                         f'classes: drop --num-classes or fix the label column')
    set_seed(args.seed)
    model = create_model(args, num_classes)
    train_set, val_set, data_config = with_transforms(train_split, val_split, args, model)
    model = configure_model(model, args)
    check_input_size(model, args, data_config['input_size'])
    label_names = getattr(train_split.features[args.target_key], 'names', None)
    return Data(train_set, val_set, num_classes, label_names, data_config), model


@dataclasses.dataclass
class Training:
    """ What trains, prepared by Accelerate; the scheduler, `state` and the EMA are checkpointed with the model and
    the optimizer. """
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: Optional[ModelEmaV3]
    scheduler: Scheduler
    num_epochs: int
    updates_per_epoch: int
    state: TrainState
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    mixup_fn: object
    loss_fn: torch.nn.Module


def prepare(args, data, model) -> Training:
    """ The order is timm's where it decides a result: the seeds, the EMA copied before the DDP wrapper, the
    schedule built on the prepared optimizer. """
    accelerator = make_accelerator(args)
    set_cuda_backends(accelerator.device)
    set_seed(args.seed, device_specific=True)  # timm: seed + rank (lam, masks); DDP syncs the initial weights
    train_loader, val_loader = create_loaders(data.train_set, data.val_set, args, accelerator, data.config)
    if len(train_loader) < args.grad_accum_steps:
        raise UsageError(f'{len(data.train_set)} training examples do not fill one update of {args.grad_accum_steps} '
                         f'x {args.batch_size} per process: lower --batch-size or --grad-accum-steps')
    args.lr = resolve_lr(args, accelerator.num_processes)
    # As in timm, the EMA copies the model on its device (prepare would move it there only after) and before
    # the DDP wrapper; --model-ema-force-cpu keeps it on the CPU.
    model = model.to(accelerator.device)
    optimizer = create_optimizer(args, model)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                     device='cpu' if args.model_ema_force_cpu else None) if args.model_ema else None
    model, optimizer = accelerator.prepare(model, optimizer)
    # timm schedulers are stepped by hand: Accelerate would step a prepared one once per process.
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args, args.eval_metric == 'loss'),
                                                updates_per_epoch=updates_per_epoch)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *([ema] if ema is not None else []))
    return Training(accelerator, model, optimizer, ema, scheduler, num_epochs, updates_per_epoch, state, train_loader,
                    val_loader, create_mixup(args, data.num_classes), create_loss(args, data.num_classes))


class Run:
    """ The run folder, locked while the run trains in it, and what the run writes there: its args, training
    states (`save`), the best epochs (`keeper`), the best and the final model with their card. Made, it stands
    where the run continues: the state --resume names loaded under the command line's settings, the scheduler
    stepped to it, and args.yaml holding the flags the run trains with from here on. """

    def __init__(self, args, training: Training, data: Data, resume):
        self.args, self.training, self.data = args, training, data
        self.dir, self.lock = open_run(args, training.accelerator, resume)
        self.meta = {'model': args.model, 'num_classes': data.num_classes, 'opt': args.opt, 'sam_base': args.sam_base,
                     'model_ema': bool(args.model_ema), 'epoch_plan': epoch_plan(args)}
        state, accelerator = training.state, training.accelerator
        if resume is not None and resume.state is not None:
            self._load(resume)
        if args.start_epoch is not None:
            state.epoch, state.updates_in_epoch = args.start_epoch - 1, 0
            state.num_updates = args.start_epoch * training.updates_per_epoch
        if resume is not None or args.start_epoch is not None:
            step_to(training.scheduler, state.epoch + 1, state.num_updates)
        self._check_epochs()
        if accelerator.is_main_process:
            trim_summary(self.dir / 'summary.csv', state.epoch)
            with writing(self.dir / 'args.yaml') as tmp:  # only now: every check above has passed
                tmp.write_text(yaml.safe_dump(vars(args), sort_keys=False))
        # over the loaded history: loading replaces TrainState's list
        self.keeper = CheckpointKeeper(self.dir, state.history, args.checkpoint_hist,
                                       decreasing=args.eval_metric == 'loss')
        if resume is not None and resume.state is not None and resume.newest and accelerator.is_main_process:
            # repair a kill between the save and the links
            self.keeper.materialize(state.epoch, self.export_best if state.updates_in_epoch == 0 else None)

    def _load(self, resume):
        """ As in timm, the command line decides the schedule and the hyperparameters; the checkpoint, what training
        made of the model and the optimizer, and where it stands. """
        args, t = self.args, self.training
        command_line = CommandLineSettings(t.optimizer, t.scheduler)
        fresh_optimizer = t.optimizer.state_dict() if args.no_resume_opt else None
        load_state(t.accelerator, resume.state, self.meta)
        if args.no_resume_opt:
            t.optimizer.load_state_dict(fresh_optimizer)
        changed = changed_flags(resume.run_dir, args)
        command_line.apply(t.optimizer, t.scheduler, lr_changed='--lr' in changed)
        t.accelerator.print(f'resumed from {resume.state} ({describe(resume.state)})' + (
            '; flags that differ from its args.yaml take effect: ' + ', '.join(
                f'{flag} {now} (was {was})' for flag, (was, now) in changed.items()) if changed else ''))
        if not resume.newest:  # continued from an older state in a new folder: its best checkpoints stay behind
            t.state.history.clear()

    def _check_epochs(self):
        """ A run that trained all of --epochs only exports, if it has not yet; one that trained more is refused. """
        args, state, num_epochs = self.args, self.training.state, self.training.num_epochs
        trained, finished = state.epoch + 1, (self.dir / 'model').is_dir() and state.updates_in_epoch == 0
        if trained > num_epochs or (trained == num_epochs and state.updates_in_epoch):
            done = f' and {state.updates_in_epoch} updates of epoch {trained + 1}' if state.updates_in_epoch else ''
            flag = trained - (num_epochs - args.epochs)  # timm's schedule adds --cooldown-epochs to --epochs
            raise UsageError(f'the run in {self.dir} trained {trained} epochs{done}, more than --epochs {args.epochs} '
                             f'asks: ' + (f'pass --epochs {flag + 1} or more to train longer' if finished or done else
                                          f'pass --epochs {flag} to export it as it stands, or more to train longer'))
        if trained == num_epochs:
            if finished:
                raise UsageError(f'the run in {self.dir} already trained all {num_epochs} epochs: raise --epochs to '
                                 f'train longer')
            self.training.accelerator.print(f'all {num_epochs} epochs were trained; exporting the model the run did '
                                            f'not finish exporting')

    @property
    def evaluated(self) -> torch.nn.Module:
        """ As in timm, a validated EMA is what best selection ranks. """
        t = self.training
        if t.ema is not None and not self.args.model_ema_force_cpu:
            return t.ema.module
        return t.accelerator.unwrap_model(t.model, keep_torch_compile=False)

    def card(self, final_metrics) -> dict:
        metric, epoch = self.keeper.best
        return {'dataset': self.args.dataset or self.args.data_dir, 'num_train': len(self.data.train_set),
                'num_val': len(self.data.val_set), 'label_names': self.data.label_names, 'final': final_metrics,
                'best_metric': metric, 'best_epoch': epoch, 'eval_metric': self.args.eval_metric,
                'epochs_trained': self.training.state.epoch + 1}

    def export_best(self, metrics=None):
        folder = export_model(self.evaluated, self.dir / 'model_best', self.args, self.data.config, self.card(metrics))
        with writing(self.dir / 'model_best.safetensors') as tmp:  # the same file, for timm.models.load_checkpoint
            tmp.hardlink_to(folder / 'model.safetensors')

    def save(self, name, epoch, updates_done=0):
        """ The training state in the run folder's `name`, `updates_done` updates into `epoch` (0: after it), never
        one with a non-finite weight or optimizer value. """
        t = self.training
        tensors = [*t.model.state_dict().values(), *(t.ema.state_dict().values() if t.ema is not None else []),
                   *(v for s in t.optimizer.state_dict()['state'].values() for v in s.values())]
        if not all_finite(tensors):
            raise diverged(f'the weights or optimizer state are not finite in epoch {epoch + 1}: not saved', self.dir,
                           self.args, t.accelerator)
        position = (epoch, updates_done) if updates_done else (epoch + 1, 0)
        save_state(t.accelerator, self.dir / name, {**self.meta, 'position': position})

    def finish(self, eval_metrics):
        """ The final model exported (and pushed), the trackers ended, the lock released. """
        args, t = self.args, self.training
        final = t.ema.module if t.ema is not None and args.export_ema else \
            t.accelerator.unwrap_model(t.model, keep_torch_compile=False)
        if t.accelerator.is_main_process:
            final_card = self.card(eval_metrics)
            export_model(final, self.dir / 'model', args, self.data.config, final_card)
            if args.push_to_hub:
                push_to_hub(final, self.dir / 'model', args, self.data.config, final_card)
        t.accelerator.end_training()
        best_metric, best_epoch = self.keeper.best
        ranked = f'EMA {args.eval_metric}' if t.ema is not None and not args.model_ema_force_cpu else args.eval_metric
        t.accelerator.print(f'Validation top-1 accuracy: {eval_metrics["top1"]:.2f}% '
                            f'(best {ranked} {best_metric:.4g} at epoch {best_epoch + 1}); model in '
                            f'{self.dir / "model"}, best in {self.dir / "model_best"}')
        if self.lock is not None:
            self.lock.release()


def train(run: Run) -> dict:
    """ The epochs the run has left, each validated (every --val-interval), logged and checkpointed; the
    validation metrics of the last (of the model as it stands if no epoch was left). """
    args, t = run.args, run.training
    accelerator, state = t.accelerator, t.state
    start_tracking(accelerator, args, run.dir, run.dir.name)
    accelerator.print(f'{args.model} ({sum(p.numel() for p in t.model.parameters()) / 1e6:.2f}M params) | '
                      f'{args.opt} | mixup-mode {args.mixup_mode} | {len(run.data.train_set)} train / '
                      f'{len(run.data.val_set)} val images, {run.data.num_classes} classes | '
                      f'{accelerator.num_processes} process(es), precision {accelerator.mixed_precision} | '
                      f'lr {args.lr:.4g} | {run.dir}')
    eval_metrics = {}
    for epoch in range(state.epoch + 1, t.num_epochs):
        start = time.time()
        if t.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            t.mixup_fn.mixup_enabled = False
        train_metrics = train_one_epoch(epoch, t.model, t.optimizer, t.train_loader, t.mixup_fn, t.loss_fn,
                                        t.scheduler, t.ema, state, accelerator, args, run.dir, run.save)
        images_per_sec = len(t.train_loader) * args.batch_size * accelerator.num_processes / (time.time() - start)
        if accelerator.num_processes > 1 and args.dist_bn:
            distribute_bn(t.model, accelerator.num_processes, args.dist_bn == 'reduce')
        state.epoch = epoch
        if (epoch + 1) % args.val_interval and epoch + 1 != t.num_epochs:
            t.scheduler.step(epoch + 1)
            continue
        eval_metrics = validate(t.model, t.val_loader, accelerator, args)
        if t.ema is not None and not args.model_ema_force_cpu:
            if accelerator.num_processes > 1 and args.dist_bn:  # timm distributes the EMA's statistics too
                distribute_bn(t.ema, accelerator.num_processes, args.dist_bn == 'reduce')
            eval_metrics.update({f'ema_{k}': v for k, v in validate(t.ema, t.val_loader, accelerator, args).items()})
        metric = eval_metrics[f'ema_{args.eval_metric}' if f'ema_{args.eval_metric}' in eval_metrics
                              else args.eval_metric]
        t.scheduler.step(epoch + 1, metric)
        lr = mean_lr(t.optimizer)
        if accelerator.is_main_process:
            # The row goes first: if the save below is interrupted, resuming from the previous checkpoint
            # trims this row and repeats the epoch; the other order would lose the row for good.
            write_summary(run.dir / 'summary.csv', epoch, train_metrics, eval_metrics, lr)
        log_epoch(accelerator, epoch, {**{f'train_{k}': v for k, v in train_metrics.items()},
                                       **{f'eval_{k}': v for k, v in eval_metrics.items()}, 'lr': lr})
        if not math.isfinite(eval_metrics['loss']):  # finite weights can still make non-finite outputs
            raise diverged(f'the model diverged in epoch {epoch + 1} (validation loss {eval_metrics["loss"]}): '
                           f'not saved', run.dir, args, accelerator)
        run.keeper.rank(epoch, metric)
        run.save(LAST, epoch)
        if accelerator.is_main_process:
            run.keeper.materialize(epoch, lambda: run.export_best(eval_metrics))
        accelerator.wait_for_everyone()
        extra = ''.join(f' | {k} {v:.4g}' for k, v in train_metrics.items() if k not in ('loss', 'skipped'))
        accelerator.print(f'epoch {epoch + 1}/{t.num_epochs} | train loss {train_metrics["loss"]:.4f} | '
                          f'val loss {eval_metrics["loss"]:.4f} | val top1 {eval_metrics["top1"]:.2f}% | '
                          f'lr {lr:.3g} | skipped {train_metrics["skipped"]}{extra} | train {images_per_sec:.0f} img/s | '
                          f'{time.time() - start:.1f}s')
    return eval_metrics or validate(t.model, t.val_loader, accelerator, args)  # a finished run only exported now


def main(argv=None):
    args, resume = parse_and_check(argv)
    data, model = load_data_and_model(args)
    training = prepare(args, data, model)
    run = Run(args, training, data, resume)
    run.finish(train(run))


if __name__ == '__main__':
    main_guard(main)
