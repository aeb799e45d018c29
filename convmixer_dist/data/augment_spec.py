"""`AugmentSpec`: what the batch augmentation applies, its fields named, bounded and defaulted as the
`Config` settings of the same name (declared once, in config.py)."""
from __future__ import annotations

import dataclasses

from convmixer_dist.config import check_setting, parse_crop_ratio, setting_field, setting_type
from convmixer_dist.errors import UsageError


def _as_setting(name: str):
    """A spec field with the default of the Config setting `name`."""
    return dataclasses.field(default=setting_field(name).default)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """What to apply to a training batch; the defaults apply nothing (`is_identity`)."""

    crop_scale: float = _as_setting("crop_scale")  # min area fraction of the random resized crop; 1 = off
    crop_ratio: tuple = (1.0, 1.0)  # aspect-ratio (w/h) range of the crop, log-uniform; (1, 1) = square
    randaug_n: int = _as_setting("randaug_n")        # RandAugment ops per image; 0 = off
    randaug_m: float = _as_setting("randaug_m")      # RandAugment magnitude, torchvision scale 0..30
    randaug_mstd: float = _as_setting("randaug_mstd")  # per-op magnitude noise N(m, mstd), clipped (timm)
    jitter: float = _as_setting("jitter")            # ColorJitter(brightness=contrast=saturation=jitter)
    erase_prob: float = _as_setting("erase_prob")    # RandomErasing probability per image
    erase_mode: str = _as_setting("erase_mode")      # const = mean colour, pixel = per-pixel N(mean, std)
    mixup_alpha: float = _as_setting("mixup_alpha")  # MixUp Beta(alpha, alpha); 0 = off
    cutmix_alpha: float = _as_setting("cutmix_alpha")  # CutMix Beta(alpha, alpha), alpha in (0, 1]; 0 = off
    seed: int = _as_setting("seed")
    hflip: bool = False       # random horizontal flip (the reference recipe flips)

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def crops(self) -> bool:
        return self.crop_scale < 1.0 or tuple(self.crop_ratio) != (1.0, 1.0)

    @property
    def is_identity(self) -> bool:
        return (not self.crops and self.randaug_n == 0 and self.jitter == 0
                and self.erase_prob == 0 and not self.hflip and not self.mixes)

    def validate(self) -> "AugmentSpec":
        """Raise UsageError naming the flag if a value breaks its setting's type, choices or bounds
        (those of `Config`); return self."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "crop_ratio":
                _check_crop_ratio(value)
            elif field.name != "hflip":
                kind = setting_type(setting_field(field.name))
                if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                    raise UsageError(f"--{field.name}={value!r}: expected an integer")
                check_setting(field.name, value)
        return self


def _check_crop_ratio(ratio) -> None:
    try:
        low, high = ratio
        parse_crop_ratio(f"{float(low)!r},{float(high)!r}")
    except (TypeError, ValueError):
        raise UsageError(f"--crop_ratio={ratio!r}: expected LOW,HIGH with 0 < LOW <= HIGH") from None
