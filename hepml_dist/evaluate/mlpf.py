"""MLPF physics evaluation: particles -> jets -> matched to generator jets -> jet response and resolution vs pT; MET.

As in particleflow (`mlpf/jet_utils.py`, `mlpf/plotting/plot_utils.py`):
- jets: FastJet `ee_genkt_algorithm` with R = 0.4, p = -1 (e+e- anti-kT), inclusive jets with pT > 5 GeV, built from
  the predicted particles (and from the target particles, the ceiling of the target definition);
- matching: each generator jet takes its nearest reconstructed jet in (eta, phi) and keeps it if Delta R < 0.1
  (not exclusive); response r = pT_reco / pT_gen; median and IQR / median (IQR = q75 - q25) in bins of gen-jet pT;
- MET = |sum of particle pT vectors|; response MET_reco / MET_gen in bins of gen MET (events with gen MET >= 10 GeV).
Events are awkward arrays of particle records (`pt, eta, phi, energy, cls`), one list per event.

Three particle collections go through the same code: MLPF's predictions (metric names as is), the target particles
(`target_*`) and the rule-based particle flow of `mlpf_baseline.py` (`*_baseline`); against the stored generator
jets, again against jets of the target particles (`vs_target_jets`), and per process when the data store
`gen_process` (`per_process`). Per element, MLPF's and the baseline's particles are also compared with the target
particle class by class (`particles`: efficiency, fake rate, pT / energy response; see `mlpf_particles.py`).
`hepml evaluate` on an MLPF run stores all of it as metrics.json's `mlpf` (`evaluate_mlpf_run`) and the scalar
numbers among its metrics (`summary_metrics`).
"""

import json
import math
from collections.abc import Iterable
from pathlib import Path

import awkward as ak
import fastjet
import matplotlib
import matplotlib.pyplot as plt
import mplhep
import numpy as np
import torch

from hepml_dist import files, runs
from hepml_dist.data.loader import open_stream
from hepml_dist.data.shards import ShardResolver
from hepml_dist.errors import UserError
from hepml_dist.evaluate.loop import run_model
from hepml_dist.evaluate.mlpf_baseline import rule_based_columns
from hepml_dist.evaluate.mlpf_particles import (
    binned_response,
    element_table,
    particle_performance,
    particle_summary,
    response_summary,
)
from hepml_dist.generate.clic_events import PROCESS_NAMES
from hepml_dist.models.mlpf.losses import regression_target
from hepml_dist.models.mlpf.model import ENERGY, PT, task_roles
from hepml_dist.spec import JobSpec

JET_PT_BINS = [10, 20, 40, 60, 80, 100, 200, 400, 800]
MET_BINS = [10, 20, 40, 60, 80, 100, 200]
JET_RADIUS, JET_MIN_PT, MATCH_DR = 0.4, 5.0, 0.1


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _events(exists: np.ndarray, **columns: np.ndarray) -> ak.Array:
    """Padded [N, E] columns -> one list of particle records per event, keeping the entries where `exists`."""
    counts = exists.sum(axis=1)
    return ak.zip({name: ak.unflatten(values[exists].astype(np.float64), counts) for name, values in columns.items()})


def predicted_columns(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                      spec: JobSpec) -> dict[str, np.ndarray]:
    """Decoded MLPF outputs per element [N, E]: `cls` = argmax(existence), then argmax(particle class) (0 = none,
    and 0 on padding); `pt`, `energy` from the log-ratios; `eta`, `phi`."""
    roles = task_roles(spec)
    x = _to_numpy(batch["features"]).transpose(0, 2, 1)
    real = _to_numpy(batch["mask"])[:, 0] > 0
    exists = real & (_to_numpy(outputs[roles["existence"].name]).argmax(-1) == 1)
    cls = np.where(exists, _to_numpy(outputs[roles["particle_class"].name]).argmax(-1), 0)
    kin = _to_numpy(outputs[roles["kinematics"].name])
    value = {name: kin[..., i] for i, name in enumerate(roles["kinematics"].targets or [])}
    with np.errstate(over="ignore", invalid="ignore"):
        pt = np.exp(np.clip(value["log_pt_ratio"], -20, 20)) * x[..., PT]
        energy = np.exp(np.clip(value["log_energy_ratio"], -20, 20)) * x[..., ENERGY]
    phi = np.arctan2(value["sin_phi"], value["cos_phi"])
    return {"pt": pt, "eta": value["eta"], "phi": phi, "energy": energy, "cls": cls}


