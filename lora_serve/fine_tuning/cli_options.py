"""``lora-serve``'s fine-tuning options (``--fine-tuning-dir`` and ``--ft-*``) and the config they make."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import OPTIMIZERS, FineTuningConfig

_DEFAULTS = FineTuningConfig(root=Path("."))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fine-tuning option group to ``parser``."""
    group = parser.add_argument_group("fine-tuning (OpenAI /v1/files and /v1/fine_tuning/jobs)")
    group.add_argument("--fine-tuning-dir", type=Path, metavar="DIR",
                       help="enable fine-tuning: uploaded files and jobs live under DIR; a server restarted on the "
                            "same DIR resumes its jobs from their checkpoints (default: disabled)")
    group.add_argument("--ft-max-file-mb", type=float, default=_DEFAULTS.max_file_bytes / 2**20,
                       help="largest training file in MiB (default: %(default)s)")
    group.add_argument("--ft-checkpoint-every", type=int, default=_DEFAULTS.checkpoint_every,
                       help="optimizer steps between checkpoints (default: %(default)s)")
    group.add_argument("--ft-learning-rate", type=float, default=_DEFAULTS.base_learning_rate,
                       help="learning rate at learning_rate_multiplier 1 (default: %(default)s)")
    group.add_argument("--ft-optimizer", choices=OPTIMIZERS, default=_DEFAULTS.optimizer,
                       help="fp8adamw: moeplug's FP8AdamW; adamw: torch's (default: %(default)s)")
    group.add_argument("--ft-slo-ttft", type=float, metavar="SECONDS",
                       help="time-to-first-token target: an idle step trains for at most this less the ITL target (or an "
                            "inference step)")
    group.add_argument("--ft-slo-itl", type=float, metavar="SECONDS",
                       help="inter-token latency target: a step with running requests trains only in the time "
                            "it leaves")


def config_from_args(args: argparse.Namespace) -> FineTuningConfig | None:
    """The ``FineTuningConfig`` the options ask for, or None when ``--fine-tuning-dir`` is not set."""
    if args.fine_tuning_dir is None:
        return None
    return FineTuningConfig(
        root=Path(args.fine_tuning_dir), max_file_bytes=int(args.ft_max_file_mb * 2**20),
        checkpoint_every=args.ft_checkpoint_every, base_learning_rate=args.ft_learning_rate,
        optimizer=args.ft_optimizer, slo_ttft_s=args.ft_slo_ttft, slo_itl_s=args.ft_slo_itl,
    )
