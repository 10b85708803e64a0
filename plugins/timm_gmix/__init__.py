""" G-Mix, BG-Mix and DG-Mix for timm: Mixup with Sharpness-Aware Minimization.

Importing the package registers the `sam` / `gmix_sam` optimizer with timm's registry.
"""
from .mixup import GMIX_MODES, GMixup, MixedBatch
from .sam import SAM, find_sam, register_sam
from .sensitivity import SensitivityMeter, flag_examples, num_flagged
from .step import StepResult, cross_entropy_per_example, frozen_bn_stats, gmix_step

register_sam()

__version__ = '0.1.0'
