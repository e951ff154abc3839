"""OmniJet-alpha (arXiv:2403.05618): the VQ-VAE constituent tokenizer, the GPT backbone and its task heads.

One family, three stages (`spec.model.stage`), each a model of its own:

| stage | batch in | outputs |
|---|---|---|
| tokenizer | `features [B,C,P]`, `mask [B,1,P]` | `{task: reconstruction [B,P,C]}` + `aux_vq_loss`, `aux_codebook_*` |
| backbone | `tokens [B,L]`, `mask [B,1,L]` | `{task: next-token logits [B,L-1,V]}` (position t predicts token t+1) |
| classifier | `tokens [B,L]`, `mask [B,1,L]` | `{task: [B, task.output_dim]}` per task |

Tokens: start 0, codebook index c -> c + 1, stop K + 1, padding 0 (masked), vocabulary V = K + 2.
In the backbone and classifier stages the GPT lives under `backbone.*` and every task head under `heads.<task>.*`,
so `^backbone\\.` selects exactly the pretrained part. All initialisation happens in the constructors; the only
data-dependent state is the codebook's k-means start, flagged by the `quantizer.initialised` buffer, so weights
loaded after construction (`training.init_from`) are never overwritten.
"""

import torch
import torch.nn.functional as F
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.models.blocks import CrossRankState, MultiHeadAttention, nonempty_key_mask
from hepml_dist.spec import JobSpec
from hepml_dist.spec.model_omnijet import BackboneSpec, OmniHeadSpec, TokenizerSpec
from hepml_dist.spec.tasks import TaskSpec

START_TOKEN = 0


def vocab_size(codebook_size: int) -> int:
    """Codebook entries plus the start and stop tokens."""
    return codebook_size + 2


