"""What a data-parallel run reserves: its workers, each worker's CPUs and GPU share.

One model for every runner: `trainables.run` and `fit` size a run on the cluster they find, a
study (study/config.py adds the trial's own settings) sizes each trial so that its trials fit
side by side. `sized` is the one rule for the CPUs a worker reserves when none is given.
"""

from dataclasses import dataclass

from trainables.errors import TrainConfigError
from trainables.options import Declared, option

MIN_WORKER_CPUS = 0.05  # below this Ray's scheduling granularity starts to matter


@dataclass(frozen=True)
class Resources(Declared):
    error = TrainConfigError

    num_workers: int = option(1, "data-parallel workers per run", low=1)
    use_gpu: bool = option(False, "one GPU per worker (NCCL)")
    gpus_per_worker: float | None = option(
        None, "each worker's share of a GPU: 1 (the default with use_gpu), or 1/n to pack n one-worker runs on a "
        "GPU (0.25: four at once); setting it implies use_gpu", kind=float, low=0, high=1, low_open=True)
    cpus_per_worker: float | None = option(
        None, "CPUs each worker reserves (default: sized to the cluster, at most 1)", kind=float, low=0, low_open=True)

    def check(self):
        share = self.gpus_per_worker
        if share is None:
            return
        if abs(1 / share - round(1 / share)) > 1e-6 * (1 / share):
            raise self.error(f"{self.where}gpus_per_worker must divide a GPU evenly (1, 0.5, 0.25, 0.2, ... 1/n), "
                             f"got {share}")
        if share < 1 and self.num_workers > 1:
            # Ray would place several workers of one run on the same GPU, and their NCCL process
            # group refuses two ranks on one device: pack one-worker runs instead.
            raise self.error(f"{self.where}gpus_per_worker {share} with num_workers {self.num_workers}: the workers "
                             "of one trial would share a GPU, which NCCL refuses; pack one-worker trials "
                             "(num_workers: 1), or give each worker a whole GPU")

    @property
    def gpus(self) -> float:
        """The GPU share each worker reserves (0 on CPU)."""
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1.0 if self.use_gpu else 0.0

    def sized(self, cluster_cpus: float, runs_at_once: int = 1, driver_cpus: float = 0.0,
              keep_free: float = 1.0) -> "Resources":
        """These resources with the CPUs of each worker filled in (unless given): the cluster's
        CPUs, less `keep_free` for Ray Data's tasks, shared by `runs_at_once` runs, less each
        run's `driver_cpus`, split over the workers; at most one CPU a worker."""
        if self.cpus_per_worker is not None:
            cpus = self.cpus_per_worker
        else:
            available = max(cluster_cpus - keep_free, 0.5) if keep_free else cluster_cpus
            per_run = available / runs_at_once - driver_cpus
            cpus = round(min(1.0, max(per_run / self.num_workers, MIN_WORKER_CPUS)), 3)
        return Resources(num_workers=self.num_workers, use_gpu=self.gpus > 0,
                         gpus_per_worker=self.gpus if self.gpus else None, cpus_per_worker=cpus)

    @property
    def per_worker(self) -> dict:
        """What each worker reserves, as Ray names it ({"CPU": c} or {"CPU": c, "GPU": g})."""
        if self.cpus_per_worker is None:
            raise ValueError("size the resources first (Resources.sized)")
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus} if self.gpus else {})}

    def scaling_config(self):
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.gpus > 0,
                             resources_per_worker=self.per_worker)

    def check_gpus(self, cluster_gpus: float) -> None:
        """Refuse a run that needs more GPUs than the cluster has."""
        needed = self.gpus * self.num_workers
        if needed and cluster_gpus < needed:
            raise self.error(f"num_workers={self.num_workers} with use_gpu needs {needed:g} GPU(s) per run; "
                             f"the cluster has {cluster_gpus:g}")
