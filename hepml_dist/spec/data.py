"""Spec of the input data: where the shards are, what the model sees, how batches are formed."""

from typing import Literal

from pydantic import Field, model_validator

from hepml_dist.spec.base import Section

# Named input representations and the number of per-constituent (or per-object) channels they produce.
# The one declaration of each feature set: its builder in hepml_dist.data.features takes the channel count
# from here (and refuses to import if the two lists differ).
FEATURE_SETS: dict[str, int] = {
    "part_full": 17,  # ParT JetClass "full": kinematics, particle ID, trajectory displacement
    "part_kinpid": 13,
    "part_kin": 7,
    "sophon_full": 17,  # as part_full, with pT and E of the jet scaled to pT = 500 GeV
    "tau_cand": 17,  # the 17 FCC-ee tau-candidate features of MultiParTau
    "tau_cand_ipsig": 19,  # tau_cand + signed log(1 + |IP / error|) of dz and d0
    "omnijet_tokens": 1,  # token ids from a trained OmniJet tokenizer
    "omnijet_constituents": 3,  # (log pT - 1.8, 3 Delta eta, 3 Delta phi), tokenizer input
    "mlpf_elements": 17,  # CLIC tracks and clusters
    "aot_objects": 6,  # jets/leptons: E, pT, eta, phi, mass, b-tag
}


class InputsSpec(Section):
    """What one example looks like to the model."""

    features: str = "part_full"
    """Named feature set (see FEATURE_SETS); decides the builder and the number of input channels."""
    max_length: int = Field(128, ge=1)
    """Constituents, objects or elements kept per example (longer ones are truncated, pT-ordered)."""
    event_features: list[str] = Field(default_factory=list)
    """Event-level feature names fed alongside the objects (AOT: e.g. ht, met)."""
    pad_to_multiple: int | None = Field(None, ge=1)
    """Pad each batch's length up to a multiple of this (fewer kernel shapes); None pads to max_length."""


class ReweightGroup(Section):
    """A group of classes flattened together in the reweighting variables."""

    name: str
    """Group name, for logs and plots."""
    labels: list[int] = Field(min_length=1)
    """Class indices in the group."""
    weight: float = Field(gt=0.0)
    """Relative share of the group in the sampled (or weighted) training data."""


class ReweightSpec(Section):
    """Flatten each class group in two variables (Sophon: jet pT and soft-drop mass) to decorrelate the tagger."""

    label: str = "label_jet_class"
    """The stored label column whose class indices `groups` list."""
    variables: list[str] = Field(default_factory=lambda: ["jet_pt", "jet_sdmass"], min_length=2, max_length=2)
    """The two per-example variables to flatten in."""
    bins: dict[str, list[float]]
    """Bin edges for each variable."""
    groups: list[ReweightGroup] = Field(min_length=1)
    """Class groups and their relative weights; classes in no group get weight 0."""
    mode: Literal["sample", "loss_weight"] = "sample"
    """`sample`: the training loader draws examples with probability proportional to their weight (as weaver's
    rejection sampling, but a fixed number per shuffle window, so epochs stay equal across ranks);
    `loss_weight`: every example is kept and the batch carries `weight` (mean 1) for the loss."""
    threshold_percentile: float = Field(10.0, ge=0.0, le=100.0)
    """Percentile of populated bins used as the reference count (caps weights of sparse bins)."""


class GroupSpec(Section):
    """One set of training shards that fills a fixed share of every training batch."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Group name, for logs."""
    train: str | list[str]
    """The group's training shards (same forms as `data.train`)."""
    share: float = Field(gt=0.0)
    """Relative share of the group in every batch (normalised over the groups): with shares 0.3 and 0.7 and
    batch_size 32, batches hold 9 or 10 and 22 or 23 examples, 9.6 and 22.4 on average."""


class DataSpec(Section):
    """Shards, inputs and batching."""

    train: str | list[str] | None = None
    """Training shards: a dataset split directory, a glob, or a brace pattern (`shard-{000..099}.tar`);
    required unless `groups` names them."""
    val: str | list[str] | None = None
    """Validation shards (same forms as `train`)."""
    test: str | list[str] | None = None
    """Test shards (same forms as `train`)."""
    inputs: InputsSpec = Field(default_factory=InputsSpec)
    """Per-example model inputs."""
    batch_size: int = Field(512, ge=1)
    """Examples per batch on each worker (the global batch is this times the number of workers)."""
    shuffle_buffer: int = Field(8192, ge=0)
    """Examples held in the shuffle buffer of each loader process (0 = no shuffling beyond shard order)."""
    bucket_by_length: bool = False
    """Training batches of similar length (particleflow sorts MLPF events by size): each shuffle window is sorted
    by the examples' constituent / element count (`elem_n` for MLPF), cut into batches, and the batch order is
    shuffled, so a batch pads to its own longest example with little waste (benchmarks/mlpf_bucketing.py). Seeded
    like the shuffle: the same batches on every run with the same seed, and an exact resume. Batch composition
    is then correlated with length; evaluation splits are read unbucketed. The MLPF jobs turn it on."""
    loader_workers: int = Field(2, ge=0)
    """DataLoader processes per training worker (0: batches are built in the training process). During training,
    the training and the validation split each have their own, forked once and kept until the training ends."""
    steps_per_epoch: int | None = Field(None, ge=1)
    """Batches per epoch on every rank; None: one pass over the training split, examples // (batch_size x ranks),
    counted from the manifests when `hepml train` starts (and written into the run's spec.yaml)."""
    val_steps: int | None = Field(None, ge=1)
    """Validation batches per evaluation on every rank; None uses the whole validation split."""
    on_corrupt: Literal["raise", "skip"] = "raise"
    """What a corrupt shard does: stop with an error naming it, or skip it and count it."""
    reweight: ReweightSpec | None = None
    """Mass-decorrelating reweighting (Sophon); None trains on the natural mixture."""
    groups: list[GroupSpec] | None = Field(None, min_length=1)
    """Training batches mixed from several shard sets with fixed shares (class groups, stratified
    signal/background batches) instead of `train`. Each batch holds floor or ceil of share x batch_size examples of
    each group, exactly share x batch_size on average, the same composition on every rank and in every epoch with
    the same seed. An epoch ends when the group with the least data per share is used up (larger groups are drawn
    afresh each epoch) unless `steps_per_epoch` says otherwise; validation reads `val` unmixed."""

    @model_validator(mode="after")
    def _train_or_groups(self) -> "DataSpec":
        if (self.train is None) == (self.groups is None):
            raise ValueError("set exactly one of data.train and data.groups (groups name their own shards)")
        if self.groups is not None:
            names = [g.name for g in self.groups]
            if len(set(names)) != len(names):
                raise ValueError(f"data.groups: group names must differ ({', '.join(names)})")
            if self.reweight is not None:
                raise ValueError("data.groups and data.reweight cannot be combined; give each group the shards "
                                 "and share it should have instead")
        return self