class NormFormerBlock(nn.Module):
    """NormFormer block of the tokenizer; the zero-initialised LN1 gain and last MLP layer make it start as identity."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm_attn_in = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, dropout)
        self.norm_attn_out = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        nn.init.zeros_(self.norm_attn_in.weight)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x * mask[..., None]
        x = self.norm_attn_out(self.attn(self.norm_attn_in(x), key_mask)) + x
        return self.mlp(x) + x


class VectorQuantizer(CrossRankState):
    """Nearest-neighbour codebook with an affine reparametrisation, k-means start and dead-code replacement.

    Loss (vqtorch convention): (1 - beta) |z - sg(q)|^2 + beta |sg(z) - q|^2, so beta weights the codebook term.
    Straight-through with sync: the output has the value q and passes gradient 1 to z and `sync_nu` to q.
    The k-means start and the dead-code refresh edit the codebook in place from each rank's own batch: rank 0's
    result is shared through `self.collectives` (a CrossRankState), so the replicas never drift apart.
    """

    def __init__(self, cfg: TokenizerSpec):
        super().__init__()
        self.beta, self.sync_nu = cfg.vq_beta, cfg.sync_nu
        self.replace_freq, self.kmeans_iters = cfg.replace_freq, cfg.kmeans_iters
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, cfg.latent_dim))
        self.affine_scale = nn.Parameter(torch.ones(cfg.latent_dim))
        self.affine_shift = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("hits", torch.zeros(cfg.codebook_size))  # per code, since the last replacement
        self.register_buffer("steps", torch.tensor(0))

    def vectors(self) -> torch.Tensor:
        return self.codebook * self.affine_scale + self.affine_shift

    def _store(self, rows: torch.Tensor, vectors: torch.Tensor) -> None:
        """Write effective codebook vectors into `rows` (a bool mask or all), undoing the affine transform."""
        with torch.no_grad():
            self.codebook[rows] = (vectors - self.affine_shift) / self.affine_scale

    @staticmethod
    def nearest(z: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the closest codebook vector for each row of z, in chunks of bounded memory."""
        chunk = max(1, 2**24 // vectors.shape[0])
        if not len(z):
            return z.new_zeros(0, dtype=torch.long)
        return torch.cat([torch.cdist(part, vectors).argmin(dim=1) for part in z.split(chunk)])

    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor) -> None:
        num_codes = self.codebook.shape[0]
        if len(z):
            if len(z) >= num_codes:
                pick = torch.randperm(len(z), device=z.device)[:num_codes]
            else:
                pick = torch.randint(len(z), (num_codes,), device=z.device)
            centroids = z[pick] + 0.01 * z.std(dim=0) * torch.randn(num_codes, z.shape[1], device=z.device)
            for _ in range(self.kmeans_iters):
                codes = self.nearest(z, centroids)
                counts = torch.bincount(codes, minlength=num_codes)
                sums = torch.zeros_like(centroids).index_add_(0, codes, z)
                filled = counts > 0
                centroids[filled] = sums[filled] / counts[filled, None]
            self._store(slice(None), centroids)
        self.collectives.broadcast_from_rank0(self.codebook.data)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _replace_dead_codes(self, z: torch.Tensor) -> None:
        dead = self.collectives.all_reduce_sum(self.hits.clone()) == 0
        if len(z) and dead.any():
            pick = torch.randint(len(z), (int(dead.sum()),), device=z.device)
            self._store(dead, z[pick] + 0.01 * z.std(dim=0) * torch.randn(len(pick), z.shape[1], device=z.device))
        self.collectives.broadcast_from_rank0(self.codebook.data)
        self.hits.zero_()

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """z: latents [B, P, D]; mask: bool [B, P]. Only real constituents are quantised and counted."""
        flat = z[mask]
        # Codebook edits happen before the codebook enters this step's graph (editing it afterwards breaks backward).
        if self.training and not bool(self.initialised):
            self._kmeans_init(flat.detach())
        elif self.training and self.replace_freq and int(self.steps) and int(self.steps) % self.replace_freq == 0:
            self._replace_dead_codes(flat.detach())
        vectors = self.vectors()
        codes = self.nearest(flat.detach(), vectors.detach())
        quantised = vectors[codes]
        loss = (1 - self.beta) * F.mse_loss(flat, quantised.detach()) + self.beta * F.mse_loss(flat.detach(), quantised)
        flat_out = flat + (quantised - flat).detach() + self.sync_nu * quantised - (self.sync_nu * quantised).detach()
        counts = torch.bincount(codes, minlength=len(vectors)).float()
        if self.training:
            self.hits += counts
            self.steps += 1
        out = z.new_zeros(z.shape).masked_scatter(mask[..., None], flat_out)
        probs = counts / counts.sum().clamp(min=1)
        return {
            "quantised": out,
            "codes": torch.zeros(mask.shape, dtype=torch.long, device=z.device).masked_scatter(mask, codes),
            "loss": loss if len(flat) else z.sum() * 0,
            "usage": (counts > 0).float().mean(),
            "perplexity": torch.exp(-(probs * probs.clamp(min=1e-12).log()).sum()),
        }