def predicted_particles(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], spec: JobSpec) -> ak.Array:
    """MLPF's predicted particles of each event (`predicted_columns` where `cls` != 0)."""
    columns = predicted_columns(outputs, batch, spec)
    return _events(columns["cls"] != 0, **columns)


def target_columns(batch: dict[str, torch.Tensor], spec: JobSpec) -> dict[str, np.ndarray]:
    """The per-element truth [N, E] (`cls` 0 = no particle, and 0 on padding), with the absolute `target_pt` /
    `target_energy`, or the log-ratios to the element."""
    roles = task_roles(spec)
    x = _to_numpy(batch["features"]).transpose(0, 2, 1)
    real = _to_numpy(batch["mask"])[:, 0] > 0
    exists = real & (_to_numpy(batch[roles["existence"].label_key]) > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        absolute = {}
        for name, ratio, channel in (("pt", "log_pt_ratio", PT), ("energy", "log_energy_ratio", ENERGY)):
            if f"target_{name}" in batch:
                absolute[name] = _to_numpy(batch[f"target_{name}"])
            else:
                absolute[name] = np.exp(_to_numpy(regression_target(batch, ratio))) * x[..., channel]
        pt, energy = absolute["pt"], absolute["energy"]
    phi = np.arctan2(_to_numpy(batch["target_sin_phi"]), _to_numpy(batch["target_cos_phi"]))
    cls = np.where(exists, _to_numpy(batch[roles["particle_class"].label_key]), 0)
    return {"pt": pt, "eta": _to_numpy(batch["target_eta"]), "phi": phi, "energy": energy, "cls": cls}


def target_particles(batch: dict[str, torch.Tensor], spec: JobSpec) -> ak.Array:
    """The target particles of each event (`target_columns` where `cls` != 0)."""
    columns = target_columns(batch, spec)
    return _events(columns["cls"] != 0, **columns)


def cluster_jets(particles: ak.Array, radius: float = JET_RADIUS, min_pt: float = JET_MIN_PT) -> ak.Array:
    """Inclusive e+e- anti-kT jets (ee_genkt, p = -1) per event, as records `pt, eta, phi, energy`."""
    vectors = ak.zip({
        "px": particles.pt * np.cos(particles.phi),
        "py": particles.pt * np.sin(particles.phi),
        "pz": particles.pt * np.sinh(particles.eta),
        "E": particles.energy,
    })  # fmt: skip
    definition = fastjet.JetDefinition(fastjet.ee_genkt_algorithm, radius, -1.0)
    jets = fastjet.ClusterSequence(vectors, definition).inclusive_jets(min_pt=min_pt)
    pt = np.hypot(jets.px, jets.py)
    return ak.zip({"pt": pt, "eta": np.arcsinh(jets.pz / pt), "phi": np.arctan2(jets.py, jets.px), "energy": jets.E})


def jets_from_columns(pt, eta, phi, energy, count) -> ak.Array:
    """Stored generator jets (`genjet_*` [N, J] padded, `genjet_n` [N]) as per-event records."""
    count = _to_numpy(count).astype(int)
    exists = np.arange(_to_numpy(pt).shape[1])[None, :] < count[:, None]
    return _events(exists, pt=_to_numpy(pt), eta=_to_numpy(eta), phi=_to_numpy(phi), energy=_to_numpy(energy))


def missing_et(particles: ak.Array) -> np.ndarray:
    """|sum of pT vectors| per event."""
    px = ak.sum(particles.pt * np.cos(particles.phi), axis=1)
    py = ak.sum(particles.pt * np.sin(particles.phi), axis=1)
    return np.hypot(ak.to_numpy(px), ak.to_numpy(py))


def match_jets(reference: ak.Array, reco: ak.Array, max_dr: float = MATCH_DR) -> tuple[np.ndarray, np.ndarray, float]:
    """(pT_ref, pT_reco) of matched pairs and the fraction of reference jets matched."""
    ref, rec = ak.unzip(ak.cartesian([reference, reco], axis=1, nested=True))
    dphi = (ref.phi - rec.phi + np.pi) % (2 * np.pi) - np.pi
    dr = np.sqrt((ref.eta - rec.eta) ** 2 + dphi**2)
    best = ak.argmin(dr, axis=2, keepdims=True)
    best_dr = ak.fill_none(ak.firsts(dr[best], axis=2), np.inf)
    matched = best_dr < max_dr
    reco_pt = ak.fill_none(ak.firsts(rec.pt[best], axis=2), np.nan)
    n_ref = int(ak.sum(ak.num(reference)))
    ref_pt = ak.to_numpy(ak.flatten(reference.pt[matched]))
    return ref_pt, ak.to_numpy(ak.flatten(reco_pt[matched])), (len(ref_pt) / n_ref if n_ref else math.nan)


def collection_key(collection: str, key: str) -> str:
    """Metric name of `key` for a particle collection: MLPF's own names, `target_<key>`, `<key>_baseline`."""
    return {"mlpf": key, "target": f"target_{key}", "baseline": f"{key}_baseline"}[collection]


def evaluate_particles(
    predicted: ak.Array,
    gen_jets: ak.Array,
    gen_met: np.ndarray | None = None,
    target: ak.Array | None = None,
    plots_dir: Path | None = None,
    baseline: ak.Array | None = None,
) -> dict:
    """Jet and MET response of predicted (and, if given, target and rule-based baseline) particles against
    generator jets and MET."""
    results: dict = {}
    collections = {"mlpf": predicted, "target": target, "baseline": baseline}
    for collection, particles in collections.items():
        if particles is None:
            continue

        def put(key, value, collection=collection):
            results[collection_key(collection, key)] = value

        gen_pt, reco_pt, match_fraction = match_jets(gen_jets, cluster_jets(particles))
        summary = response_summary(reco_pt / gen_pt)
        put("jet_response_median", summary["median"])
        put("jet_resolution", summary["iqr_over_median"])
        put("jet_match_fraction", match_fraction)
        put("jet_response_vs_pt", binned_response(gen_pt, reco_pt, JET_PT_BINS))
        if gen_met is not None:
            met, gen = missing_et(particles), np.asarray(gen_met, dtype=np.float64)
            ok = gen >= MET_BINS[0]  # the ratio is meaningless for (nearly) balanced events
            met_summary = response_summary(met[ok] / gen[ok])
            put("met_response_median", met_summary["median"])
            put("met_resolution", met_summary["iqr_over_median"])
            put("met_response_vs_met", binned_response(gen[ok], met[ok], MET_BINS))
    if plots_dir is not None:
        plot_responses(results, Path(plots_dir))
    return results


def evaluate_mlpf(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], spec: JobSpec, plots_dir: Path | None = None,
    limit: int | None = None,
) -> dict:
    """Run a trained MLPF over event batches (with `genjet_*`, `genjet_n`, optional `gen_met`, `gen_process`) and
    evaluate MLPF, the target particles and the rule-based baseline; with `gen_process` holding several processes,
    the same again per process under `per_process[<name>]`."""
    parts: dict[str, list] = {k: [] for k in ("predicted", "target", "baseline", "gen_jets", "gen_met", "process",
                                              "elements")}
    model.eval()
    for batch, outputs in run_model(model, batches, device=torch.device("cpu"), limit=limit):
        real = _to_numpy(batch["mask"])[:, 0] > 0
        predicted, target = predicted_columns(outputs, batch, spec), target_columns(batch, spec)
        baseline = rule_based_columns(_to_numpy(batch["features"]).transpose(0, 2, 1), real)
        for name, columns in (("predicted", predicted), ("target", target), ("baseline", baseline)):
            parts[name].append(_events(columns["cls"] != 0, **columns))
        elements = element_table(real, target, mlpf=predicted, baseline=baseline)
        columns = (batch[f"genjet_{name}"] for name in ("pt", "eta", "phi", "energy", "n"))
        parts["gen_jets"].append(jets_from_columns(*columns))
        if "gen_met" in batch:
            parts["gen_met"].append(_to_numpy(batch["gen_met"]))
        if "gen_process" in batch:  # the loader may hand it over as a float
            process = np.rint(_to_numpy(batch["gen_process"])).astype(np.int64)
            parts["process"].append(process)
            elements["process"] = np.broadcast_to(process[:, None], real.shape)[real]
        parts["elements"].append(elements)
    if not parts["gen_jets"]:
        raise UserError("MLPF evaluation: the split gave no events")
    per_event = ("gen_met", "process")  # numpy columns; the rest are awkward lists of particles or jets
    joined = {k: None if not v else np.concatenate(v) if k in per_event else ak.concatenate(v)
              for k, v in parts.items() if k != "elements"}
    table = {k: np.concatenate([e[k] for e in parts["elements"]]) for k in parts["elements"][0]}
    names = particle_class_names(spec)

    def evaluate(select=slice(None), plots: Path | None = None) -> dict:
        return evaluate_particles(
            joined["predicted"][select], joined["gen_jets"][select],
            None if joined["gen_met"] is None else joined["gen_met"][select],
            joined["target"][select], plots, joined["baseline"][select],
        )  # fmt: skip

    results = evaluate(plots=plots_dir)
    results["events"] = len(joined["gen_jets"])
    results["particles"] = particle_performance(table, names)
    # the same against jets of the target particles (what a perfect per-element reconstruction would give)
    results["vs_target_jets"] = evaluate_particles(
        joined["predicted"], cluster_jets(joined["target"]), missing_et(joined["target"]),
        baseline=joined["baseline"])  # fmt: skip
    process = joined["process"]
    if process is not None and len(np.unique(process)) > 1:
        results["per_process"] = {}
        for index in np.unique(process):
            name = PROCESS_NAMES[index] if 0 <= index < len(PROCESS_NAMES) else f"process_{index}"
            selected = evaluate(process == index)
            selected["events"] = int((process == index).sum())
            selected["particles"] = particle_performance({k: v[table["process"] == index] for k, v in table.items()},
                                                         names)
            results["per_process"][name] = selected
            if plots_dir is not None:
                plot_responses(selected, Path(plots_dir), tag=f"{name}_")
    return results


