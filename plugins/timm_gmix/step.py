""" One complete G-Mix / BG-Mix / DG-Mix update: `gmix_step`.

    1. ascent pass at w on the mixed batch (under `no_sync`: each replica perturbs by its own gradient)
    2. e from the ascent gradient; w <- w + e
    3. bg/dg only: sensitivity forward at w + e without gradient, flag ceil(gamma * B) examples
    4. descent pass at w + e on the descent batch (the mixed batch for g)
    5. restore w by copy, unscale, clip, step the base optimizer

Every pass at w + e normalizes with batch statistics but leaves BatchNorm running statistics as
they were. Dropout and drop-path draw fresh masks in each pass. With an optimizer that is not SAM the
same function makes a plain step (one pass), so baselines run through the same code.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from timm.utils import dispatch_clip_grad

from .mixup import GMixup, MixedBatch
from .sam import find_sam
from .sensitivity import flag_examples


def cross_entropy_per_example(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """ Per-example cross-entropy for class indices (with label smoothing) or soft targets
    (already smoothed by the mixing function). """
    if target.ndim == 1:
        return F.cross_entropy(logits, target, reduction='none', label_smoothing=smoothing)
    return F.cross_entropy(logits, target, reduction='none')


@dataclass
class StepResult:
    """ `loss`: mean loss at w on the (mixed) batch. `skipped`: no update was made (non-finite loss or
    gradient). For bg/dg: per-example `sensitivity`, the `flagged` mask and `mixes_two_classes`. """
    loss: torch.Tensor
    skipped: bool
    sensitivity: Optional[torch.Tensor] = None
    flagged: Optional[torch.Tensor] = None
    mixes_two_classes: Optional[torch.Tensor] = None


@contextmanager
def frozen_bn_stats(model: torch.nn.Module):
    """ BatchNorm normalizes with batch statistics, as in training, but its running statistics stay put. """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def gmix_step(
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mixup_fn: Optional[Callable] = None,
        loss_fn: Callable = cross_entropy_per_example,
        accelerator=None,
        scaler: Optional[torch.amp.GradScaler] = None,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        sync_ascent: bool = False,
        accum_steps: int = 1,
) -> StepResult:
    """ Make one complete update of `model` from a raw batch.

    Args:
        optimizer: SAM (`opt='gmix_sam'`), possibly in Lookahead and/or Accelerate's wrapper; any other
            optimizer makes a plain step
        mixup_fn: `GMixup` (its mode picks g/bg/dg), timm's `Mixup`, or None (plain SAM)
        loss_fn: per-example loss `loss_fn(logits, targets) -> (B,)`
        accelerator: runs the passes under its autocast, `no_sync` and GradScaler
        scaler: a GradScaler, for use without an accelerator (with one, its own scaler is used)
        clip_grad, clip_mode: as timm's `--clip-grad`/`--clip-mode`, applied to unscaled gradients
        sync_ascent: all-reduce the ascent gradient too (the perturbation then uses the global norm)
        accum_steps: split the batch in this many micro-batches; the update equals the whole-batch one
    """
    if accelerator is not None:
        if scaler is not None:
            raise ValueError('pass a GradScaler only without an accelerator: the accelerator brings its own')
        if accelerator.gradient_accumulation_steps > 1:
            raise ValueError('use gmix_step(accum_steps=K) rather than Accelerator(gradient_accumulation_steps)')
        scaler = accelerator.scaler
    stepper = getattr(optimizer, 'optimizer', optimizer) if accelerator is not None else optimizer
    sam = find_sam(stepper)
    mode = getattr(mixup_fn, 'gmix_mode', None) or 'g'
    if mode in ('bg', 'dg') and sam is None:
        raise ValueError(f'mixup mode {mode!r} needs the SAM optimizer (--opt gmix_sam)')

    if isinstance(mixup_fn, GMixup):
        batch = mixup_fn.mix(inputs, targets)
    elif mixup_fn is not None:
        batch = MixedBatch.unmixed(*mixup_fn(inputs, targets))
    else:
        batch = MixedBatch.unmixed(inputs, targets)

    autocast = accelerator.autocast if accelerator is not None else nullcontext
    no_sync = (lambda: accelerator.no_sync(model)) if accelerator is not None \
        else getattr(model, 'no_sync', nullcontext)
    batch_size = len(batch.inputs)

    def backward(loss):
        if accelerator is not None:
            accelerator.backward(loss)
        elif scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()

    def micro_batches(*tensors):
        return list(zip(*(t.tensor_split(accum_steps) for t in tensors)))

    def forward_backward(x, y, weights, sync: bool):
        """ Gradient of sum_i weights_i * l_i / B over micro-batches, all-reduced on the last if `sync`;
        returns the per-example losses. """
        chunks = micro_batches(x, y, weights)
        losses = []
        for i, (xc, yc, wc) in enumerate(chunks):
            with (nullcontext() if sync and i == len(chunks) - 1 else no_sync()):
                with autocast():
                    loss = loss_fn(model(xc), yc)
                backward((loss * wc).sum() / batch_size)
            losses.append(loss.detach())
        return torch.cat(losses)

    @torch.no_grad()
    def forward(x, y):
        with autocast():
            return torch.cat([loss_fn(model(xc), yc) for xc, yc in micro_batches(x, y)])

    def all_agree(ok: torch.Tensor) -> bool:
        """ Replicas must take the same branch, or the next all-reduce waits forever. """
        if accelerator is not None and accelerator.num_processes > 1:
            ok = accelerator.reduce(ok.float(), reduction='sum') == accelerator.num_processes
        return bool(ok)

    ones = torch.ones(batch_size, device=batch.inputs.device)
    loss_w = forward_backward(batch.inputs, batch.targets, ones, sync=sam is None or sync_ascent)
    result = StepResult(loss=loss_w.mean(), skipped=True)

    if sam is not None:
        grad_norm = sam.grad_norm()
        if not all_agree(torch.isfinite(grad_norm) & torch.isfinite(loss_w).all()):
            stepper.zero_grad(set_to_none=True)
            if scaler is not None:
                # The ascent overflowed at this loss scale: back off (and restart growth) as GradScaler
                # does for an overflow in the step it checks.
                state = scaler.state_dict()
                state.update(scale=scaler.get_scale() * scaler.get_backoff_factor(), _growth_tracker=0)
                scaler.load_state_dict(state)
            return result
        sam.perturb(grad_norm)
        stepper.zero_grad(set_to_none=True)
        with frozen_bn_stats(model):
            flagged = torch.zeros(batch_size, dtype=torch.bool, device=ones.device)
            if mode in ('bg', 'dg'):
                result.sensitivity = forward(batch.inputs, batch.targets) - loss_w
                flagged = flag_examples(result.sensitivity, mixup_fn.gmix_ratio, mixup_fn.gmix_flag == 'largest')
                result.flagged, result.mixes_two_classes = flagged, batch.mixes_two_classes
            x, y, weights = batch.descent_batch(flagged, mode)
            loss_e = forward_backward(x, y, weights, sync=True)
        sam.restore()
    else:
        loss_e = loss_w

    if scaler is not None:
        scaler.unscale_(stepper)
    params = [p for group in stepper.param_groups for p in group['params'] if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    result.skipped = not all_agree(torch.isfinite(grad_norm) & torch.isfinite(loss_e).all())
    if not result.skipped:
        if clip_grad is not None:
            if clip_mode == 'norm':
                torch.nn.utils.clip_grads_with_norm_(params, clip_grad, grad_norm)
            else:
                dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        stepper.step()
    if scaler is not None:
        scaler.update()
    stepper.zero_grad(set_to_none=True)
    return result
