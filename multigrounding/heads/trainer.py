"""Training the mapping heads from the feature stores: one loop, read top to bottom.

The config is ``heads.config.TrainConfig``; the run folder (config, metrics, loss curve, lock)
is ``heads.run_folder.RunFolder``; checkpoints are ``heads.checkpoint.Checkpoint``. The batches
of an epoch depend only on (seed, epoch), so resuming — after Ctrl-C or kill -9 — ends with the
same weights as a run that never stopped. Validation is whatever the caller passes as
``validate(heads) -> accuracy`` (the command line passes the pointing game), so the heads know
nothing of evaluation.

Under torchrun (or any launcher that sets RANK, WORLD_SIZE, ...) the same loop runs in every
process on its share of each global batch (``heads/distributed.py``: the scores and the loss are
the whole batch's, the gradients one process's). Every process reads the checkpoint to resume;
only rank 0 writes — the run folder, metrics, checkpoints (the unwrapped heads: the same file for
any number of processes) and the loss curve — and only rank 0 reports progress. A step counts
one global batch, so a run resumes with another number of processes at the same batch size and
continues the same sequence. ``validate`` is called on every process (the pointing game shards
itself and sums its counts).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from multigrounding.devices import resolve_device
from multigrounding.errors import MultigroundingError
from multigrounding.heads.checkpoint import Checkpoint, capture_rng, restore_rng
from multigrounding.heads.config import TrainConfig, lr_at
from multigrounding.heads.data import PairedCaches, Prefetcher, epoch_pairs
from multigrounding.heads.distributed import (DEFAULT_TIMEOUT_S, Launch, StopRequests,
                                              batch_part, batch_scores, gather_columns,
                                              gather_text, is_collective_error, joined, unwrap,
                                              world, wrap)
from multigrounding.heads.inference import map_batch, to_device
from multigrounding.heads.level_selection import (level_aux_loss, level_calibration_loss,
                                                  level_cross_scores, level_guide_loss,
                                                  step_generator)
from multigrounding.heads.losses import (grounding_loss, npair_loss, phrase_matching_loss,
                                         triplet_hard_loss)
from multigrounding.heads.model import GroundingHeads, HeadsConfig
from multigrounding.heads.run_folder import RunFolder, absolute
from multigrounding.heads.scores import cross_scores

log = logging.getLogger(__name__)

Validator = Callable[[GroundingHeads], float]


class TrainingError(MultigroundingError, RuntimeError):
    """Training cannot start or go on (too few images, NaN loss, missing labels)."""


@dataclass
class TrainSummary:
    out: Path
    epochs: int
    steps: int
    final_loss: float
    best_accuracy: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)


def build_heads(config: TrainConfig, caches: PairedCaches) -> GroundingHeads:
    image_config, text_config = caches.image_config, caches.text_config
    heads_config = HeadsConfig(
        visual_channels=image_config.channels, text_layers=text_config.num_layers,
        text_dim=text_config.dim, sentence_vectors=text_config.num_sentence_vectors,
        dim=config.dim, visual_widths=config.visual_widths, levels=config.levels,
        linear_visual=config.linear_visual, linear_text=config.linear_text)
    torch.manual_seed(config.seed)
    return GroundingHeads(heads_config)


def train(config: TrainConfig, resume: bool = False,
          progress: Callable[[dict], None] | None = None,
          validate: Validator | None = None, *,
          dist_timeout_s: float = DEFAULT_TIMEOUT_S,
          storage_options: dict | None = None) -> TrainSummary:
    """Train (or resume) the run in ``config.out``; ``progress(metrics)`` after every step;
    ``validate(heads)`` after every epoch when the config names validation stores.

    In a process group (joined by the caller, or the launcher's environment, joined here with
    collectives that give up after ``dist_timeout_s``) this process trains its share of every
    global batch of ``config.batch_size`` pairs. ``storage_options`` reach stores named by URL;
    they are not part of the config (never saved)."""
    config.check()
    if config.val_manifest and validate is None:
        raise TrainingError("the config names validation stores but no validator was given")
    launch = Launch.from_env()
    batch_part(config.batch_size, 0, launch.world_size)       # refused before anyone starts
    with joined(launch, resolve_device(config.device), timeout_s=dist_timeout_s) as device:
        rank, size = world()
        folder = RunFolder(config.out)
        config = absolute(config)
        with folder.writing() if rank == 0 else contextlib.nullcontext():
            return _train(config, folder, resume, progress, validate, device,
                          batch_part(config.batch_size, rank, size), storage_options)


def _train(config: TrainConfig, folder: RunFolder, resume: bool, progress, validate, device,
           part: slice, storage_options: dict | None = None) -> TrainSummary:
    started = time.perf_counter()
    main = world()[0] == 0
    caches = PairedCaches(config.images, config.text, cache_bytes=int(config.read_cache_gb * 1e9),
                          storage_options=storage_options)
    if len(caches) < config.batch_size:
        raise TrainingError(f"{config.images}: {len(caches)} usable images, fewer than one batch "
                            f"of {config.batch_size}")
    if config.phrase_loss > 0 and not caches.has_labels:
        raise TrainingError(f"{config.text} has no phrase labels, which --phrase-loss needs: add them "
                            f"with `multigrounding datasets phrases MANIFEST -o LABELLED.jsonl`, then "
                            f"`multigrounding extract text LABELLED.jsonl` into a new text cache (and "
                            f"extract images from LABELLED.jsonl too)")
    random.seed(config.seed)
    np.random.seed(config.seed)
    heads = build_heads(config, caches).to(device)
    optimiser = torch.optim.Adam(heads.parameters(), lr=config.lr)
    epoch, step_in_epoch, step, best = 0, 0, 0, None
    if resume and folder.last.is_file():
        saved = Checkpoint.load(folder.last)
        saved.check_stores(caches.fingerprints)
        heads.load_state_dict(saved.model)
        optimiser.load_state_dict(saved.optimiser)
        epoch, step_in_epoch, step, best = saved.epoch, saved.step_in_epoch, saved.step, saved.best
        if main:
            folder.drop_metrics_after(step)  # steps a killed run logged after its last checkpoint
        restore_rng(saved.rng)
    elif main and resume:
        folder.drop_metrics_after(0)     # it stopped before its first checkpoint: start over
    elif main:
        folder.start(config)
    model = wrap(heads, device)          # DistributedDataParallel in a process group

    def save(path: Path, at_epoch: int, at_step_in_epoch: int) -> None:
        if not main:
            return
        with _writing(folder, path):
            Checkpoint(model=heads.state_dict(), optimiser=optimiser.state_dict(),
                       heads_config=dataclasses.asdict(heads.config), config=config.to_dict(),
                       fingerprints=caches.fingerprints, image_config=caches.image_config.to_json(),
                       text_config=caches.text_config.to_json(), epoch=at_epoch,
                       step_in_epoch=at_step_in_epoch, step=step, best=best,
                       rng=capture_rng()).save(path)

    history: list[dict] = []
    loss_value = float("nan")
    stops = StopRequests(device).install()       # restored in the finally below
    try:
        while epoch < config.epochs:
            for group in optimiser.param_groups:
                group["lr"] = lr_at(config, epoch)
            pairs = epoch_pairs(caches, config.batch_size, config.seed, epoch)
            prefetcher = Prefetcher(caches, pairs[step_in_epoch:], depth=config.prefetch, part=part)
            try:
                for batch, waited in prefetcher:
                    tick = time.perf_counter()
                    terms = _step(model, optimiser, batch, config, device, epoch,
                                  progress=(epoch + step_in_epoch / len(pairs)) / config.epochs,
                                  step=step)
                    loss_value = terms["loss"]
                    if not math.isfinite(loss_value):
                        raise TrainingError(
                            f"the loss became {loss_value} at epoch {epoch + 1}, step "
                            f"{step_in_epoch + 1}; " + (f"the last good checkpoint is {folder.last}"
                                                        if folder.last.is_file() else
                                                        "no checkpoint was written yet"))
                    step += 1
                    step_in_epoch += 1
                    metrics = {"epoch": epoch + 1, "step": step, **terms,
                               "lr": optimiser.param_groups[0]["lr"],
                               "step_seconds": time.perf_counter() - tick, "data_wait_seconds": waited,
                               "pairs_per_second": config.batch_size / (time.perf_counter() - tick + waited)}
                    if main:
                        with _writing(folder, folder.metrics):
                            folder.append_metrics(metrics)
                        if progress is not None:
                            progress(metrics)
                    if stops.requested():
                        raise KeyboardInterrupt
            finally:
                prefetcher.close()
            epoch, step_in_epoch = epoch + 1, 0
            record = {"epoch": epoch, "loss": loss_value}
            if config.val_manifest:
                accuracy = validate(heads)
                heads.train()
                record["val_accuracy"] = accuracy
                if main:
                    folder.append_metrics({"epoch": epoch, "step": step, "val_accuracy": accuracy})
                if best is None or accuracy > best:
                    best = accuracy
                    save(folder.best, epoch, 0)
            history.append(record)
            save(folder.last, epoch, 0)
            if stops.requested():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        save(folder.last, epoch, step_in_epoch)
        if main:
            log.warning("interrupted: saved %s at epoch %d step %d; --resume continues",
                        folder.last, epoch + 1, step_in_epoch)
        raise
    except Exception as exc:
        if not is_collective_error(exc):
            raise
        # a collective fails before the optimiser steps: the weights are those of `step` steps
        save(folder.last, epoch, step_in_epoch)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        kept = (f"saved {folder.last} at epoch {epoch + 1} step {step_in_epoch}" if main else
                f"rank 0 keeps {folder.last}")
        raise TrainingError(f"rank {world()[0]}: lost contact with the other training processes "
                            f"({reason}): one of them stopped, was killed or hangs (its own "
                            f"message says why); {kept}; `multigrounding train --resume "
                            f"{folder.path}` continues") from None
    finally:
        stops.restore()
        if main:
            try:
                folder.plot()
            except OSError as exc:   # the curve is a convenience: never hide the real outcome
                log.warning("could not draw %s: %s", folder.path / "loss.png", exc)
    return TrainSummary(folder.path, epoch, step, loss_value, best, time.perf_counter() - started,
                        history)


@contextlib.contextmanager
def _writing(folder: RunFolder, path: Path):
    """A failed write of the run (disk full, read-only) stops training with a message saying
    what is kept and how to go on; the atomic writes leave the previous file intact."""
    try:
        yield
    except OSError as exc:
        kept = (f"{folder.last} holds the last checkpoint" if folder.last.is_file()
                else "no checkpoint was written yet")
        raise TrainingError(f"cannot write {path}: {exc.strerror or exc}; {kept}. Free space (or "
                            f"fix the folder), then `multigrounding train --resume {folder.path}` "
                            f"continues") from None


def _step(heads: GroundingHeads, optimiser, batch, config: TrainConfig, device, epoch: int = 0,
          progress: float | None = None, step: int = 0) -> dict:
    """One optimiser step on one global batch; ``progress`` (training done, in [0, 1): the soft
    level selection's schedule; None: ``epoch / epochs``) and ``step`` (the global step: level
    dropout's draws) matter only to the level-selection recipes (heads/level_selection.py)."""
    heads.train()
    device = torch.device(device)
    selection = config.level_selection_recipe()
    # bf16 autocast on a GPU; the scores keep their normalisations and log-sum-exp in float32.
    # In a process group heads is DistributedDataParallel (so one forward call) holding this
    # process's rows; gather_text and batch_scores make the scores the whole batch's
    # (heads/distributed.py); without one they are the identity and cross_scores.
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        visual, words, sentence = map_batch(heads, batch, device)
        words, mask, sentence = gather_text(words, to_device(batch.mask, device), sentence)
        if selection.is_paper:
            r_w, r_s = batch_scores(words, mask, sentence, visual, gamma1=config.gamma1,
                                    heatmap=config.heatmap)
        else:
            levels = level_cross_scores(
                words, mask, sentence, visual, selection, gamma1=config.gamma1,
                heatmap=config.heatmap, generator=step_generator(config.seed, step),
                progress=epoch / config.epochs if progress is None else progress)
            r_w, r_s = levels.word, levels.sentence
    terms = training_loss(r_w, r_s, unwrap(heads).l2_penalty(), config, epoch)
    use = dict(use_words=config.loss_terms in ("both", "word"),
               use_sentence=config.loss_terms in ("both", "sentence"))
    if "aux" in selection.parts:
        terms["level_aux"] = level_aux_loss(levels, gamma2=config.gamma2, **use)
        terms["loss"] = terms["loss"] + selection.aux_weight * terms["level_aux"]
    if "calibrate" in selection.parts:
        terms["level_calibration"] = level_calibration_loss(levels, **use)
        terms["loss"] = terms["loss"] + selection.calibration * terms["level_calibration"]
    if "guide" in selection.parts:
        terms["level_guide"] = level_guide_loss(levels, gamma2=config.gamma2, **use)
        terms["loss"] = terms["loss"] + selection.guide * terms["level_guide"]
    if config.phrase_loss > 0:
        terms["phrase"] = phrase_term(words, visual, batch.labels, config, device)
        terms["loss"] = terms["loss"] + config.phrase_loss * terms["phrase"]
    optimiser.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimiser.step()
    with torch.no_grad():
        scores = trained_scores(r_w, r_s, config.loss_terms)
        target = torch.arange(len(scores), device=scores.device)
        accuracy = float((scores.argmax(1) == target).float().mean())
    return {**{k: float(v.detach()) for k, v in terms.items() if v is not None},
            "batch_retrieval_accuracy": accuracy}


def phrase_term(words, visual, labels, config: TrainConfig, device):
    """The phrase-level loss of a batch (losses.phrase_matching_loss): each label's words,
    gathered from its caption's mapped words, scored against every batch image."""
    caption = torch.from_numpy(labels.caption).to(device)
    positions = torch.from_numpy(labels.positions).to(device)
    label_words = words[caption[:, None], positions]                      # [Q, P, D]
    scores, _ = cross_scores(label_words, torch.from_numpy(labels.mask).to(device), None, visual,
                             gamma1=config.gamma1, heatmap=config.heatmap)
    scores = gather_columns(scores)           # against every process's images: [Q, B]
    return phrase_matching_loss(scores, caption, torch.from_numpy(labels.negative).to(device),
                                config.gamma2)


def trained_scores(r_w, r_s, loss_terms: str):
    """The caption–image score the run trains and retrieves with."""
    return r_w + r_s if loss_terms == "both" else (r_w if loss_terms == "word" else r_s)


def training_loss(r_w, r_s, penalty, config: TrainConfig, epoch: int = 0) -> dict:
    """The run's objective (``config.loss``) and its parts, for the step and the metrics log."""
    if config.loss == "multigrounding":
        return grounding_loss(r_w, r_s, penalty, gamma2=config.gamma2,
                              weight_decay=config.weight_decay,
                              use_words=config.loss_terms in ("both", "word"),
                              use_sentence=config.loss_terms in ("both", "sentence"))
    scores = trained_scores(r_w, r_s, config.loss_terms)
    if config.loss == "npair":
        value = npair_loss(scores, config.npair_scale)
    else:
        value = triplet_hard_loss(scores, config.margin, hardest=epoch >= config.triplet_warmup)
    l2 = config.weight_decay * penalty
    return {"loss": value + l2, "retrieval": value, "l2": l2}
