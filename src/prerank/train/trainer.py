"""The trainer: owns optimizer, device, threads, epochs, early stopping, checkpoints and logs.

Models stay plain modules (DESIGN.md habits); everything stateful about training lives here.
Per epoch it writes ``metrics.jsonl`` (one JSON object a line), ``last.pt`` (resumable: weights,
optimizer, epoch, best metric, history, RNG states) and ``best.pt`` (best validation metric), each
atomically, so an interrupted run resumes with ``resume=True`` from its last completed epoch.
Under ``torchrun`` it trains data-parallel over the ranks (:mod:`prerank.train.distributed`).
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from prerank.data.batch import Batch
from prerank.data.parquet import ParquetSplit, make_loader
from prerank.evaluate import metrics
from prerank.evaluate.listwise import listwise_metrics
from prerank.io import CheckpointError, atomic_write_text
from prerank.losses.listwise import to_lists
from prerank.losses.pointwise import PointwiseBCE
from prerank.models.base import ConfigError, PreRanker
from prerank.models.registry import build_model
from prerank.schema import STAGES, Schema
from prerank.train import distributed
from prerank.train.checkpoint import read_checkpoint, save_checkpoint
from prerank.train.config import METRICS, MIN_EPOCHS, POINTWISE_METRICS, TrainConfig, auto_schedule

Loss = Callable[[Tensor, Batch], Tensor]


#: The default loss: pointwise BCE on ``batch.label`` (row batches, or request batches minus their padding).
bce_loss = PointwiseBCE()


@dataclass
class TrainResult:
    name: str
    model: PreRanker
    checkpoint: Path
    best_metric: float
    epochs: int
    train_seconds: float
    samples_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the options it trained with, ``epochs`` and ``batch_size`` resolved (see :func:`resolve_schedule`)
    config: TrainConfig | None = None
    #: which of ``epochs`` / ``batch_size`` :func:`~prerank.train.config.auto_schedule` chose
    auto: tuple[str, ...] = ()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _better(metric: str, new: float, old: float | None, min_delta: float = 0.0) -> bool:
    if old is None or np.isnan(old):
        return not np.isnan(new)
    return new < old - min_delta if metric == "logloss" else new > old + min_delta


def resolve_schedule(config: TrainConfig, n_train_rows: int) -> tuple[TrainConfig, tuple[str, ...], str]:
    """``config`` with ``epochs`` / ``batch_size`` left at None chosen by :func:`auto_schedule` from the rows.

    Returns the resolved config, the names of the options chosen, and a log line (empty when none was). Request
    batching (listwise losses) does not use ``batch_size``; its epochs default to the floor of the rule.
    """
    auto = tuple(k for k in ("batch_size", "epochs") if getattr(config, k) is None)
    if not auto:
        return config, auto, ""
    batch, epochs = auto_schedule(n_train_rows)
    if config.batching == "requests":
        epochs = MIN_EPOCHS
    values = {"batch_size": batch, "epochs": epochs}
    resolved = replace(config, **{k: values[k] for k in auto})
    what = []
    if "batch_size" in auto and config.batching == "rows":
        what.append(f"batch {resolved.batch_size:,}")
    if "epochs" in auto:
        what.append(f"{resolved.epochs} epochs")
    return resolved, auto, f"auto: {', '.join(what) or 'schedule'} for {n_train_rows:,} training rows"


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy_seed": int(np.random.randint(0, 2**31 - 1))}


def progress_bar(enabled: bool) -> Progress:
    """The rich progress display of training loops (off when ``enabled`` is False)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def train_loader(
    data_dir: Path, config: TrainConfig, epoch: int, schema: Schema, ctx: distributed.Context = distributed.Context()
) -> Iterable[Batch]:
    """Training batches for one epoch: rows, or whole requests for listwise losses; this rank's shard of them."""
    shard = {"rank": ctx.rank, "world_size": ctx.world_size}
    if config.batching == "requests":
        from prerank.data.requests import make_request_loader

        return make_request_loader(
            data_dir,
            "train",
            distributed.local_share(config.requests_per_batch, ctx, "requests_per_batch"),
            shuffle=True,
            seed=config.seed + epoch,
            max_list_len=config.max_list_len,
            stages=config.stages,
            stage_mix=config.stage_mix,
            **shard,
        )
    assert config.batch_size is not None
    loader = make_loader(
        data_dir,
        "train",
        distributed.local_share(config.batch_size, ctx, "batch_size"),
        shuffle=True,
        seed=config.seed,
        num_workers=config.num_workers,
        schema=schema,
        buffer_rows=max(config.shuffle_buffer_rows // ctx.world_size, 1),
        **shard,
    )
    loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    return loader


def training_step(model: PreRanker, batch: Batch, loss_fn: Loss) -> tuple[Tensor, int]:
    """Loss of one batch (row batch, or request batch ``[R, N]`` with a mask) plus the model's auxiliary loss."""
    rows = batch.flat()
    user, item = model.encode_user(rows), model.encode_item(rows)
    logits = model.score(user, item, rows)
    # listwise losses see logits as [R, N] lists, in the layout of the request batch
    loss = loss_fn(logits if batch.mask is None else to_lists(logits, batch.mask), batch)
    aux = model.auxiliary_loss(rows, user, item)
    return (loss if aux is None else loss + aux), len(rows)


class TrainingStep(torch.nn.Module):
    """:func:`training_step` as a module's ``forward``, the call DistributedDataParallel needs to see."""

    def __init__(self, model: PreRanker, loss_fn: Loss):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> tuple[Tensor, int]:
        return training_step(self.model, batch, self.loss_fn)


def train_model(
    name: str,
    data_dir: str | Path,
    out_dir: str | Path,
    model_overrides: dict | None = None,
    config: TrainConfig = TrainConfig(),
    loss: Loss | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    init_weights: dict[str, Tensor] | None = None,
) -> TrainResult:
    """Train registered model ``name`` on ``data_dir`` (train split), early-stopping on the valid split.

    Returns the model with its best weights loaded. ``out_dir`` receives ``metrics.jsonl``,
    ``last.pt`` and ``best.pt``. ``init_weights`` (a full state dict of the model) starts a fresh run
    from given weights instead of the initialisation (fine-tuning, FSCD Eq. 6); a resumed run ignores it.
    Under ``torchrun`` every rank calls this with the same arguments (:mod:`prerank.train.distributed`).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ctx, device = distributed.setup(config.device)
    if not ctx.main:
        log = quiet
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    # subnormal floats (tiny gradients and Adam moments early in training) run ~100x slower on x86 CPUs: the
    # first epochs of a small-batch run took 40 s instead of 0.4 s on the synthetic data, with the same results
    torch.set_flush_denormal(True)
    seed_everything(config.seed)
    schema = Schema.load(data_dir)
    model = build_model(name, schema, model_overrides)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    model.to(device)
    # a loss with parameters (ARF's uncertainty weights) trains with the model; a copy per run, so runs never share it
    loss_fn = copy.deepcopy(loss).to(device) if isinstance(loss, torch.nn.Module) else (loss or bce_loss)
    optimizer = make_optimizer(model, config, loss_fn)
    if getattr(loss_fn, "requires_lists", False) and config.batching == "rows":
        log("this loss needs whole requests: training with batching=requests")
        config = replace(config, batching="requests")
    ParquetSplit(data_dir, "valid", schema)  # fail before training if the valid split is missing
    n_train = ParquetSplit(data_dir, "train", schema).num_rows
    config, auto, note = resolve_schedule(config, n_train)
    if note:
        log(f"{name} {note}")
    if config.metric not in POINTWISE_METRICS and not schema.has_stage:
        raise ConfigError(f"validation metric {config.metric!r} needs cascade data (a 'stage' column)")

    history: list[dict[str, Any]] = []
    best: float | None = None
    start_epoch, bad_epochs, steps = 0, 0, 0
    train_seconds, samples = 0.0, 0
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "metrics.jsonl"
    if resume and last_path.exists():
        state = read_checkpoint(last_path)
        if state["model_name"] != name or state["schema"] != schema.to_dict():
            raise CheckpointError(f"{last_path} was trained for another model or dataset; not resuming from it")
        t = state["trainer"]
        changed = _changed_options(t.get("config", {}), config)
        if changed:
            raise CheckpointError(f"{last_path} was trained with other options ({', '.join(changed)}); not resuming")
        model.load_state_dict(state["state_dict"])
        if isinstance(loss_fn, torch.nn.Module):
            loss_fn.load_state_dict(t["loss_state"])
        optimizer.load_state_dict(t["optimizer"])
        start_epoch, best, bad_epochs = t["epoch"] + 1, t["best"], t["bad_epochs"]
        history, steps = list(t["history"]), t["steps"]
        train_seconds, samples = t["train_seconds"], t["samples"]
        torch.set_rng_state(t["rng"]["torch"])
        np.random.seed(t["rng"]["numpy_seed"])
        log(f"resuming {name} from {last_path} at epoch {start_epoch + 1}")
    if ctx.enabled:  # same initial weights everywhere (DDP broadcasts rank 0's), but each rank its own dropout
        torch.manual_seed(config.seed + 1_000_003 * ctx.rank + start_epoch)
    step = distributed.wrap(TrainingStep(model, loss_fn), ctx)

    assert config.epochs is not None and config.batch_size is not None

    def finished() -> bool:
        return bad_epochs >= config.patience or bool(config.max_steps and steps >= config.max_steps)

    with progress_bar(config.progress and ctx.main) as progress:
        for epoch in range(start_epoch, config.epochs):
            if finished():
                break
            model.train()
            task = progress.add_task(
                f"{name} epoch {epoch + 1}/{config.epochs}", total=n_train // ctx.world_size, info=""
            )
            t0, cpu0, seen, running = time.perf_counter(), time.process_time(), 0, 0.0
            for batch in distributed.lockstep(train_loader(data_dir, config, epoch, schema, ctx), ctx):
                batch = batch.to(device)
                loss_value, n = step(batch)
                optimizer.zero_grad(set_to_none=True)
                loss_value.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                steps += 1
                seen += n
                lv = float(loss_value.detach())
                if not np.isfinite(lv):
                    raise FloatingPointError(f"{name}: training loss became {lv} at step {steps}; lower the lr")
                running = lv if seen == n else 0.98 * running + 0.02 * lv
                if steps % 10 == 0:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    progress.update(task, completed=seen, info=f"loss {running:.4f}  {rate:,.0f} samples/s")
                if config.max_steps and steps >= config.max_steps:
                    break
            seen = int(distributed.sum_float(seen, ctx))  # every rank's rows
            epoch_seconds = time.perf_counter() - t0
            # CPU seconds of every rank's process (all its threads): the cost a shared machine's load does not blur
            cpu_seconds = distributed.sum_float(time.process_time() - cpu0, ctx)
            train_seconds += epoch_seconds
            samples += seen
            progress.update(task, completed=n_train // ctx.world_size)
            valid = evaluate_split(model, data_dir, "valid", config.eval_batch_size, device=device, ctx=ctx)
            record = {
                "epoch": epoch + 1,
                "train_loss": running,
                "train_seconds": epoch_seconds,
                "samples_per_second": seen / max(epoch_seconds, 1e-9),
                "train_cpu_seconds": cpu_seconds,
                **{f"valid_{k}": v for k, v in valid.items()},
            }
            history.append(record)
            if (
                ctx.main
            ):  # rewritten from the history: a failed run keeps the earlier log, a resumed one has no duplicates
                atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in history))
            current = valid[config.metric]
            if _better(config.metric, current, best, config.min_delta):
                best, bad_epochs = current, 0
                if ctx.main:
                    save_checkpoint(best_path, name, model, {"epoch": epoch, "valid": valid})
            else:
                bad_epochs += 1
            log(
                f"{name} epoch {epoch + 1}: loss {running:.4f}, valid {config.metric} {current:.4f}"
                f" (best {float('nan') if best is None else best:.4f}), {record['samples_per_second']:,.0f} samples/s"
            )
            trainer_state = {
                "epoch": epoch,
                "best": best,
                "bad_epochs": bad_epochs,
                "history": history,
                "steps": steps,
                "train_seconds": train_seconds,
                "samples": samples,
                "optimizer": optimizer.state_dict(),
                "loss_state": loss_fn.state_dict() if isinstance(loss_fn, torch.nn.Module) else None,
                "rng": _rng_state(),
                "config": config.to_dict(),
            }
            if ctx.main:
                save_checkpoint(last_path, name, model, trainer_state)
            distributed.barrier(ctx)  # the others read these files only after rank 0 has written them

    if best_path.exists():
        model.load_state_dict(read_checkpoint(best_path)["state_dict"])
    model.eval()
    return TrainResult(
        name=name,
        model=model,
        checkpoint=best_path,
        best_metric=float("nan") if best is None else float(best),
        epochs=len(history),
        train_seconds=train_seconds,
        samples_per_second=samples / max(train_seconds, 1e-9),
        history=history,
        config=config,
        auto=auto,
    )


#: Options that may change when a run resumes (how long and how fast it runs, not what it learns).
RESUMABLE_CHANGES = frozenset(
    {"epochs", "patience", "min_delta", "max_steps", "threads", "num_workers", "progress", "eval_batch_size"}
)


def _changed_options(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    now = config.to_dict()
    return [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        for k in now
        if k in saved and k not in RESUMABLE_CHANGES and saved[k] != now[k]
    ]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, loss: object = None) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters, and of ``loss``'s when it is a module."""
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(loss, torch.nn.Module):
        params += [p for p in loss.parameters() if p.requires_grad]
    kind = config.optimizer
    if kind == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, momentum=0.9)