class Tokenizer(nn.Module):
    """VQ-VAE over the constituents of a jet: NormFormer encoder -> codebook -> NormFormer decoder."""

    def __init__(self, cfg: TokenizerSpec, task: str = "reconstruction"):
        super().__init__()
        self.task = task
        dim = cfg.hidden_dim
        self.input_proj = nn.Linear(cfg.input_dim, dim)
        self.encoder = nn.ModuleList(NormFormerBlock(dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks))
        self.to_latent = nn.Linear(dim, cfg.latent_dim)
        self.quantizer = VectorQuantizer(cfg)
        self.from_latent = nn.Linear(cfg.latent_dim, dim)
        self.decoder = nn.ModuleList(NormFormerBlock(dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks))
        self.output_proj = nn.Linear(dim, cfg.input_dim)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latents [B, P, D] of constituents x [B, P, C]."""
        keys = nonempty_key_mask(mask)
        h = self.input_proj(x)
        for block in self.encoder:
            h = block(h, mask, keys)
        return self.to_latent(h) * mask[..., None]

    def decode(self, quantised: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Constituents [B, P, C] from quantised latents; the decoder sees the whole jet (conditional decoding)."""
        keys = nonempty_key_mask(mask)
        h = self.from_latent(quantised) * mask[..., None]
        for block in self.decoder:
            h = block(h, mask, keys)
        return self.output_proj(h) * mask[..., None]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["mask"][:, 0] > 0
        vq = self.quantizer(self.encode(batch["features"].transpose(1, 2), mask), mask)
        return {
            self.task: self.decode(vq["quantised"], mask),
            "aux_vq_loss": vq["loss"],
            "aux_codebook_usage": vq["usage"],
            "aux_codebook_perplexity": vq["perplexity"],
        }

    @torch.no_grad()
    def tokenize(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Codebook indices [B, P] (0 in padding) of constituents features [B, C, P], mask bool [B, P]."""
        return self.quantizer(self.encode(features.transpose(1, 2), mask), mask)["codes"]

    @torch.no_grad()
    def detokenize(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Constituent features [B, C, P] (preprocessed units) decoded from codebook indices [B, P]."""
        vectors = self.quantizer.vectors()[codes] * mask[..., None]
        return self.decode(vectors, mask).transpose(1, 2)


class GptBlock(nn.Module):
    """Post-LN causal decoder block as in the reference: x = LN1(x + MHA(x)); x = LN2(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.attn = MultiHeadAttention(dim, num_heads, dropout, qkv_bias=False)
        self.norm_attn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm_attn(x + self.attn(x, key_mask, causal=True))
        return self.norm_ffn(x + self.ffn(x))


class Backbone(nn.Module):
    """The OmniJet-alpha GPT: token embedding (no positional embedding; the causal mask orders the tokens) + blocks."""

    def __init__(self, cfg: BackboneSpec, codebook_size: int):
        super().__init__()
        self.max_sequence_length = cfg.max_sequence_length
        self.embedding = nn.Embedding(vocab_size(codebook_size), cfg.embedding_dim)
        self.blocks = nn.ModuleList(GptBlock(cfg.embedding_dim, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token embeddings [B, L, D] of tokens [B, L] with mask bool [B, L] (the start token is always real)."""
        if tokens.shape[1] > self.max_sequence_length:
            raise ValueError(
                f"token sequences of length {tokens.shape[1]} exceed "
                f"model.backbone.max_sequence_length={self.max_sequence_length}"
            )
        h = self.embedding(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return h


class SummationHead(nn.Module):
    """Per-token MLP, masked sum over tokens (not a mean, as the reference), linear output."""

    def __init__(self, dim: int, cfg: OmniHeadSpec, out_dim: int, dropout: float):
        super().__init__()
        self.token_mlp = nn.Sequential(nn.Linear(dim, cfg.hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.out = nn.Linear(cfg.hidden_dim, out_dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out((self.token_mlp(h) * mask[..., None]).sum(dim=1))


class ClassAttentionHead(nn.Module):
    """A class token replaced, block by block, by its cross-attention over the normalised tokens; then an MLP."""

    def __init__(self, dim: int, cfg: OmniHeadSpec, out_dim: int, dropout: float):
        super().__init__()
        if dim % cfg.num_heads:
            raise UserError(f"model.head.num_heads={cfg.num_heads} does not divide model.backbone.embedding_dim={dim}")
        self.class_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, dim), std=0.02))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(cfg.num_blocks))
        self.attns = nn.ModuleList(MultiHeadAttention(dim, cfg.num_heads, dropout) for _ in range(cfg.num_blocks))
        hidden = cfg.hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )  # fmt: skip

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cls = self.class_token.expand(len(h), -1, -1)
        for norm, attn in zip(self.norms, self.attns):
            cls = attn(cls, mask, context=norm(h))
        return self.mlp(cls[:, 0])


HEADS = {"summation": SummationHead, "class_attention": ClassAttentionHead}


def _token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["mask"][:, 0] > 0


