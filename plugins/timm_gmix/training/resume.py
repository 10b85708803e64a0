""" Continuing a run as timm does: the command line decides.

A resumed run restores what training made (weights, optimizer moments, EMA, RNG states, where it stands) and
takes what the command line sets (the schedule and the hyperparameters) from the command line: the optimizer's
hyperparameters (lr, weight decay, momentum, rho, ...) are the flags', and the scheduler is the one the flags
build, stepped to where the run stands. With the same flags this is the uninterrupted run, bit for bit.
"""
from pathlib import Path

import yaml
from timm.scheduler.plateau_lr import PlateauLRScheduler

from .checkpoint import LAST, describe, read_manifest
from .errors import UsageError

# Values in parameter groups that training counts up: state, kept from the checkpoint.
COUNTERS = ('step', 'lookahead_step')
# Flags that say where a run is, not how it trains.
BOOKKEEPING = ('resume', 'output', 'experiment', 'config', 'local_rank', 'data')
# Flags that decide which examples the updates of an epoch hold (with the number of processes, which a resume
# never changes): a state saved mid-epoch continues only with the values it was saved with.
EPOCH_PLAN = {'batch_size': '-b', 'grad_accum_steps': '--grad-accum-steps', 'epoch_repeats': '--epoch-repeats',
              'train_batches_per_epoch': '--train-batches-per-epoch', 'aug_repeats': '--aug-repeats',
              'train_subset': '--train-subset', 'train_num_samples': '--train-num-samples'}


class CommandLineSettings:
    """ What the command line set in a freshly built optimizer and scheduler, taken before a checkpoint is
    loaded over them and put back with `apply`. """

    def __init__(self, optimizer, scheduler):
        self.groups = [{k: v for k, v in group.items() if k != 'params' and k not in COUNTERS}
                       for group in optimizer.param_groups]
        self.schedule = scheduler.state_dict()

    def apply(self, optimizer, scheduler, lr_changed: bool):
        """ The command line's hyperparameters and schedule over a loaded checkpoint. A plateau schedule keeps
        what its metrics made of it (its best metric and the lr it reduced to) unless --lr changed. """
        loaded_lrs = [group['lr'] for group in optimizer.param_groups]
        for group, settings in zip(optimizer.param_groups, self.groups):
            group.update(settings)
        if isinstance(scheduler, PlateauLRScheduler):
            if not lr_changed:
                for group, lr in zip(optimizer.param_groups, loaded_lrs):
                    group['lr'] = lr
        else:
            scheduler.load_state_dict(self.schedule)


def step_to(scheduler, epochs_done: int, num_updates: int):
    """ The scheduler's value where a run stands, as the uninterrupted run last set it: after `epochs_done`
    epochs (epoch schedules) and `num_updates` updates (--sched-on-updates). """
    scheduler.step(epochs_done)
    scheduler.step_update(num_updates)


def changed_flags(run_dir, args) -> dict:
    """ {flag: (value in the run's args.yaml, value now)} for every flag that differs. """
    path = Path(run_dir) / 'args.yaml'
    saved = yaml.safe_load(path.read_text()) if path.is_file() else {}
    now = yaml.safe_load(yaml.safe_dump(vars(args)))  # as args.yaml holds them (tuples become lists)
    return {f'--{key.replace("_", "-")}': (saved.get(key), value) for key, value in now.items()
            if key not in BOOKKEEPING and key in saved and saved[key] != value}


def epoch_plan(args) -> dict:
    """ The EPOCH_PLAN values of `args`, as a state's manifest keeps them. """
    return {key: getattr(args, key) for key in EPOCH_PLAN}


def check_mid_epoch(resume, args):
    """ A state saved mid-epoch continues only with the epoch plan it was saved with: the updates it did are counted
    in batches of that plan. States saved before manifests held the plan are checked against the run's args.yaml,
    which holds the flags of the session that saved its newest state. """
    manifest = read_manifest(resume.state)
    epoch, updates = manifest['position']
    if not updates:
        return
    saved = manifest.get('epoch_plan')
    if saved is None:
        path = resume.run_dir / 'args.yaml'
        saved = {k: v for k, v in (yaml.safe_load(path.read_text()) if path.is_file() else {}).items() if k in EPOCH_PLAN}
    changed = {key: was for key, was in saved.items() if getattr(args, key) != was}
    if not changed:
        return
    was = ' '.join(f'{EPOCH_PLAN[key]} {value}' for key, value in changed.items())
    now = ' '.join(f'{EPOCH_PLAN[key]} {getattr(args, key)}' for key in changed)
    last = resume.run_dir / LAST
    other = (f'or resume from {last} ({describe(last)}) with {now}' if last.is_dir() and
             tuple(read_manifest(last)['position']) == (epoch, 0) else f'or start a new run with {now}')
    raise UsageError(f'{resume.state} was saved in the middle of an epoch ({describe(resume.state)}) with {was}, '
                     f'which cut that epoch into its updates: resume it with {was}, {other}')
