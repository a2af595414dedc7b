"""DINO self-supervised pretraining of the demo backbone (student + EMA teacher, DINO head,
centering and sharpening, multi-crop), written after facebookresearch/dino.

:mod:`.config` is import-light; :mod:`.dino` holds the head, loss, schedules and
augmentation, :mod:`.train` the loop and the timm-format checkpoint.
"""

from dinoalign.pretrain.config import PretrainConfig

__all__ = ["PretrainConfig"]
