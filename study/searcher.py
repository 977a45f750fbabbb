"""How a study chooses its trials: Optuna (TPE or random sampling) behind the fixed points, or a
grid, and the scheduler that stops the weak ones early, all on the study's one metric."""

import json
import os
import pickle

from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from search_spaces.spaces import to_optuna, to_tune
from study.config import StudyConfig
from study.errors import StudyError
from study.tune_files import FIXED, GRID, SEARCH
from trainables.loop import FATAL_ERROR

# A resumed experiment's search state can be older than its trial list: Tune saves the two one
# after the other and uploads them as files, so a driver killed in between (or storage that kept
# one upload and not the other) leaves a search that still counts ended trials as running (with
# max_concurrent reached, it never suggests again: the resume waits forever) and that would run
# again points its trials already ran. The trial list is what ran; `reconcile_search`, called by
# the ReconcileSearch callback (study/callbacks.py) at every step of the controller, makes the
# search agree with it.


def trial_key(config: dict) -> str:
    """A trial's whole config as one string: two trials with the same key run the same point."""
    return json.dumps(config, sort_keys=True, default=str)


def reconcile_search(search_alg, trials) -> None:
    """Make the study's search (a Grid, or a ConcurrencyLimiter over FixedPointsFirst) agree with
    Tune's trial list: a trial counts as running only while Tune runs it, and what ran is not
    suggested again."""
    running = {trial.trial_id for trial in trials if not trial.is_finished()}
    if isinstance(search_alg, ConcurrencyLimiter):
        search_alg.live_trials &= running
        search_alg.num_unfinished_live_trials = len(search_alg.live_trials)
        search_alg = search_alg.searcher
    search_alg.reconcile(trials, running)


class Grid(BasicVariantGenerator):
    """Tune's grid generator (every value of the grid spaces), reconciled with the trial list."""

    def reconcile(self, trials, running: set) -> None:
        self._live_trials &= running
        self.existing = {trial_key(trial.config) for trial in trials}

    def next_trial(self):
        while True:
            trial = super().next_trial()
            if trial is None or trial_key(trial.config) not in getattr(self, "existing", ()):
                return trial
            self._live_trials.discard(trial.trial_id)  # a point that ran before the resume


class NothingToSearch(Searcher):
    """The inner searcher of a search made of fixed points only (a compare study's stage 2)."""

    def suggest(self, trial_id):
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass

    def save(self, checkpoint_path: str):
        # Nothing to keep (the wrapper's own state is the search), but a file a resume can tell
        # from one a failed storage left empty (study/tune_files.py, damaged_state).
        with open(checkpoint_path, "wb") as f:
            pickle.dump({}, f)

    def restore(self, checkpoint_path: str):
        pass


