""" Per-example sharpness sensitivity and the flagged set of BG-Mix / DG-Mix.

s_i = l(f_{w+e}(xt_i), yt_i) - l(f_w(xt_i), yt_i), the loss increase of mixed example i under the SAM
perturbation (ESAM's sharpness-sensitive data selection, Du et al., ICLR 2022). The flagged set is
the ceil(gamma * B) examples with the largest (or, for the ablation, smallest) s_i, ties by index.
"""
import math

import torch


def num_flagged(batch_size: int, gamma: float) -> int:
    """ ceil(gamma * B), robust to float error (0.07 * 100 is 7.000000000000001: 7, not 8). """
    return math.ceil(round(gamma * batch_size, 9))


def flag_examples(sensitivity: torch.Tensor, gamma: float, largest: bool = True) -> torch.Tensor:
    """ Boolean mask of the ceil(gamma * B) largest (or smallest) sensitivities; ties go to the lower index. """
    order = torch.sort(sensitivity, descending=largest, stable=True).indices
    flagged = torch.zeros_like(sensitivity, dtype=torch.bool)
    flagged[order[:num_flagged(len(sensitivity), gamma)]] = True
    return flagged


class SensitivityMeter:
    """ Accumulates, over an epoch, what a researcher looks at: the flagged fraction, the mean sensitivity
    of flagged and unflagged examples, and how many flagged examples mix two different classes.
    `compute(accelerator)` sums over processes first; `state_dict` lets a mid-epoch checkpoint keep the sums. """

    def __init__(self):
        self.sums = None

    def update(self, sensitivity: torch.Tensor, flagged: torch.Tensor, mixes_two_classes: torch.Tensor):
        s = sensitivity.detach().float()
        f = flagged.float()
        row = torch.stack([
            torch.tensor(float(len(s)), device=s.device),
            f.sum(),
            (s * f).sum(),
            (s * (1 - f)).sum(),
            (flagged & mixes_two_classes).float().sum(),
        ])
        self.sums = row if self.sums is None else self.sums + row

    def state_dict(self):
        return {'sums': self.sums}

    def load_state_dict(self, state):
        self.sums = state['sums']

    def compute(self, accelerator=None) -> dict:
        if self.sums is None:
            return {}
        sums = accelerator.reduce(self.sums, reduction='sum') if accelerator is not None else self.sums
        total, flagged, s_flagged, s_unflagged, cross = sums.tolist()
        return {
            'flagged_frac': flagged / total,
            'sens_flagged': s_flagged / flagged if flagged else float('nan'),
            'sens_unflagged': s_unflagged / (total - flagged) if total > flagged else float('nan'),
            'flagged_two_class': int(cross),
        }