def particle_class_names(spec: JobSpec) -> list[str]:
    """Names of the particle classes (index 0 = none), from the job's particle-class task."""
    task = task_roles(spec)["particle_class"]
    return list(task.classes or [str(i) for i in range(task.output_dim)])


MLPF_COLUMNS = ("elem_features", "elem_n", "label_existence", "label_particle_class", "target_pt", "target_eta",
                "target_sin_phi", "target_cos_phi", "target_energy", "genjet_pt", "genjet_eta", "genjet_phi",
                "genjet_energy", "genjet_n")
"""Stored columns MLPF evaluation needs (gen_met and gen_process are used when present)."""


def require_columns(patterns, split: str) -> None:
    """UserError naming the missing columns (and the family) if a split's data cannot be evaluated as MLPF."""
    resolver = ShardResolver()
    for ref in resolver.resolve(patterns):
        missing = [c for c in MLPF_COLUMNS if c not in resolver.manifests[ref.dataset].columns]
        if missing:
            raise UserError(f"family mlpf: the {split} data {ref.source} lack column(s) {missing} that the MLPF jet "
                            "and MET evaluation needs; use a clic-events dataset (hepml data generate clic-events)")


def evaluate_mlpf_run(folder: Path, split: str, max_batches: int | None, plots_dir: Path) -> dict:
    """`evaluate_mlpf` of the checkpoint `folder` on `split` of its job's data (what `hepml evaluate` stores as
    metrics.json's `mlpf`)."""
    spec, model = runs.load_trained(folder)
    spec = runs.absolute_paths(spec)
    require_columns(getattr(spec.data, split), split)
    stream = open_stream(spec.data, split, rank=0, world_size=1, seed=spec.training.seed, training=False)
    limit = min(stream.steps_per_epoch, max_batches or stream.steps_per_epoch)
    return evaluate_mlpf(model, stream.batches(0), spec, plots_dir=plots_dir, limit=limit)


