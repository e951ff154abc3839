"""OmniJet-alpha: the tokenizer learns to reconstruct jets, the backbone beats the unigram entropy, frozen backbones
stay bit-identical, pretrained weights survive construction, every OmniJet job trains a few steps, and the
`hepml data tokenize` / `hepml sample` tools work end to end on small generated jets."""

import re
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.models import build_model, get_family
from hepml_dist.models.omnijet.model import VectorQuantizer
from hepml_dist.omnijet.preprocess import codes_to_tokens, constituent_features, physical_constituents, tokens_to_codes
from hepml_dist.runs import write_model_checkpoint
from hepml_dist.spec import load_job
from hepml_dist.spec.model_omnijet import TokenizerSpec

ROOT = Path(__file__).resolve().parents[1]
TAU_JOBS = sorted(ROOT.glob("jobs/omnijet-tau-*-*.yaml"))
TAU_JOBS = [p for p in TAU_JOBS if p.stem.rsplit("-", 1)[1] in ("scratch", "frozen", "finetune")]
OMNIJET_JOBS = [ROOT / "jobs/omnijet-tokenizer.yaml", ROOT / "jobs/omnijet-pretrain.yaml", *TAU_JOBS, ROOT / "jobs/omnijet-tau-quickstart.yaml"]
BACKBONE = re.compile(r"^backbone\.")
losses = get_family("omnijet").losses


def shrink(spec, codebook=30, dim=32, length=24):
    """The job with small dimensions (tasks, stage and head kind unchanged)."""
    m = spec.model
    model = m.model_copy(update={
        "tokenizer": m.tokenizer.model_copy(update={"codebook_size": codebook, "hidden_dim": 32, "num_heads": 4, "num_blocks": 2, "dropout": 0.0}),
        "backbone": m.backbone.model_copy(update={"embedding_dim": dim, "num_heads": 4, "num_blocks": 2, "max_sequence_length": length}),
        "head": m.head.model_copy(update={"hidden_dim": 16}),
    })  # fmt: skip
    tasks = [t.model_copy(update={"num_classes": codebook + 2}) if t.label == "tokens" else t for t in spec.tasks]
    return spec.model_copy(update={"model": model, "tasks": tasks})


