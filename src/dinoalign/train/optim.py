"""Optimisers and learning-rate schedules of the recipes (``align.<recipe>`` params)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from dinoalign.recipes import Recipe
from dinoalign.train.config import RecipeTrainingConfig

# OneCycleLR's warm-up share when warmup_steps is 0 (PyTorch's default pct_start).
ONECYCLE_DEFAULT_PCT_START = 0.3


def build_optimizer(model: Recipe, cfg: RecipeTrainingConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the recipe's groups: weight decay on ≥2-D weights only (Adam's
    is the coupled L2 penalty, AdamW's the decoupled decay)."""
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return optimizer_class(
        model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1])
    )


class WarmupSchedule:
    """LR factor at optimiser step s: linear warmup (s+1)/W for s < W, then 1
    (``constant``) or ½(1 + cos(π·t)), t = (s − W)/(S − W) (``cosine``, down to 0 at the
    last of S steps). A callable object, not a closure, so that ``LambdaLR.state_dict``
    saves it (as plain numbers)."""

    def __init__(self, warmup_steps: int, total_steps: int, cosine: bool) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.cosine = cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: RecipeTrainingConfig, total_steps: int
) -> LRScheduler:
    """The ``cfg.schedule`` over ``total_steps`` optimiser steps (stepped once per step)."""
    if cfg.schedule == "onecycle":
        pct_start = (
            min(cfg.warmup_steps / total_steps, 1.0)
            if cfg.warmup_steps
            else ONECYCLE_DEFAULT_PCT_START
        )
        return OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start)
    schedule = WarmupSchedule(cfg.warmup_steps, total_steps, cosine=cfg.schedule == "cosine")
    return LambdaLR(optimizer, schedule)
