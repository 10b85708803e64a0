""" Mixup/CutMix with the G-Mix modes, on top of timm's `Mixup`.

timm's modes `batch`, `pair`, `elem` keep their meaning. The G-Mix modes
    g   G-Mix: SAM on the mixed batch
    bg  Binary G-Mix: flagged mixed examples are replaced by their clean anchors in the descent pass
    dg  Decomposed G-Mix: flagged mixed examples are replaced by their two clean constituents,
        weighted lam and 1 - lam
mix with the lam granularity `lam_mode` (`batch`, `pair` or `elem`, as in timm).
"""
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

TIMM_MODES = ('batch', 'pair', 'elem')
GMIX_MODES = ('g', 'bg', 'dg')
PARTITION_MODES = ('bg', 'dg')  # the modes that flag examples and change the descent batch
FLAG_CHOICES = ('largest', 'smallest')


@dataclass
class MixedBatch:
    """ A mixed batch and what the G-Mix step needs to undo the mixing.

    `partner[i]` is the example that i was mixed with (timm flips the batch: B - 1 - i) and `lam[i]`
    the share of example i itself (area-corrected for CutMix). `clean_inputs` is kept for `bg`/`dg` only.
    Without mixing, `targets` are the class indices and `lam` is all ones.
    """
    inputs: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    lam: torch.Tensor
    clean_inputs: Optional[torch.Tensor] = None
    clean_targets: Optional[torch.Tensor] = None

    @classmethod
    def unmixed(cls, inputs, targets):
        ones = torch.ones(len(inputs), device=inputs.device)
        return cls(inputs, targets, targets if targets.ndim == 1 else targets.argmax(-1), ones)

    @property
    def partner(self) -> torch.Tensor:
        return torch.arange(len(self.inputs) - 1, -1, -1, device=self.inputs.device)

    @property
    def mixes_two_classes(self) -> torch.Tensor:
        """ Per example: a real mix (lam < 1) of two different classes. """
        differ = self.labels != self.labels[self.partner]
        return (self.lam < 1) & (differ.flatten(1).any(1) if differ.ndim > 1 else differ)

    def descent_batch(self, flagged: torch.Tensor, mode: str):
        """ Inputs, targets and loss weights of the descent pass: exactly the rows of the spec's descent batch.

        Unflagged mixed examples keep weight 1. A flagged example i becomes its clean anchor x_i with
        weight 1 (`bg`), or its constituents x_i and x_partner(i) with weights lam_i and 1 - lam_i
        (`dg`); a clean example needed twice is forwarded once with the summed weight.
        With nothing flagged this is the mixed batch itself. A `bg` batch has B rows; a `dg` batch B - F mixed and
        F to 2F clean rows (F flagged), so its size varies from step to step: no row is added to fix it, since
        under BatchNorm in training mode every row counts in the batch statistics.

        Rows stand in the order of the examples they come from (the mixed row of i, then the clean x_i), so
        that micro-batches of `accum_steps` each hold mixed and clean rows of their own part of the batch.
        """
        if mode not in PARTITION_MODES:
            raise ValueError(f'descent_batch: mode must be one of {", ".join(PARTITION_MODES)}, got {mode!r}')
        keep = ~flagged
        if not flagged.any():
            return self.inputs, self.targets, torch.ones(len(self.inputs), device=self.inputs.device)
        if mode == 'bg':
            clean_weight = flagged.float()
        else:
            lam = self.lam.float()
            clean_weight = torch.zeros_like(lam)
            clean_weight.index_add_(0, flagged.nonzero().squeeze(1), lam[flagged])
            clean_weight.index_add_(0, self.partner[flagged], 1 - lam[flagged])
        needed = clean_weight > 0
        index = torch.arange(len(self.inputs), device=self.inputs.device)
        # position 2i: mixed row of i, 2i + 1: clean x_i; a stable sort keeps that order
        order = torch.cat([2 * index[keep], 2 * index[needed] + 1]).argsort(stable=True)
        inputs = torch.cat([self.inputs[keep], self.clean_inputs[needed]])[order]
        targets = torch.cat([self.targets[keep], self.clean_targets[needed]])[order]
        weights = torch.cat([torch.ones(int(keep.sum()), device=clean_weight.device), clean_weight[needed]])[order]
        return inputs, targets, weights


def _is_number(value, low, high, low_open=False, high_open=False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))


CHECKED = ('mixup_alpha', 'cutmix_alpha', 'cutmix_minmax', 'prob', 'switch_prob', 'label_smoothing', 'num_classes')


