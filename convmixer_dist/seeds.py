"""One rule for every seed derived from `--seed`: `derive_seed(seed, purpose, *ids)`.

A run's randomness (the example order, each example's crop and flip, the batch augmentations, the
validation hold-out, synthetic data) comes from stateless draws keyed by one integer per purpose,
derived here from the run seed, the purpose's name and optional integer ids (e.g. the input
pipeline). Keys of different purposes or ids are unrelated; the in-graph counter of a draw (an
example's stream position, an epoch, a step) is the second half of its stateless seed pair.

`DATA_ORDER` numbers this rule (it is recorded in the run identity): a run started when the keys
were still ad-hoc arithmetic of the seed (`DATA_ORDER` 1) reads a different example order after
resuming under this version (README "Reliability").
"""
from __future__ import annotations

import hashlib

from convmixer_dist.errors import UsageError

DATA_ORDER = 2
_KEY_LIMIT = 2 ** 31  # keys fit every seed argument (int32 tensors, Keras layer seeds)


def derive_seed(seed: int, purpose: str, *ids: int) -> int:
    """A key in [0, 2**31) for the draws of `purpose` (a fixed name) under run seed `seed` and the
    integer `ids`; the same arguments give the same key on every machine and version of Python."""
    text = "/".join([str(int(seed)), purpose, *(str(int(i)) for i in ids)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _KEY_LIMIT


def check_data_order(config, recorded: str) -> None:
    """A run started under another seed rule (an older version) resumes exactly at its step, but
    reads this version's example order from there (a note says so); with --validation_fraction it
    is refused: its validation examples would be trained on."""
    if recorded == str(DATA_ORDER):
        return
    if config.validation_fraction:
        raise UsageError(f"--model_dir={config.model_dir} was started by an older version whose "
                         f"--validation_fraction={config.validation_fraction} hold-out differs from this "
                         "version's: resuming would train on its validation examples; finish it with "
                         "that version, or pass --overwrite to move it aside and start anew")
    print(f"note: --model_dir={config.model_dir} was started by an older version: it resumes at its "
          "last checkpoint, but its example order, augmentation draws and synthetic examples follow "
          "this version's seeds from here on (README \"Reliability\")", flush=True)
