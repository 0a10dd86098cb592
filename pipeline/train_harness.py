"""The driver side of every training loop: ``fit`` is the one place a ``TorchTrainer`` is built.

A stage's driver validates its config once, before Ray starts, into a worker config (a dataclass the
workers read instead of re-checking) and calls ``fit(loop, config, spec)``; each worker runs
``loop(config)`` (the in-worker helpers are ``pipeline.train_worker``). A rerun with the same
``run_name`` and ``storage_path`` resumes from the run's newest reported checkpoint, and a killed
worker is replaced up to ``max_failures`` times inside the run, from that same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig,
                       TrainingFailedError)
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.cluster_fit import WorkerRequest, check_request, check_shared_paths
from pipeline.errors import StageError
from pipeline.ray_context import started_here

DEFAULT_MAX_FAILURES = 3  # a killed worker (OOM, a lost node) restarts from the newest checkpoint


@dataclass
class FitSpec:
    """How and where a training run executes (nothing here changes what is trained)."""

    what: str  # names the run in errors: "pretraining", "tokenizer training", "fine-tuning"
    run_name: str
    storage_path: str  # local path or URI shared by all nodes; checkpoints go to <storage_path>/<run_name>
    workers: int = 1  # Ray Train workers (DDP ranks); 0 runs the loop in this process, persisting nothing
    cpus_per_worker: float = 1.0
    use_gpu: bool = False  # one GPU per worker, NCCL; else gloo on CPU
    keep_checkpoints: int | None = 2
    max_failures: int = DEFAULT_MAX_FAILURES


def _run_worker(wrapped: dict[str, Any]) -> Any:
    return wrapped["loop"](wrapped["config"])


def fit(loop: Callable[[Any], Any], config: Any, spec: FitSpec) -> Result:
    """Run ``loop(config)`` on ``spec.workers`` Ray Train workers (Ray must be up); the ``Result``.

    A run that fails for good (more than ``max_failures`` worker failures, or an error in the loop)
    raises ``StageError`` naming the run, the error chained."""
    resources: dict[str, float] | None = None
    if spec.workers:
        resources = {"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
        # Ray Train would wait for an infeasible request forever, and on several nodes each worker
        # would checkpoint to its own disk: say so before asking.
        check_request(WorkerRequest(spec.workers, spec.cpus_per_worker, 1.0 if spec.use_gpu else 0.0,
                                    f"{spec.what} workers"), can_grow=not started_here())
        check_shared_paths([("storage", spec.storage_path)])
    trainer = TorchTrainer(
        _run_worker,
        train_loop_config={"loop": loop, "config": config},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=spec.storage_path,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),  # the stages' progress lines say what matters
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise StageError(f"{spec.what} failed (run {spec.run_name!r} under {spec.storage_path}): {e}") from e
    if result.error is not None:
        raise StageError(f"{spec.what} failed (run {spec.run_name!r} under {spec.storage_path}): "
                         f"{result.error}") from result.error
    return result


__all__ = ["DEFAULT_MAX_FAILURES", "FitSpec", "fit"]
