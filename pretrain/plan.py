"""``plan_run``: the pretraining driver's one validation of a config against its cache and tokenizer.

The resulting ``RunPlan`` is what every worker reads instead of re-checking (``pretrain.loop``); the
driver (``pretrain.train``) builds it before Ray starts, so a bad config is one line, not a dead run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.token_cache import check_cache, shard_urls
from pipeline.views import ViewStyle
from pretrain.config import PretrainConfig
from pretrain.flops import train_flops_per_image
from pretrain.masking import make_masker, num_masked_for


@dataclass
class RunPlan:
    """What the driver worked out before training; the workers read it instead of re-checking."""

    cfg: PretrainConfig
    urls: list[str]
    samples: int
    steps_per_epoch: int
    total_steps: int
    end_step: int
    warmup_steps: int
    per_worker_batch: int
    num_masked: int
    masker: Any  # pretrain.masking's BlockMasking | RandomMasking, built (and so validated) once, here
    grid: list[int]
    vocab_size: int | None
    tokenizer_id: str | None
    tok_input_size: int | None
    train_flops_per_image: int  # model FLOPs of one image's forward + backward (pretrain.flops)
    run_dir: str
    storage_path: str
    shard_sha256: dict[str, str] = field(default_factory=dict)  # url -> the manifest's sha256 (data.verify_shards)
    notes: list[str] = field(default_factory=list)  # what the driver should tell the user before training


def _describe_style(style: ViewStyle, random_views: bool) -> str:
    sides = f"{style.interp} (ViT) / {style.tok_interp} (tokenizer)"
    if not random_views:
        return sides
    return f"crop scale {style.scale[0]:g}..{style.scale[1]:g}, jitter {style.jitter:g}, {sides}"


def style_note(cfg: PretrainConfig, cache_views: int, cache_style: str) -> str | None:
    """With ``augment: views`` the cache's views are trained on, whatever ``data`` says of crops and
    resampling: a recipe that names another style (BEiT's, say) must not pass unnoticed. With one view
    per image only the resampling is drawn from the style."""
    d = cfg.data
    if d.augment != "views":
        return None
    ours, theirs = d.view_style(), ViewStyle.parse(cache_style)
    random_views = cache_views > 1
    if (ours == theirs) if random_views else ((ours.interp, ours.tok_interp) == (theirs.interp, theirs.tok_interp)):
        return None
    return (f"note: the cache's {cache_views} view(s) per image were drawn with {_describe_style(theirs, random_views)}; "
            f"data's {_describe_style(ours, random_views)} is used only by augment: random_resized_crop "
            f"(rebuild the cache with that style to train on it: `mimflow tokens build --help`)")


def load_tokenizer(path: str):
    from tokenizer.checkpoint import load_tokenizer as load  # the tokenizer stage, only for tokens-online

    return load(path)


def plan_run(cfg: PretrainConfig) -> RunPlan:
    """Check the config against the cache and tokenizer; raise ``ConfigError``/``CacheError``.

    The config's own bounds and cross-field rules were checked when it was loaded (``PretrainConfig``).
    """
    d = cfg.data
    if not d.tokens:
        raise ConfigError("data.tokens: the token cache directory (tokens/<tokenizer_id>) is required")
    if d.augment != "views" and cfg.target == "tokens":
        raise ConfigError("data.augment=random_resized_crop needs target tokens-online or pixels "
                          "(cached tokens exist only for the cached views)")
    if cfg.target == "tokens-online" and not d.tokenizer:
        raise ConfigError("target tokens-online needs data.tokenizer (the tokenizer runs in the training step)")
    tok = load_tokenizer(d.tokenizer) if d.tokenizer else None
    info, rows = check_cache(d.tokens, tok.tokenizer_id if tok is not None else None)
    grid = [d.img_size // cfg.model.patch] * 2
    vocab = None
    if cfg.target == "tokens":
        if info.grid != grid:
            raise ConfigError(
                f"the cache's token grid {info.grid} does not match the model's patch grid {grid} "
                f"(data.img_size {d.img_size} / model.patch {cfg.model.patch})")
        vocab = info.vocab_size
    elif cfg.target == "tokens-online":
        if list(tok.grid) != grid:
            raise ConfigError(f"the tokenizer's grid {list(tok.grid)} does not match the model's patch grid {grid}")
        vocab = int(tok.vocab_size)
    samples = sum(int(r["samples"]) for r in rows)
    steps_per_epoch = samples // d.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"data.batch_size {d.batch_size} is larger than the cache ({samples} samples)")
    total = cfg.steps if cfg.steps is not None else max(1, int(round(cfg.epochs * steps_per_epoch)))
    end = min(total, cfg.stop_at) if cfg.stop_at else total
    warmup = cfg.optim.warmup_steps or int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    try:
        num_masked = num_masked_for(tuple(grid), cfg.mask.ratio, cfg.mask.num_masked)
        masker = make_masker(cfg.mask.mode, tuple(grid), num_masked, min_block=cfg.mask.min_block,
                             max_block=cfg.mask.max_block, min_aspect=cfg.mask.min_aspect)
    except ValueError as e:  # a config mistake: one line, not a traceback
        raise ConfigError(str(e)) from None
    storage_path = storage.absolute(cfg.out)
    out_dim = 3 * cfg.model.patch**2 if cfg.target == "pixels" else vocab
    return RunPlan(
        cfg=cfg, urls=shard_urls(d.tokens, rows), samples=samples, steps_per_epoch=steps_per_epoch,
        total_steps=total, end_step=end, warmup_steps=min(warmup, total), per_worker_batch=d.batch_size // cfg.workers,
        num_masked=num_masked, masker=masker, grid=grid, vocab_size=vocab,
        tokenizer_id=tok.tokenizer_id if tok is not None else info.tokenizer_id,
        tok_input_size=int(tok.input_size) if tok is not None else None,
        train_flops_per_image=train_flops_per_image(cfg.model, d.img_size, out_dim, num_masked),
        run_dir=storage.join(storage_path, cfg.run_name), storage_path=storage_path,
        shard_sha256=dict(zip(shard_urls(d.tokens, rows), (r["sha256"] for r in rows))),
        notes=[n for n in [style_note(cfg, info.views, info.view_style)] if n],
    )


__all__ = ["RunPlan", "load_tokenizer", "plan_run", "style_note"]