def make_jets(n: int, max_constituents: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Jet columns as the jet shards store them: a few hard, central constituents and many soft, wider ones."""
    rng = np.random.default_rng(seed)
    jet_pt, jet_eta, jet_phi = rng.uniform(300, 600, n), rng.uniform(-1.5, 1.5, n), rng.uniform(-np.pi, np.pi, n)
    count = np.clip(rng.poisson(22, n), 5, max_constituents)
    real = np.arange(max_constituents)[None, :] < count[:, None]
    weight = np.where(real, rng.exponential(size=(n, max_constituents)) ** 2.5, 0.0)
    z = -np.sort(-weight / weight.sum(1, keepdims=True), axis=1)
    width = np.clip(0.03 * (z / z[:, :1] + 1e-3) ** -0.35, 0, 0.6)
    eta = jet_eta[:, None] + rng.normal(size=z.shape) * width
    phi = jet_phi[:, None] + rng.normal(size=z.shape) * width
    pt = z * jet_pt[:, None]
    cols = {"part_px": pt * np.cos(phi), "part_py": pt * np.sin(phi), "part_pz": pt * np.sinh(eta), "part_energy": pt * np.cosh(eta)}
    cols = {k: np.where(real, v, 0).astype(np.float32) for k, v in cols.items()}
    label = rng.integers(0, 2, n)
    return {
        **cols,
        "part_n": count.astype(np.int32),
        "jet_pt": jet_pt.astype(np.float32),
        "label_is_tau": label,
        "label_decay_mode": np.where(label == 1, rng.integers(0, 6, n), -1),
        "target_log_pt_ratio": rng.normal(0, 0.1, n).astype(np.float32),
    }


def jet_batch(columns, max_constituents=30):
    features, mask = constituent_features(columns, max_constituents)
    return {"features": torch.from_numpy(features), "mask": torch.from_numpy(mask).float()[:, None]}


def token_batch(n, codebook, length, seed=0):
    """Token sequences with structure: each code is mostly the previous code + 1; plus tau labels and targets."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(3, length - 1, (n,), generator=g)
    codes = torch.zeros(n, length - 2, dtype=torch.long)
    codes[:, 0] = torch.randint(0, codebook, (n,), generator=g)
    for i in range(1, length - 2):
        jump = torch.randint(0, codebook, (n,), generator=g)
        codes[:, i] = torch.where(torch.rand(n, generator=g) < 0.85, (codes[:, i - 1] + 1) % codebook, jump)
    mask = torch.arange(length - 2)[None] < count[:, None]
    tokens, tokens_n = codes_to_tokens(codes.numpy(), mask.numpy(), codebook, length)
    tokens, tokens_n = torch.from_numpy(tokens).long(), torch.from_numpy(tokens_n)
    label = torch.randint(0, 2, (n,), generator=g)
    return {
        "tokens": tokens,
        "mask": (torch.arange(length)[None] < tokens_n[:, None]).float()[:, None],
        "label_is_tau": label,
        "label_decay_mode": torch.where(label == 1, torch.randint(0, 6, (n,), generator=g), -1),
        "target_log_pt_ratio": 0.1 * torch.randn(n, generator=g),
    }


def masked_mse(a, b, mask):
    return float((((a - b) ** 2).mean(1) * mask).sum() / mask.sum())


def test_preprocessing_round_trips_and_applies_the_reference_cuts():
    cols = make_jets(50)
    features, mask = constituent_features(cols, 40)
    phys = physical_constituents(features, mask)
    pt = np.hypot(cols["part_px"], cols["part_py"])
    assert (np.abs(phys["part_etarel"][mask]) < 0.8).all() and (np.abs(phys["part_phirel"][mask]) < 0.8).all()
    kept_pt = np.sort(phys["part_pt"][0][mask[0]])
    assert np.isin(np.round(kept_pt, 3), np.round(pt[0][: cols["part_n"][0]], 3)).all()
    assert mask.sum() < (cols["part_n"]).sum()  # some wide soft constituents fail |Delta eta|, |Delta phi| < 0.8
    codes = np.where(mask, np.arange(mask.shape[1])[None] % 7, 0)
    tokens, n = codes_to_tokens(codes, mask, 7, 20)
    assert (tokens[:, 0] == 0).all() and (tokens[np.arange(50), n - 1] == 8).all()
    back, back_mask = tokens_to_codes(tokens, 7)
    assert (back_mask.sum(1) == n - 2).all() and (back[back_mask] == codes[:, :19][back_mask[:, : codes.shape[1]]]).all()


def test_tokenizer_round_trip_error_falls_with_training_and_the_codebook_stays_alive():
    torch.manual_seed(0)
    spec = shrink(load_job(ROOT / "jobs/omnijet-tokenizer.yaml"), codebook=64)
    model = build_model(spec)
    train, held_out = jet_batch(make_jets(512, seed=1)), jet_batch(make_jets(256, seed=2))
    real = held_out["mask"][:, 0]

    def round_trip_error():
        model.eval()
        codes = model.tokenize(held_out["features"], real > 0)
        error = masked_mse(model.detokenize(codes, real > 0), held_out["features"], real)
        model.train()
        return error

    before = round_trip_error()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        batch = {k: v[(step % 8) * 64 : (step % 8 + 1) * 64] for k, v in train.items()}
        out = model(batch)
        optimizer.zero_grad()
        losses(out, batch, spec)["reconstruction"].backward()
        optimizer.step()
    after = round_trip_error()
    variance = masked_mse(held_out["features"], (held_out["features"] * real[:, None]).sum((0, 2), keepdim=True) / real.sum(), real)
    usage = float(model(train)["aux_codebook_usage"])
    print(f"tokenizer round-trip MSE {before:.3f} -> {after:.3f} (feature variance {variance:.3f}), codebook usage {usage:.2f}")
    assert after < 0.3 * before and after < 0.3 * variance
    assert usage > 0.6  # dead codes were re-seeded from the data


def test_backbone_next_token_loss_falls_below_the_unigram_entropy():
    torch.manual_seed(0)
    spec = shrink(load_job(ROOT / "jobs/omnijet-pretrain.yaml"), codebook=30, length=24)
    model = build_model(spec)
    train, held_out = token_batch(512, 30, 24, seed=1), token_batch(256, 30, 24, seed=2)
    targets = held_out["tokens"][:, 1:][held_out["mask"][:, 0, 1:] > 0]
    freq = torch.bincount(targets, minlength=32).float() / len(targets)
    unigram = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(100):
        batch = {k: v[(step % 8) * 64 : (step % 8 + 1) * 64] for k, v in train.items()}
        optimizer.zero_grad()
        losses(model(batch), batch, spec)["next_token"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        loss = float(losses(model(held_out), held_out, spec)["next_token"])
    print(f"backbone next-token loss {loss:.3f} vs unigram entropy {unigram:.3f} nats")
    assert loss < 0.6 * unigram
    sampled = model.sample(16, generator=torch.Generator().manual_seed(0))
    assert (sampled[:, 0] == 0).all() and sampled.shape[1] <= 24 and (sampled[:, 1:] <= 31).all()


def test_padded_targets_do_not_count_in_the_next_token_loss():
    spec = shrink(load_job(ROOT / "jobs/omnijet-pretrain.yaml"))
    model = build_model(spec).eval()
    batch = token_batch(8, 30, 24)
    padded_target = batch["mask"][:, 0, 1:] == 0
    assert padded_target.any()
    with torch.no_grad():
        out = model(batch)
    garbage_out = {"next_token": out["next_token"].masked_fill(padded_target[..., None], 100.0)}
    garbage_tokens = dict(batch, tokens=batch["tokens"].clone())
    garbage_tokens["tokens"][:, 1:][padded_target] = 7
    reference = losses(out, batch, spec)["next_token"]
    assert torch.equal(reference, losses(garbage_out, batch, spec)["next_token"])
    assert torch.equal(reference, losses(out, garbage_tokens, spec)["next_token"])


def test_dead_codes_are_replaced_by_latents_of_the_data():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(TokenizerSpec(codebook_size=32, latent_dim=4, replace_freq=3)).train()
    z, mask = torch.randn(2, 50, 4), torch.ones(2, 50, dtype=torch.bool)
    quantizer(z, mask)  # k-means start
    with torch.no_grad():
        quantizer.codebook[4:] = 1e3  # 28 codes far from every latent: they never win
    quantizer.hits.zero_()
    before = [float(quantizer(z, mask)["usage"]) for _ in range(2)]  # steps 2 and 3
    after = float(quantizer(z, mask)["usage"])  # step 4 replaces the codes unused since step 1 first
    assert max(before) <= 4 / 32 and after > 0.5
    assert quantizer.codebook.abs().max() < 10


def test_backbone_weights_load_into_the_classifier_and_stay_frozen():
    torch.manual_seed(0)
    pretrain = shrink(load_job(ROOT / "jobs/omnijet-pretrain.yaml"))
    spec = shrink(load_job(ROOT / "jobs/omnijet-tau-tagging-frozen.yaml"))
    generator, classifier = build_model(pretrain), build_model(spec)
    pretrained = {k: v for k, v in generator.state_dict().items() if BACKBONE.match(k)}
    assert set(pretrained) == {k for k in classifier.state_dict() if BACKBONE.match(k)}  # every backbone key, no head
    assert not any(BACKBONE.match(k) for k in classifier.state_dict() if k.startswith("heads."))
    classifier.load_state_dict(pretrained, strict=False)  # what the engine does after build_model
    for name, param in classifier.named_parameters():
        param.requires_grad_(not any(re.match(p, name) for p in spec.training.freeze))
    heads_before = {k: v.clone() for k, v in classifier.state_dict().items() if k.startswith("heads.")}
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-2, weight_decay=0.01)
    batch = token_batch(32, 30, 24)
    for _ in range(3):
        optimizer.zero_grad()
        sum(losses(classifier(batch), batch, spec).values()).backward()
        optimizer.step()
    state = classifier.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pretrained.items())
    assert any(not torch.equal(state[k], v) for k, v in heads_before.items())