def check_mixing(mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, label_smoothing, num_classes=None,
                 names: Optional[dict] = None):
    """ ValueError for arguments of timm's `Mixup` that would fail later inside timm, or silently. `names` says
    what to call each argument in the message (train.py passes its flags); `num_classes` None: not known yet. """
    n = {**{name: name for name in CHECKED}, **(names or {})}
    for name, value in (('mixup_alpha', mixup_alpha), ('cutmix_alpha', cutmix_alpha)):
        if not _is_number(value, 0, math.inf):
            raise ValueError(f'{n[name]} must be zero (off) or a positive number, got {value!r}')
    for name, value in (('prob', prob), ('switch_prob', switch_prob)):
        if not _is_number(value, 0, 1):
            raise ValueError(f'{n[name]} is a probability: it must be in [0, 1], got {value!r}')
    if not _is_number(label_smoothing, 0, 1, high_open=True):
        raise ValueError(f'{n["label_smoothing"]} must be in [0, 1), got {label_smoothing!r}')
    if num_classes is not None and not (isinstance(num_classes, int) and not isinstance(num_classes, bool)
                                        and num_classes >= 1):
        raise ValueError(f'{n["num_classes"]} must be a whole number of classes, 1 or more, got {num_classes!r}')
    if cutmix_minmax is not None and not (len(cutmix_minmax) == 2 and _is_number(cutmix_minmax[0], 0, 1, low_open=True)
                                          and _is_number(cutmix_minmax[1], cutmix_minmax[0], 1, low_open=True)):
        raise ValueError(f'{n["cutmix_minmax"]} must be MIN MAX with 0 < MIN < MAX <= 1, got '
                         f'{" ".join(map(str, cutmix_minmax))}')


class GMixup(Mixup):
    """ timm's `Mixup` with the G-Mix modes.

    Same arguments as `timm.data.Mixup`, plus:
        mode: a timm mode (`batch`, `pair`, `elem`) or a G-Mix mode (`g`, `bg`, `dg`)
        lam_mode: lam granularity for the G-Mix modes (`batch`, `pair`, `elem`)
        gmix_ratio: gamma, the fraction of each batch flagged by sharpness sensitivity (`bg`, `dg`)
        gmix_flag: flag the `largest` (default) or `smallest` sensitivities

    `x, target = mixup_fn(x, target)` behaves as timm's; `mix(x, target)` also returns what the
    G-Mix step needs (`MixedBatch`).
    """

    def __init__(self, *args, mode: str = 'batch', lam_mode: str = 'batch', gmix_ratio: float = 0.5,
                 gmix_flag: str = 'largest', **kwargs):
        timm_args = inspect.signature(Mixup).bind(*args, **kwargs)
        timm_args.apply_defaults()
        check_mixing(**{k: v for k, v in timm_args.arguments.items() if k in CHECKED})
        if mode not in TIMM_MODES + GMIX_MODES:
            raise ValueError(f'unknown mixup mode {mode!r}: choose one of {", ".join(TIMM_MODES + GMIX_MODES)}')
        if lam_mode not in TIMM_MODES:
            raise ValueError(f'unknown lam mode {lam_mode!r}: choose one of {", ".join(TIMM_MODES)}')
        if not 0.0 <= gmix_ratio <= 1.0:
            raise ValueError(f'gmix_ratio (gamma) must be in [0, 1], got {gmix_ratio}')
        if gmix_flag not in FLAG_CHOICES:
            raise ValueError(f'unknown gmix_flag {gmix_flag!r}: choose one of {", ".join(FLAG_CHOICES)}')
        self.gmix_mode = mode if mode in GMIX_MODES else None
        self.gmix_ratio = gmix_ratio
        self.gmix_flag = gmix_flag
        # timm's `mode` is the lam granularity; the G-Mix mode lives beside it.
        super().__init__(*args, mode=lam_mode if self.gmix_mode else mode, **kwargs)

    def _mix(self, x):
        if self.mode == 'elem':
            return self._mix_elem(x)
        if self.mode == 'pair':
            return self._mix_pair(x)
        return self._mix_batch(x)

    def mix(self, x: torch.Tensor, target: torch.Tensor) -> MixedBatch:
        """ Mix `x` in place (as timm does) and return the mixed batch with its pairing and lam. """
        if len(x) % 2:
            raise ValueError(f'mixing needs an even batch size, got {len(x)}')
        keep_clean = self.gmix_mode in ('bg', 'dg')
        clean = x.clone() if keep_clean else None
        lam = self._mix(x)
        soft_target = mixup_target(target, self.num_classes, lam, self.label_smoothing, self.multi_label)
        if isinstance(lam, float):  # a fill on the device, not a blocking host-to-device copy
            lam = torch.full((len(x),), lam, dtype=torch.float32, device=x.device)
        else:
            lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device).flatten().expand(len(x))
        clean_target = mixup_target(target, self.num_classes, 1.0, self.label_smoothing, self.multi_label) \
            if keep_clean else None
        return MixedBatch(x, soft_target, target, lam, clean, clean_target)

