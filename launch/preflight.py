"""Checks of the job's files before any rank starts, so a bad path fails in seconds with one line.

Outputs (``logging.run_dir``, ``logging.tensorboard_dir``, ``checkpoint.dir``, ``--summary``) must be
writable: ``moetrain validate`` checks without creating anything (the nearest existing ancestor is a
writable directory); the launcher creates the directories and writes a probe file in each, which is what
catches read-only mounts, full disks and a file standing where a directory should be. Inputs
(``data.path``, ``checkpoint.resume=PATH``) must exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from moetrain.config import ConfigError, JobConfig

__all__ = ["check_paths", "check_network"]


def _why_not_writable(directory: Path, create: bool) -> str | None:
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".moetrain-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"is not writable ({exc.__class__.__name__}: {exc.strerror or exc})"
        return None
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            return "has no existing parent directory"
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"is not writable ({existing} does not allow writing)"
    return None


def check_paths(cfg: JobConfig, summary_path: str | None = None, *, create: bool = True) -> None:
    """Raise a one-line user error for the first output that cannot be written or input that is missing."""
    outputs = [("logging.run_dir", cfg.logging.run_dir), ("logging.tensorboard_dir", cfg.logging.tensorboard_dir),
               ("checkpoint.dir", cfg.checkpoint.dir)]
    if summary_path:
        outputs.append(("--summary", str(Path(summary_path).parent)))
    for key, value in outputs:
        if value:
            why = _why_not_writable(Path(value), create)
            if why:
                raise ConfigError(key, f"{value} {why}")
    d = cfg.data
    if d.path and d.source in ("text", "tokens"):
        p = Path(d.path)
        if not p.exists() or (d.source == "tokens" and not p.is_file()):
            from moetrain.launch.data import DataError  # imported on failure only: validate stays torch-free

            raise DataError(f"data.path: {d.path} " + ("is not a token file" if p.exists() else "does not exist"))
    if d.source == "tokens":
        from moetrain.launch.data import check_token_file

        check_token_file(d.path, d.token_dtype, cfg.model.vocab_size)
    if d.source == "indexed":
        from moetrain.launch.indexed import IndexedTokens

        prefixes = [(f"data.blend[{i}]", p) for i, (_, p) in enumerate(d.blend)] if d.blend else [("data.path", d.path)]
        if d.valid is not None:
            prefixes += [("data.valid", d.valid)] if isinstance(d.valid, str) else \
                [(f"data.valid[{i}]", p) for i, (_, p) in enumerate(d.valid)]
        for key, prefix in prefixes:
            data = IndexedTokens(prefix)  # header and sizes checked; then every id against the vocabulary
            top = int(data.tokens.max()) if data.tokens.size else 0
            if top >= cfg.model.vocab_size:
                from moetrain.launch.data import DataError

                raise DataError(f"{key}: {prefix} holds token id {top} >= model.vocab_size={cfg.model.vocab_size} "
                                "(prepared with another tokenizer?)")
    if cfg.logging.wandb is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb", "the wandb package is not installed (pip install wandb)")
    if d.tokenizer:
        from moetrain.launch.tokenizer import load_tokenizer

        load_tokenizer(d.tokenizer, vocab_size=cfg.model.vocab_size)
    init = cfg.checkpoint.init_from
    if init and not Path(init).is_dir():
        from moetrain.dist.checkpoint import CheckpointError

        raise CheckpointError(f"checkpoint.init_from: {init} is not a directory (an HF model directory or a "
                              "moetrain checkpoint)")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        from moetrain.dist.checkpoint import CheckpointError

        raise CheckpointError(f"checkpoint.resume: {resume} is not a checkpoint directory")


def check_network(cfg: JobConfig) -> None:
    """``network.isolation=netns`` on a machine that cannot make namespaces: one line saying why, before
    anything is written."""
    if cfg.network.isolation == "netns":
        from moetrain.dist.netns import NetnsError, unavailable_reason

        why = unavailable_reason()
        if why:
            raise NetnsError(why)