SUMMARY_KEYS = ("jet_response_median", "jet_resolution", "jet_match_fraction", "met_response_median", "met_resolution")


def summary_metrics(results: dict, split: str) -> dict[str, float]:
    """The scalar numbers of `evaluate_mlpf` (MLPF and `_baseline`, overall and per process) as flat metrics."""
    out = {}
    scopes = {"": results, **{f"{name}_": r for name, r in results.get("per_process", {}).items()}}
    if "vs_target_jets" in results:
        scopes["vs_target_jets_"] = results["vs_target_jets"]
    for scope, numbers in scopes.items():
        for key in SUMMARY_KEYS:
            for collection in ("mlpf", "baseline"):
                name = collection_key(collection, key)
                if name in numbers:
                    out[f"{split}_{scope}{name}"] = float(numbers[name])
    if "particles" in results:  # per-class particle numbers: all events only (per process they stay in `mlpf`)
        out |= particle_summary(results["particles"], f"{split}_")
    return out


def _response_figure(series: dict[str, dict], stat: str, title: str, xlabel: str):
    fig, ax = plt.subplots(figsize=(9, 7))
    for label, binned in series.items():
        edges = np.array(binned["edges"], dtype=float)
        centers = np.sqrt(edges[1:] * edges[:-1])
        values = np.array(binned[stat], dtype=float)
        ax.errorbar(centers, values, xerr=[centers - edges[:-1], edges[1:] - centers], fmt="o", label=label)
    if stat == "median":
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_title(title, fontsize="medium")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("response median" if stat == "median" else "response IQR / median")
    ax.legend()
    return fig


