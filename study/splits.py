"""The splits of a study: cut (or checked) before any trial starts, and decoded once into Ray's
object store for TorchTrainer trials (in-trial runs read their arrays in the trial process)."""

import itertools

from data_prep.parquet import open_dataset
from data_prep.splits import load_split, make_split, save_split, split_path
from study.config import SPLIT_PARAMETERS, StudyConfig
from study.errors import StudyError


def prepare_splits(config: StudyConfig, space: dict) -> dict:
    """Create (or check) every split the study can use, before any trial starts, so an imbalance
    the dataset cannot support fails here. Returns {split name: counts, dataset checksum and whether
    it was cut now ("created")}."""
    info = open_dataset(config.dataset, config.data_root)
    splits = {}
    for params in split_parameters(config, space):
        spec = config.split_spec(params)
        name = spec.default_name(info.name)
        created = not split_path(info, name).is_file()
        if created:
            split = make_split(info, spec)
            save_split(info, split)
        else:
            split = load_split(info, name, create=False)
        splits[name] = {"created": created,
                        "labeled": len(split.labeled_indices), "unlabeled": len(split.unlabeled_indices),
                        "labeled_counts": split.labeled_counts, "unlabeled_counts": split.unlabeled_counts,
                        "valid": len(split.valid_indices),
                        "valid_kind": split.spec.valid_kind if split.has_validation else None,
                        "valid_counts": split.valid_counts, "dataset_checksum": split.dataset_checksum}
    return splits


def split_parameters(config: StudyConfig, space: dict) -> list[dict]:
    """Every combination of the split parameters the space sweeps (SPLIT_PARAMETERS: gamma_l,
    gamma_u, unlabeled), each a trial's params for `config.split_spec`, in the space's value order;
    [{}] (the base split) when it sweeps none. A compare study's stage 2 adds one per shape of
    `compare.unlabeled` (the base split is one of them)."""
    swept = [name for name in SPLIT_PARAMETERS if name in space]
    shapes = config.compare.unlabeled if config.compare.methods else []
    if (swept or shapes) and config.split.kind != "lt":
        raise StudyError(f"sweeping {' / '.join(swept) or 'compare.unlabeled'} needs split.kind: lt")
    if shapes:
        return [{"unlabeled": shape} for shape in shapes]
    return [dict(zip(swept, values)) for values in itertools.product(*(space[name].values for name in swept))]


def decode_once(config: StudyConfig, split_names) -> dict:
    """Every split's Ray datasets (labeled, unlabeled, valid, test), read and decoded once into
    Ray's object store, for TorchTrainer trials: each trial's workers then take their shards from
    memory instead of reading and decoding the Parquet files again. {split name: datasets}."""
    import time

    from data_prep.loading import ray_datasets

    decoded, test = {}, None
    for name in split_names:
        start = time.perf_counter()
        datasets = ray_datasets(config.dataset, name, config.data_root, verify=False)
        if test is None:
            test = datasets["test"].materialize()
        decoded[name] = {**{part: data.materialize() for part, data in datasets.items() if part != "test"},
                         "test": test}  # the test split is the same for every split
        size = sum(data.size_bytes() for data in decoded[name].values())
        print(f"split {name}: decoded once for every trial ({size / 2**20:.0f} MiB in Ray's object store, "
              f"{time.perf_counter() - start:.1f} s)")
    return decoded
