"""Where hepml finds job files and cluster files, in a source checkout and in a pip-installed package alike.

The jobs (jobs/*.yaml) and cluster files (site profiles, the sbatch template) ship inside the package:
hepml_dist/_shipped/ holds links to the checkout's jobs/ and cluster/ folders, which the wheel stores as files.
A job named without a folder (`hepml train part-quickstart`, `extends: part-quickstart.yaml`) is looked up in
the job's own folder first, then in each folder of $HEPML_JOBS_PATH (separated like $PATH), then in the shipped jobs.
"""

import os
from pathlib import Path

JOBS_PATH_VARIABLE = "HEPML_JOBS_PATH"
CLUSTER_DIR_VARIABLE = "HEPML_CLUSTER_DIR"
_SHIPPED = Path(__file__).resolve().parent / "_shipped"


def shipped_jobs_dir() -> Path:
    """The jobs that come with hepml_dist."""
    return (_SHIPPED / "jobs").resolve()


def cluster_dir() -> Path:
    """The cluster folder (sites/, slurm/, ray/): $HEPML_CLUSTER_DIR, else the one shipped with the package."""
    if os.environ.get(CLUSTER_DIR_VARIABLE):
        return Path(os.environ[CLUSTER_DIR_VARIABLE])
    return (_SHIPPED / "cluster").resolve()


def user_jobs_dirs() -> list[Path]:
    """The folders of $HEPML_JOBS_PATH, in order (empty entries ignored)."""
    return [Path(part).expanduser() for part in os.environ.get(JOBS_PATH_VARIABLE, "").split(os.pathsep) if part]


def jobs_search_path(first: Path | None = None) -> list[Path]:
    """Folders searched for a job named without a folder: `first` (the referring job's folder), then
    $HEPML_JOBS_PATH, then the shipped jobs; each folder once."""
    folders: list[Path] = []
    for folder in [*([first] if first else []), *user_jobs_dirs(), shipped_jobs_dir()]:
        if folder.resolve() not in [f.resolve() for f in folders]:
            folders.append(folder)
    return folders


def find_job(name: str | Path, first: Path | None = None) -> Path | None:
    """The job file `name` along jobs_search_path(first) (`.yaml` may be left out); None if there is none.
    A name with a folder part is only looked up relative to `first` (or the working directory)."""
    name = Path(name)
    candidates = [name] if name.suffix in (".yaml", ".yml") else [name.with_name(name.name + ".yaml"), name]
    if name.is_absolute():
        return next((c for c in candidates if c.is_file()), None)
    folders = jobs_search_path(first) if len(name.parts) == 1 else [first or Path.cwd()]
    for folder in folders:
        for candidate in candidates:
            if (folder / candidate).is_file():
                return folder / candidate
    return None