class FixedPointsFirst(Searcher):
    """Suggest whole fixed configurations first, then defer to an inner searcher.

    Every suggestion gets a label: a fixed point's own, a named starting point's own (the inner
    searcher suggests its `points_to_evaluate` first, in order), else "search"; and the
    `constants` (what every trial of this search shares, e.g. a compare stage's method). Results
    of fixed points are not fed to the inner searcher: they lie outside its space.

    How a searched trial ended reaches the inner searcher as the report tells it (study/report/):
    a trial the scheduler stopped before its planned steps (STOPPED_EARLY) as pruned, one that a
    failure that would recur ended (its result holds `fatal_error`) as failed; Optuna keeps them so
    (PRUNED, FAIL), and optuna-dashboard shows the study's story."""

    def __init__(self, searcher, fixed_points, metric, mode, start_labels=(), steps=None, constants=None,
                 total=None):
        super().__init__(metric=metric, mode=mode)
        self.searcher, self.pending = searcher, list(fixed_points)
        self.total, self.known = total, 0  # the trials planned, and how many Tune has (`reconcile`)
        self.start_labels = list(start_labels)  # the labels of the inner searcher's first suggestions
        self.constants = dict(constants or {})
        self.fixed_trials = set()
        self.steps = steps  # the steps a trial trains unless its suggestion sweeps them
        self.planned = {}  # trial id -> the steps it was suggested to train

    def set_search_properties(self, metric, mode, config, **spec):
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id):
        if self.total is not None and self.known >= self.total:
            return Searcher.FINISHED
        if self.pending:
            self.fixed_trials.add(trial_id)
            self.known += 1
            return self._fixed(self.pending.pop(0))
        suggestion = self.searcher.suggest(trial_id)
        if not isinstance(suggestion, dict):
            return suggestion
        self.known += 1
        self.planned[trial_id] = suggestion.get("steps", self.steps)
        return {"label": self.start_labels.pop(0) if self.start_labels else SEARCH, **self.constants, **suggestion}

    def _fixed(self, point: dict) -> dict:
        return {"label": FIXED, **self.constants, **point}

    def reconcile(self, trials, running: set) -> None:
        """Fixed points among Tune's trials are not suggested again, and the search ends once Tune
        has the trials planned (a resumed search state may be behind the trial list)."""
        existing = {trial_key(trial.config) for trial in trials}
        self.pending = [point for point in self.pending if trial_key(self._fixed(point)) not in existing]
        self.known = len(trials)

    def on_trial_result(self, trial_id, result):
        if trial_id not in self.fixed_trials:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self.fixed_trials:
            return
        planned = self.planned.get(trial_id)
        if result and result.get(FATAL_ERROR):
            result, error = None, True
        elif result and not error and planned is not None and result.get("step", planned) < planned:
            # Stopped by the scheduler. Tune passes the result it stopped on to no searcher's
            # on_trial_result; reported now, it is the value Optuna keeps for the pruned trial.
            # OptunaSearch records a trial that ends without a result, and not failed, as PRUNED.
            self.searcher.on_trial_result(trial_id, result)
            result = None
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    # Tune saves the inner searcher itself; a wrapper keeps only its own state.
    def get_state(self):
        return {"pending": self.pending, "fixed_trials": self.fixed_trials, "start_labels": self.start_labels,
                "steps": self.steps, "planned": self.planned, "constants": self.constants, "total": self.total,
                "known": self.known}

    def set_state(self, state):
        self.__dict__.update(state)

    def __setstate__(self, state):
        # A study started by an earlier version of this tool pickled a searcher without the
        # attributes added since; its resume gets their "not known" values.
        self.__dict__.update({"start_labels": [], "constants": {}, "steps": None, "planned": {}, "total": None,
                              "known": 0, **state})


def optuna_storage(config: StudyConfig, study_dir: str) -> str | None:
    """The study's Optuna storage URL, `{study}` replaced by the (local) study directory, or None
    when the search keeps its Optuna study in memory."""
    url = config.search.storage
    if url is None or "{study}" not in url:
        return url
    return url.replace("{study}", os.path.abspath(study_dir.removeprefix("file://")))


def build_searcher(config: StudyConfig, space: dict, study_dir: str, experiment: str | None = None,
                   constants: dict | None = None, total: int | None = None):
    """The search algorithm and Tune's param_space: a grid, or the fixed points first, then Optuna
    over the space (none where the space is empty: the fixed points are the whole search), `total`
    trials in all; either runs at most search.max_concurrent trials at once."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    search = config.search
    if search.algorithm == "grid":
        return Grid(max_concurrent=search.max_concurrent), {**to_tune(space), "label": GRID, **(constants or {})}
    inner = NothingToSearch(metric=config.metric, mode=config.mode)
    if space:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "new study created" line is noise here
        sampler = (optuna.samplers.TPESampler(seed=search.seed) if search.algorithm == "optuna"
                   else optuna.samplers.RandomSampler(seed=search.seed))
        starts = [{k: v for k, v in point.items() if k != "label"} for point in search.points_to_evaluate]
        inner = OptunaSearch(space=to_optuna(space), metric=config.metric, mode=config.mode,
                             points_to_evaluate=starts or None, sampler=sampler,
                             storage=_optuna_database(optuna_storage(config, study_dir)),
                             study_name=config.name + (f"-{experiment}" if experiment else ""))
    fixed = [{"label": p.get("label", FIXED), **p} for p in search.fixed_points]
    start_labels = [point.get("label", SEARCH) for point in search.points_to_evaluate]
    searcher = FixedPointsFirst(inner, fixed, config.metric, config.mode, start_labels, config.train.steps, constants,
                                total)
    return ConcurrencyLimiter(searcher, search.max_concurrent), {}


def _optuna_database(url: str | None):
    import optuna
    import sqlalchemy.exc

    if url is None:
        return None
    try:
        return optuna.storages.RDBStorage(url)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise StudyError(f"search.storage {url}: Optuna cannot open it ({' '.join(str(exc).split())[:200]})") from None


def build_scheduler(config: StudyConfig):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    scheduler = config.scheduler
    reports = -(-config.train.steps // config.train.eval_every)
    if scheduler.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=reports,
                             grace_period=min(scheduler.grace_period, reports))
    if scheduler.name == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=scheduler.grace_period,
                                  min_samples_required=3)
    return None