def test_loaded_tokenizer_is_not_reinitialised_by_its_first_training_batch():
    torch.manual_seed(0)
    spec = shrink(load_job(ROOT / "jobs/omnijet-tokenizer.yaml"))
    trained = build_model(spec)
    batch = jet_batch(make_jets(64))
    trained(batch)  # k-means start on the first training batch
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    fresh = build_model(spec)
    fresh.load_state_dict(state)
    fresh(batch)  # training mode, step 2 of replace_freq 10: no k-means, no replacement
    assert torch.equal(fresh.quantizer.codebook, state["quantizer.codebook"])


def test_stage_metrics_for_the_validation_of_tokenizer_and_backbone():
    from hepml_dist.models.omnijet.losses import omnijet_metrics

    spec = shrink(load_job(ROOT / "jobs/omnijet-tokenizer.yaml"))
    model = build_model(spec).eval()
    batch = jet_batch(make_jets(16))
    found = omnijet_metrics(model(batch), batch, spec)
    real = batch["mask"].sum()
    assert found["reconstruction_mse_part_pt"][1] == real and 0 < found["codebook_usage"][0] / found["codebook_usage"][1] <= 1
    spec = shrink(load_job(ROOT / "jobs/omnijet-pretrain.yaml"))
    batch = token_batch(16, 30, 24)
    correct, count = omnijet_metrics(build_model(spec).eval()(batch), batch, spec)["next_token_accuracy"]
    assert count == (batch["mask"][:, 0, 1:] > 0).sum() and 0 <= correct <= count
    assert omnijet_metrics({}, {}, shrink(load_job(ROOT / "jobs/omnijet-tau-tagging-frozen.yaml"))) is None