@torch.no_grad()
def predict(
    model: PreRanker,
    data_dir: str | Path,
    split: str,
    batch_size: int = 16384,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, np.ndarray]:
    """Logits for every row of a split (of its shard ``rank`` of ``world_size``), with the row's label, request_id,
    label_level, stage, teacher_logit. An empty shard (more ranks than row groups) gives only empty logits."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {"logits": [np.zeros(0, np.float32)]}
    loader = make_loader(data_dir, split, batch_size, schema=model.schema, rank=rank, world_size=world_size)
    for batch in loader:
        out["logits"].append(model(batch.to(device)).float().cpu().numpy())
        for key in ("label", "request_id", "label_level", "stage", "teacher_logit"):
            value = getattr(batch, key)
            if value is not None:
                out.setdefault(key, []).append(value.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_predictions(pred: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC, logloss and GAUC of predictions; on cascade data only impressions are scored (logged labels).

    On cascade data (``stage`` and ``request_id``) also Recall@10 and NDCG@10 over each request's full
    list, on clicks and on the hard label, so listwise objectives can stop early on a listwise metric.
    """
    keep = pred["stage"] == STAGES.index("impression") if "stage" in pred else slice(None)
    labels, logits = pred["label"][keep], pred["logits"][keep]
    result: dict[str, float] = {"n": float(len(labels))}
    result["auc"] = metrics.auc(labels, logits)
    result["logloss"] = metrics.logloss(labels, logits)
    if "request_id" in pred:
        g = metrics.gauc(labels, logits, pred["request_id"][keep])
        result["gauc"] = g["value"]
        result["gauc_requests_used"] = float(g["n_groups_used"])
        result["gauc_requests_skipped"] = float(g["n_groups_skipped"])
    else:
        result["gauc"] = float("nan")
    if "stage" in pred and "request_id" in pred:
        listwise = listwise_metrics(pred, ks=(10,), cascade_ns=())
        result.update({k: listwise[k] for k in METRICS if k in listwise})
    return result


def evaluate_split(
    model: PreRanker,
    data_dir: str | Path,
    split: str,
    batch_size: int = 16384,
    *,
    device: torch.device | str = "cpu",
    ctx: distributed.Context = distributed.Context(),
) -> dict[str, float]:
    """:func:`evaluate_predictions` on a split; with several ranks each scores its shard, rank 0 computes the
    metrics on all the predictions and every rank returns them."""
    pred = predict(model, data_dir, split, batch_size, device=device, rank=ctx.rank, world_size=ctx.world_size)
    shards = distributed.gather_to_main(pred, ctx)
    result = None
    if shards is not None:
        scored = [p for p in shards if len(p["logits"])] or shards[:1]
        result = evaluate_predictions({k: np.concatenate([p[k] for p in scored]) for k in scored[0]})
    return distributed.from_main(result, ctx)  # type: ignore[return-value]


def quiet(_: str) -> None:
    """The log of ranks other than 0."""
