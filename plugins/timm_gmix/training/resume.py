""" Continuing a run as timm does: the command line decides.

A resumed run restores what training made (weights, optimizer moments, EMA, RNG states, where it stands) and
takes what the command line sets (the schedule and the hyperparameters) from the command line: the optimizer's
hyperparameters (lr, weight decay, momentum, rho, ...) are the flags', and the scheduler is the one the flags
build, stepped to where the run stands. With the same flags this is the uninterrupted run, bit for bit.
"""
from pathlib import Path

import yaml
from timm.scheduler.plateau_lr import PlateauLRScheduler

# Values in parameter groups that training counts up: state, kept from the checkpoint.
COUNTERS = ('step', 'lookahead_step')
# Flags that say where a run is, not how it trains.
BOOKKEEPING = ('resume', 'output', 'experiment', 'config', 'local_rank', 'data')


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