def _labels_for(spec, batch):
    return {k: v for k, v in batch.items() if k in ("tokens", "mask") or any(k in (t.label_key, t.only_where) or k.removeprefix("target_") in (t.targets or []) for t in spec.tasks)}


@pytest.mark.parametrize("job", OMNIJET_JOBS, ids=lambda p: p.stem)
def test_every_omnijet_job_builds_and_trains_a_few_steps(job):
    torch.manual_seed(0)
    spec = shrink(load_job(job))
    model = build_model(spec)
    if spec.training.init_from:  # pretrained backbone, then the job's freeze list
        donor = build_model(shrink(load_job(ROOT / "jobs/omnijet-pretrain.yaml")))
        model.load_state_dict({k: v for k, v in donor.state_dict().items() if any(re.match(p, k) for p in spec.training.init_modules)}, strict=False)
    for name, param in model.named_parameters():
        param.requires_grad_(not any(re.match(p, name) for p in spec.training.freeze))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if any(re.match(p, k) for p in spec.training.freeze)}
    batch = jet_batch(make_jets(16)) if spec.model.stage == "tokenizer" else _labels_for(spec, token_batch(16, 30, 24))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        task_losses = losses(model(batch), batch, spec)
        assert set(task_losses) == {t.name for t in spec.tasks} and all(torch.isfinite(v) for v in task_losses.values())
        optimizer.zero_grad()
        sum(task_losses.values()).backward()
        optimizer.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    if spec.training.phases:  # fine-tuning: after the frozen epochs everything trains
        for name, param in model.named_parameters():
            param.requires_grad_(any(re.match(p, name) for p in spec.training.phases[0].trainable))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sum(losses(model(batch), batch, spec).values()).backward()
        optimizer.step()
        assert any(not torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


def test_tokenizer_preprocessing_matches_the_loaders_feature_builder():
    from hepml_dist.data.features import build_batch, get_builder

    cols = make_jets(64, max_constituents=40, seed=4)
    ours, mask = constituent_features(cols, 40)
    loader = build_batch(cols, get_builder("omnijet_constituents"), max_length=40)
    assert (loader["mask"][:, 0] > 0).tolist() == mask.tolist()
    np.testing.assert_allclose(loader["features"], ours, atol=1e-4)


def test_tokenize_and_generate_commands_end_to_end(tmp_path):
    from hepml_dist.data.manifest import read_manifest
    from hepml_dist.data.reader import iter_shard_chunks
    from hepml_dist.data.stream import ShardStream
    from hepml_dist.data.writer import DatasetWriter

    runner = CliRunner()
    torch.manual_seed(0)
    tok_spec = shrink(load_job(ROOT / "jobs/omnijet-tokenizer.yaml"))
    tokenizer = build_model(tok_spec)
    tokenizer(jet_batch(make_jets(64)))  # initialise the codebook
    write_model_checkpoint(tmp_path / "tok/checkpoints/step-00000001", tok_spec, tokenizer.eval())
    jets = make_jets(120, seed=5)
    with DatasetWriter(tmp_path / "jets", schema="jets-test", splits=(0.75, 0.25, 0.0), chunk_size=16, chunks_per_shard=2) as writer:
        writer.add(jets)

    command = ["data", "tokenize", str(tmp_path / "tok"), "--data", str(tmp_path / "jets"), "--out", str(tmp_path / "tokens"), "--max-length", "24"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    source, manifest = read_manifest(tmp_path / "jets"), read_manifest(tmp_path / "tokens")
    assert {s: m.examples for s, m in manifest.splits.items()} == {s: m.examples for s, m in source.splits.items() if m.shards}
    assert manifest.meta["vocab_size"] == 32 and manifest.columns["tokens"].shape == [24] and "part_px" not in manifest.columns
    assert manifest.splits["train"].class_counts["label_is_tau"] == source.splits["train"].class_counts["label_is_tau"]
    again = runner.invoke(app, command)  # resumes: complete shards are kept, the manifest is the same
    assert again.exit_code == 0 and read_manifest(tmp_path / "tokens").to_dict() == manifest.to_dict()

    # the loader streams the token shards to the classifier; tokens agree with the tokenizer on the same jets
    spec = shrink(load_job(ROOT / "jobs/omnijet-tau-tagging-scratch.yaml"))
    data = spec.data.model_copy(update={"train": str(tmp_path / "tokens/train"), "batch_size": 16, "loader_workers": 0, "steps_per_epoch": 2, "inputs": spec.data.inputs.model_copy(update={"max_length": 24})})
    batch = next(iter(ShardStream(data, "train", rank=0, world_size=1, seed=0).batches(0)))
    tokens, mask = batch["tokens"], batch["mask"][:, 0] > 0
    assert tokens.shape == (16, 24) and (tokens[:, 0] == 0).all() and (tokens[mask.sum(1) > 0, mask.sum(1) - 1] == 31).all()
    assert all(torch.isfinite(v) for v in losses(build_model(spec)(batch), batch, spec).values())
    chunk = next(c for _, c in iter_shard_chunks(tmp_path / "tokens" / manifest.splits["train"].shards[0].path))
    source_chunk = next(c for _, c in iter_shard_chunks(tmp_path / "jets" / source.splits["train"].shards[0].path))
    expected_batch = jet_batch(source_chunk, 22)
    real = expected_batch["mask"][:, 0].numpy() > 0
    expected = tokenizer.tokenize(expected_batch["features"], torch.from_numpy(real)).numpy()
    codes, code_mask = tokens_to_codes(chunk["tokens"], 30)
    assert (code_mask[:, :22] == real).all() and not code_mask[:, 22:].any() and (codes[:, :22][real] == expected[real]).all()
    assert (chunk["label_is_tau"] == source_chunk["label_is_tau"]).all()

    gpt_spec = shrink(load_job(ROOT / "jobs/omnijet-pretrain.yaml"))
    gpt_spec = gpt_spec.model_copy(update={"data": gpt_spec.data.model_copy(update={"train": str(tmp_path / "tokens/train")})})
    write_model_checkpoint(tmp_path / "gpt/checkpoints/step-00000001", gpt_spec, build_model(gpt_spec))
    result = runner.invoke(app, ["sample", str(tmp_path / "gpt"), "--jets", "7", "--out", str(tmp_path / "gen.parquet")])
    assert result.exit_code == 0, result.output
    generated = ak.from_parquet(tmp_path / "gen.parquet")
    assert len(generated) == 7 and ak.all(ak.num(generated.part_pt) <= 22) and ak.all(generated.tokens[:, 0] == 0)
    assert ak.all(ak.num(generated.tokens) == ak.num(generated.part_pt) + 2) and ak.all(generated.tokens[:, -1] == 31)
    assert ak.all(generated.part_pt > 0) and ak.all(abs(generated.part_etarel) < 5)

    bad = runner.invoke(app, ["sample", str(tmp_path / "tok"), "--jets", "3"])
    assert bad.exit_code == 2 and "not an OmniJet backbone run" in bad.output