SERIES_LABELS = {"mlpf": "MLPF", "baseline": "rule-based PF", "target": "target"}


def response_series(results: dict, key: str, stat: str = "median") -> dict[str, dict]:
    """{legend label: binned response} of each particle collection that `results` holds for `key` with at least
    one finite `stat` (a collection without a single matched jet has nothing to draw)."""
    series = {label: results[collection_key(c, key)] for c, label in SERIES_LABELS.items()
              if collection_key(c, key) in results}
    return {label: binned for label, binned in series.items()
            if np.isfinite(np.array(binned[stat], dtype=float)).any()}


def plot_responses(results: dict, plots_dir: Path, tag: str = "") -> list[Path]:
    """PNG plots of jet response median and IQR/median vs gen-jet pT, the same for MET, and the metrics as JSON;
    `tag` prefixes the file names (one set per process)."""
    matplotlib.use("Agg")

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figures = (
        ("jet", "jet_response_vs_pt", f"Jet response, matched at $\\Delta R < {MATCH_DR}$", "gen-jet $p_T$ [GeV]"),
        ("met", "met_response_vs_met", "MET response", "gen MET [GeV]"),
    )
    for kind, key, title, xlabel in figures:
        for stat in ("median", "iqr_over_median"):
            series = response_series(results, key, stat)
            if not series:
                continue
            with plt.style.context(mplhep.style.ROOT):
                fig = _response_figure(series, stat, title, xlabel)
                path = plots_dir / f"{tag}{kind}_response_{stat}.png"
                fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    files.write_text(plots_dir / f"{tag}mlpf_metrics.json", json.dumps(results, indent=1))
    return written
