"""Data read through Hugging Face `datasets` (the datasets extra): .parquet and .arrow files, folders written by
`Dataset.save_to_disk`, and folders of parquet shards.

`datasets` memory-maps Arrow data (parquet is converted into Arrow files under `cache_dir` once), so a large file is
never read into Python lists: rows are handed out one at a time, as dicts, to the same readers as JSONL records
(`slimtune.data.records`). Before the first row, the columns are checked against the format they hold
(`slimtune.data.formats`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from slimtune.data.formats import FORMATS_EXPECTED, REQUIRED_FIELDS, format_of
from slimtune.errors import SlimtuneError

SUFFIXES = (".parquet", ".arrow")


def is_datasets_input(path: Path) -> bool:
    """True for what `datasets` reads: a .parquet or .arrow file, or a folder."""
    return path.suffix.lower() in SUFFIXES or path.is_dir()


def load(path: str | Path, cache_dir: str | Path | None = None):
    """The `datasets.Dataset` in `path` (a save_to_disk folder's `train` split if it holds several)."""
    path = Path(path)
    if not path.exists():
        raise SlimtuneError(f"data file {path} does not exist")
    try:
        import datasets
        import pyarrow
    except ImportError:
        raise SlimtuneError(f"{path}: reading parquet/Arrow files and datasets folders needs the datasets library: "
                            "pip install 'slimtune[datasets]'") from None
    datasets.disable_progress_bars()  # one bar per parquet conversion would break the run's own output
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                return _train_split(datasets.load_from_disk(str(path)), path)
            shards = sorted(path.glob("*.parquet"))
            if not shards:
                raise SlimtuneError(f"{path}: the folder holds no .parquet files and was not written by "
                                    "Dataset.save_to_disk (no state.json or dataset_dict.json); give a data file, a "
                                    "save_to_disk folder or a folder of parquet shards")
            return datasets.Dataset.from_parquet([str(s) for s in shards], cache_dir=cache)
        if path.suffix.lower() == ".parquet":
            return datasets.Dataset.from_parquet(str(path), cache_dir=cache)
        return datasets.Dataset.from_file(str(path))
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError, OSError) as exc:
        raise SlimtuneError(f"{path}: cannot be read as a dataset ({type(exc).__name__}: {exc}); check that it is a "
                            "parquet file, an .arrow file written by datasets, or a save_to_disk folder") from None


def _train_split(loaded, path: Path):
    """A save_to_disk folder of a DatasetDict trains on its `train` split."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if "train" not in loaded:
        raise SlimtuneError(f"{path}: the folder holds the splits {', '.join(loaded)} but no 'train' split; give the "
                            f"folder of one split, e.g. data={path / next(iter(loaded))}")
    return loaded["train"]


def check_columns(columns: list[str], column_map: dict, path: Path, task: str = "lm") -> None:
    """A SlimtuneError listing the columns found when a dataset lacks the columns its format needs."""
    found = ", ".join(map(repr, columns)) or "none"
    hint = "Map other names with dataset.column_map, e.g. dataset.column_map.instruction=question"
    if task == "classify":
        fmt, required = "classification", ("text", "label")
    else:
        fmt = format_of(columns, column_map)
        if fmt is None:
            raise SlimtuneError(f"{path}: cannot tell the data format from its columns ({found}); expected "
                                f"{FORMATS_EXPECTED}. {hint}")
        required = ("conversations",) if fmt == "sharegpt" else REQUIRED_FIELDS[fmt]
    missing = [column_map.get(name, name) for name in required if column_map.get(name, name) not in columns]
    if missing:
        raise SlimtuneError(f"{path}: no {', '.join(map(repr, missing))} column for the {fmt} format; columns "
                            f"found: {found}. {hint}")


def iter_rows(path: str | Path, cache_dir: str | Path | None = None, column_map: dict | None = None,
              task: str = "lm") -> Iterator[tuple[str, dict]]:
    """(location, row as a dict) for each row of the dataset in `path`, after checking its columns."""
    dataset = load(path, cache_dir)
    check_columns(dataset.column_names, column_map or {}, Path(path), task)
    for i, row in enumerate(dataset):
        yield f"{path} row {i}", row
