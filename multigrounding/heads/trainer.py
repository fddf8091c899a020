"""Training the mapping heads from the feature stores: one flat config, one loop.

Read top to bottom: the config, the learning-rate schedule ``lr_at``, the run directory
(config, checkpoints, metrics, loss curve), then ``train``. A checkpoint holds the model,
optimiser, epoch, step and the config, and is written atomically; the batches of an epoch depend
only on (seed, epoch), so resuming — after Ctrl-C or kill -9 — ends with the same weights as a
run that never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from multigrounding import __version__
from multigrounding.atomic import atomic_open
from multigrounding.errors import MultigroundingError
from multigrounding.heads.data import PairedCaches, Prefetcher, epoch_pairs
from multigrounding.heads.distributed import batch_scores, gather_columns, gather_text, unwrap
from multigrounding.heads.losses import (grounding_loss, npair_loss, phrase_matching_loss,
                                         triplet_hard_loss)
from multigrounding.heads.model import GroundingHeads, HeadsConfig
from multigrounding.heads.scores import cross_scores

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LAST, BEST = "last.pt", "best.pt"
METRICS_FILE = "metrics.jsonl"
LOSSES = ("multigrounding", "npair", "triplet-hard")


class TrainingError(MultigroundingError, RuntimeError):
    """Training cannot start or go on (bad config, NaN loss, missing run)."""


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json in the run directory."""

    images: str
    text: str
    out: str
    val_images: str | None = None
    val_text: str | None = None
    val_manifest: str | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    lr_milestones: list[int] | None = None   # epochs (1-based) at whose start lr halves; default 10, 15 of 20, scaled
    lr_factor: float = 0.5
    dim: int = 1024
    visual_widths: list[int] | None = None
    levels: list[int] | None = None
    linear_visual: bool = False
    linear_text: bool = False
    heatmap: str = "relu"
    loss_terms: str = "both"                 # both | word | sentence: which scores are trained
    loss: str = "multigrounding"             # multigrounding | npair | triplet-hard
    margin: float = 0.2                      # triplet-hard
    triplet_warmup: int = 2                  # triplet-hard: epochs summing every negative first
    npair_scale: float = 10.0                # npair: the scale of the cosine scores
    phrase_loss: float = 0.0                 # weight of the phrase-level term (0: off)
    gamma1: float = 5.0
    gamma2: float = 10.0
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    prefetch: int = 3
    read_cache_gb: float = 2.0               # decoded visual chunks kept in memory across epochs
    log_every: int = 10

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"{source}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
        return cls(**data)

    def milestones(self) -> list[int]:
        if self.lr_milestones is not None:
            return list(self.lr_milestones)
        return [max(1, round(self.epochs * 10 / 20)), max(1, round(self.epochs * 15 / 20))]

    def check(self) -> None:
        if self.heatmap not in ("relu", "softmax"):
            raise TrainingError(f"heatmap must be relu or softmax, not {self.heatmap!r}")
        if self.loss_terms not in ("both", "word", "sentence"):
            raise TrainingError(f"loss_terms must be both, word or sentence, not {self.loss_terms!r}")
        if self.loss not in LOSSES:
            raise TrainingError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if not self.margin > 0 or not self.npair_scale > 0:
            raise TrainingError("margin and npair_scale must be positive")
        if not self.phrase_loss >= 0:
            raise TrainingError(f"phrase_loss is a weight >= 0, not {self.phrase_loss!r}")
        if (self.val_manifest is None) != (self.val_images is None) or (self.val_images is None) != (self.val_text is None):
            raise TrainingError("validation needs all three of --val-images, --val-text and --val-manifest")
        if self.epochs < 1 or self.batch_size < 2:
            raise TrainingError("needs at least 1 epoch and a batch of at least 2 pairs")


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch``: halved at the start of each milestone epoch."""
    passed = sum(1 for milestone in config.milestones() if epoch + 1 >= milestone)
    return config.lr * config.lr_factor ** passed


@dataclass
class TrainSummary:
    out: Path
    epochs: int
    steps: int
    final_loss: float
    best_accuracy: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def build_heads(config: TrainConfig, caches: PairedCaches) -> GroundingHeads:
    image_config, text_config = caches.image_config, caches.text_config
    heads_config = HeadsConfig(
        visual_channels=[level["channels"] for level in image_config["levels"]],
        text_layers=int(text_config["num_layers"]), text_dim=int(text_config["dim"]),
        sentence_vectors=int(text_config["num_sentence_vectors"]), dim=config.dim,
        visual_widths=config.visual_widths, levels=config.levels,
        linear_visual=config.linear_visual, linear_text=config.linear_text)
    torch.manual_seed(config.seed)
    return GroundingHeads(heads_config)


def train(config: TrainConfig, resume: bool = False,
          progress: Callable[[dict], None] | None = None) -> TrainSummary:
    """Train (or resume) the run in ``config.out``; ``progress(metrics)`` after every step."""
    config.check()
    out = Path(config.out)
    started = time.perf_counter()
    caches = PairedCaches(config.images, config.text, cache_bytes=int(config.read_cache_gb * 1e9))
    if len(caches) < config.batch_size:
        raise TrainingError(f"{config.images}: {len(caches)} usable images, fewer than one batch "
                            f"of {config.batch_size}")
    if config.phrase_loss > 0 and not caches.has_labels:
        raise TrainingError(f"{config.text} has no phrase labels, which --phrase-loss needs: add them "
                            f"with `multigrounding datasets phrases MANIFEST -o LABELLED.jsonl`, then "
                            f"`multigrounding extract text LABELLED.jsonl` into a new text cache (and "
                            f"extract images from LABELLED.jsonl too)")
    device = resolve_device(config.device)
    random.seed(config.seed)
    np.random.seed(config.seed)
    heads = build_heads(config, caches).to(device)
    optimiser = torch.optim.Adam(heads.parameters(), lr=config.lr)
    epoch, step_in_epoch, step, best = 0, 0, 0, None
    if resume:
        state = load_checkpoint(out / LAST, caches)
        heads.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        epoch, step_in_epoch, step, best = state["epoch"], state["step_in_epoch"], state["step"], state["best"]
        _drop_metrics_after(out, step)  # steps a killed run logged after its last checkpoint
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
    else:
        _start_run_dir(out, config)
    history: list[dict] = []
    loss_value = float("nan")
    try:
        while epoch < config.epochs:
            for group in optimiser.param_groups:
                group["lr"] = lr_at(config, epoch)
            pairs = epoch_pairs(caches, config.batch_size, config.seed, epoch)
            prefetcher = Prefetcher(caches, pairs[step_in_epoch:], depth=config.prefetch)
            try:
                for batch, waited in prefetcher:
                    tick = time.perf_counter()
                    terms = _step(heads, optimiser, batch, config, device, epoch)
                    loss_value = terms["loss"]
                    if not math.isfinite(loss_value):
                        raise TrainingError(f"the loss became {loss_value} at epoch {epoch + 1}, step "
                                            f"{step_in_epoch + 1}; the last good checkpoint is {out / LAST}")
                    step += 1
                    step_in_epoch += 1
                    metrics = {"epoch": epoch + 1, "step": step, **terms, "lr": optimiser.param_groups[0]["lr"],
                               "step_seconds": time.perf_counter() - tick, "data_wait_seconds": waited,
                               "pairs_per_second": config.batch_size / (time.perf_counter() - tick + waited)}
                    _append_metrics(out, metrics)
                    if progress is not None:
                        progress(metrics)
            finally:
                prefetcher.close()
            epoch, step_in_epoch = epoch + 1, 0
            record = {"epoch": epoch, "loss": loss_value}
            if config.val_manifest:
                accuracy = validate(heads, config, device)
                record["val_accuracy"] = accuracy
                _append_metrics(out, {"epoch": epoch, "step": step, "val_accuracy": accuracy})
                if best is None or accuracy > best:
                    best = accuracy
                    save_checkpoint(out / BEST, heads, optimiser, config, caches, epoch, 0, step, best)
            history.append(record)
            save_checkpoint(out / LAST, heads, optimiser, config, caches, epoch, 0, step, best)
    except KeyboardInterrupt:
        save_checkpoint(out / LAST, heads, optimiser, config, caches, epoch, step_in_epoch, step, best)
        log.warning("interrupted: saved %s at epoch %d step %d; --resume continues", out / LAST,
                    epoch + 1, step_in_epoch)
        raise
    finally:
        plot_losses(out)
    return TrainSummary(out, epoch, step, loss_value, best, time.perf_counter() - started, history)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _step(heads: GroundingHeads, optimiser, batch, config: TrainConfig, device, epoch: int = 0) -> dict:
    heads.train()
    device = torch.device(device)
    # bf16 autocast on a GPU; the scores keep their normalisations and log-sum-exp in float32
    # heads may be DistributedDataParallel (one forward call) holding this process's part of the
    # batch; the scores are the whole batch's either way (heads/distributed.py)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        visual, words, sentence = heads([_to_device(level, device).float() for level in batch.visual],
                                        _to_device(batch.tokens, device).float(),
                                        _to_device(batch.sentence, device).float())
        words, mask, sentence = gather_text(words, _to_device(batch.mask, device), sentence)
        r_w, r_s = batch_scores(words, mask, sentence, visual, gamma1=config.gamma1,
                                heatmap=config.heatmap)
    terms = training_loss(r_w, r_s, unwrap(heads).l2_penalty(), config, epoch)
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


def validate(heads: GroundingHeads, config: TrainConfig, device) -> float:
    from multigrounding.evaluation.grounding import evaluate_pointing

    result = evaluate_pointing(heads, config.val_images, config.val_text, config.val_manifest,
                               device=str(device), batch_size=config.batch_size, heatmap=config.heatmap)
    return result.accuracy


# ---------------------------------------------------------------------------- run directory

def _start_run_dir(out: Path, config: TrainConfig) -> None:
    if (out / LAST).exists():
        raise TrainingError(f"{out} already holds a run; --resume {out} continues it, or choose "
                            "another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)
    with atomic_open(out / CONFIG_FILE, "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(config), handle, indent=2)


def load_run_config(out: str | Path) -> TrainConfig:
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise TrainingError(f"{out}: not a run directory (no {CONFIG_FILE})")
    return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))


def save_checkpoint(path: Path, heads, optimiser, config: TrainConfig, caches: PairedCaches,
                    epoch: int, step_in_epoch: int, step: int, best: float | None) -> None:
    """Everything to resume or to use the heads, written atomically."""
    state = {"model": heads.state_dict(), "optimiser": optimiser.state_dict(),
             "heads_config": dataclasses.asdict(heads.config), "config": dataclasses.asdict(config),
             "fingerprints": caches.fingerprints, "epoch": epoch, "step_in_epoch": step_in_epoch,
             "step": step, "best": best, "version": __version__,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                     "python": random.getstate()},
             "image_config": caches.image_config, "text_config": caches.text_config}
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path, caches: PairedCaches | None = None) -> dict:
    if not path.is_file():
        raise TrainingError(f"{path}: no checkpoint to resume from")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if caches is not None and state["fingerprints"] != caches.fingerprints:
        raise TrainingError(f"{path} was trained on other feature stores (fingerprints "
                            f"{state['fingerprints']} vs {caches.fingerprints})")
    return state


def continues_run(config: TrainConfig) -> bool:
    """True when ``config.out`` holds a run of exactly this config (resume it), False when it
    holds none; a run of another config there is an error (never trained over)."""
    out = Path(config.out)
    if not (out / LAST).is_file():
        return False
    if dataclasses.asdict(load_run_config(out)) != dataclasses.asdict(config):
        raise TrainingError(f"{out} holds a run of another config; delete it or choose another folder")
    return True


def checkpoint_path(run: str | Path, checkpoint: str = "best") -> Path:
    """``best`` (falling back to ``last`` when the run had no validation), ``last``, or a path."""
    run = Path(run)
    if checkpoint not in (BEST[:-3], LAST[:-3]):
        path = Path(checkpoint)
        if not path.is_file():
            raise TrainingError(f"{path}: checkpoint not found")
        return path
    if not (run / CONFIG_FILE).is_file():
        raise TrainingError(f"{run}: not a run directory (no {CONFIG_FILE})")
    path = run / f"{checkpoint}.pt"
    if checkpoint == "best" and not path.is_file():
        path = run / LAST
    if not path.is_file():
        raise TrainingError(f"{run}: no checkpoint yet ({path.name}); train it first, or "
                            f"`multigrounding train --resume {run}` to finish it")
    return path


def load_heads(run: str | Path, checkpoint: str = "best", device: str = "cpu"
               ) -> tuple[GroundingHeads, dict]:
    """The trained heads of a run in eval mode, and the checkpoint's other contents."""
    path = checkpoint_path(run, checkpoint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        heads = GroundingHeads(HeadsConfig(**state["heads_config"]))
        heads.load_state_dict(state["model"])
    except (KeyError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise TrainingError(f"{path}: not a multigrounding checkpoint ({type(err).__name__}: {err})") from None
    state["path"] = str(path)
    return heads.to(device).eval(), state


def _drop_metrics_after(out: Path, step: int) -> None:
    path = out / METRICS_FILE
    if path.is_file():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        with atomic_open(path, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in kept))


def _append_metrics(out: Path, metrics: dict) -> None:
    with open(out / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(metrics) + "\n")


def plot_losses(out: Path) -> None:
    """loss.png: the training loss per step and, when present, validation accuracy per epoch."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not steps:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(*zip(*steps), label="training loss", color="tab:blue")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    validation = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    if validation:
        other = axis.twinx()
        other.plot(*zip(*validation), "o-", color="tab:orange", label="val pointing accuracy")
        other.set_ylabel("pointing accuracy")
    figure.tight_layout()
    with atomic_open(out / "loss.png", "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)