class Generator(nn.Module):
    """Backbone stage: the GPT with a linear next-token head, trained by next-token prediction and used to sample jets."""

    def __init__(self, cfg: BackboneSpec, codebook_size: int, task: str):
        super().__init__()
        self.task = task
        self.codebook_size = codebook_size
        self.backbone = Backbone(cfg, codebook_size)
        self.heads = nn.ModuleDict({task: nn.Linear(cfg.embedding_dim, vocab_size(codebook_size))})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens, mask = batch["tokens"], _token_mask(batch)
        return {self.task: self.heads[self.task](self.backbone(tokens[:, :-1], mask[:, :-1]))}

    @torch.no_grad()
    def sample(
        self, num: int, max_length: int | None = None, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Token sequences [num, <= max_length]: start, codes, stop, then padding (0).

        The start token is never sampled (its logit is dropped, as in the reference). A sequence that reaches
        max_length - 1 tokens without drawing the stop token is closed with one, so every sample has the form of
        the training sequences (at most max_length - 2 constituents).
        """
        max_length = min(max_length or self.backbone.max_sequence_length, self.backbone.max_sequence_length)
        device = self.backbone.embedding.weight.device
        stop = self.codebook_size + 1
        tokens = torch.full((num, 1), START_TOKEN, dtype=torch.long, device=device)
        done = torch.zeros(num, dtype=torch.bool, device=device)
        for _ in range(max_length - 2):
            logits = self.heads[self.task](self.backbone(tokens, torch.ones_like(tokens, dtype=torch.bool)))[:, -1, 1:]
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0] + 1
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == stop
            if bool(done.all()):
                return tokens
        return torch.cat([tokens, torch.where(done, 0, stop)[:, None]], dim=1)


class Classifier(nn.Module):
    """Classifier stage: the (pretrained or fresh) backbone, causal mask kept on, with one head per task."""

    def __init__(self, spec: JobSpec):
        super().__init__()
        m = spec.model
        self.backbone = Backbone(m.backbone, m.tokenizer.codebook_size)
        head = HEADS[m.head.kind]
        dropout = {t.name: m.head.dropout if t.head_dropout is None else t.head_dropout for t in spec.tasks}
        dim = m.backbone.embedding_dim
        self.heads = nn.ModuleDict({t.name: head(dim, m.head, t.output_dim, dropout[t.name]) for t in spec.tasks})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = _token_mask(batch)
        h = self.backbone(batch["tokens"], mask)
        return {name: head(h, mask) for name, head in self.heads.items()}


def _single_task(spec: JobSpec, kind: str, stage: str) -> TaskSpec:
    if len(spec.tasks) != 1 or spec.tasks[0].kind != kind:
        names = [t.name for t in spec.tasks]
        raise UserError(f"{spec.name}: the omnijet {stage} stage trains exactly one {kind} task (tasks: {names})")
    return spec.tasks[0]


def build_tokenizer(spec: JobSpec) -> nn.Module:
    task = _single_task(spec, "regression", "tokenizer")
    if len(task.targets or []) != spec.model.tokenizer.input_dim:
        raise UserError(
            f"tasks[0].targets lists {len(task.targets or [])} features "
            f"but model.tokenizer.input_dim is {spec.model.tokenizer.input_dim}"
        )
    return Tokenizer(spec.model.tokenizer, task.name)


def build_generator(spec: JobSpec) -> nn.Module:
    task = _single_task(spec, "multiclass", "backbone")
    vocab = vocab_size(spec.model.tokenizer.codebook_size)
    if task.output_dim != vocab:
        raise UserError(
            f"tasks[0] has {task.output_dim} classes but the vocabulary is model.tokenizer.codebook_size + 2 = {vocab}"
        )
    return Generator(spec.model.backbone, spec.model.tokenizer.codebook_size, task.name)


STAGES = {"tokenizer": build_tokenizer, "backbone": build_generator, "classifier": Classifier}


def build(spec: JobSpec) -> nn.Module:
    return STAGES[spec.model.stage](spec)
