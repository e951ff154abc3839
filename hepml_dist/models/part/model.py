"""Particle Transformer (ParT, arXiv:2202.03772) and its descendants Sophon, MultiParTau and SingleParTau.

The architecture follows weaver-core's ParticleTransformer (the 2022 paper model) exactly: particle embedding
BN + [LN -> Linear -> GELU] x 3; pair features (ln kT, ln z, ln Delta, ln m^2) embedded into one attention bias per
head that all particle blocks share; NormFormer-style particle blocks; CaiT class-attention blocks; final LN; MLP heads.
Parameter counts: JetClass 2,143,486, Sophon 2,304,688 (tests/test_models_part.py).

What differs from the reference code, and why (none of it changes the function computed in eval mode):
  * Attention is `F.scaled_dot_product_attention` with the pair bias and the padding mask folded into one float mask,
    built once per forward (fused kernels on GPUs). Masked keys get a large finite negative value rather than -inf,
    so a jet with no particles gives finite outputs instead of NaN.
  * Unpadding: the embedding and every per-particle layer of the blocks (projections, norms, FFN) run on the real
    particles only (`Packing`), attention unpacks them; the pair embedding runs on the real (a, b), a >= b pairs only
    (weaver's "sparse" path). BatchNorm statistics never see padding, so training does not depend on how much
    padding the loader added; the padded slots' states are never read (masked keys, zero in the unpacked tensor).
  * Each batch is compacted to its longest jet (real particles first); training-time trimming keeps the reference's
    SequenceTrimmer semantics (5 warm-up calls, then a random quantile q ~ U(0.9, 1.02) of the jet lengths).
  * `export_mode` switches to dense, shape-static code (all P x P pairs, no data-dependent lengths) for ONNX.
  * `static_shapes` (set when the engine compiles the model) runs per-position code with static shapes: every
    a >= b pair of the batch compacted to a multiple of STATIC_LENGTH_MULTIPLE, so torch.compile sees a handful of
    shapes instead of one per batch. Its BatchNorms take their training statistics over the real particles
    (pairs) only, so it trains like the packed code (tests/test_models_part.py, tests/test_compile.py).

Layout: batch-first everywhere; x is [B, P, D] (or packed [N, D]), the attention bias [B, H, P, P].
"""

import math

import torch
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.models.blocks import (
    Attention,
    Block,
    ClassAttentionPathway,
    Packing,
    ParticleEmbedding,
    compute_dtype,
    key_padding_bias,
    make_head,
    masked_value,
)
from hepml_dist.models.part.pairs import NUM_PAIR_FEATURES, PairEmbedding
from hepml_dist.models.part.particle_weights import ParticleWeightRegression
from hepml_dist.spec import JobSpec
from hepml_dist.spec.data import FEATURE_SETS
from hepml_dist.spec.model_part import HeadSpec, PartModelSpec
from hepml_dist.spec.tasks import TaskSpec

TRIM_WARMUP_CALLS = 5
STATIC_LENGTH_MULTIPLE = 16  # static_shapes: batch lengths 16, 32, ... (capped at the padded length)
TRIM_QUANTILE_RANGE = (0.9, 1.02)


def task_head(head: HeadSpec, task: TaskSpec, in_dim: int) -> nn.Sequential:
    dropout = head.dropout if task.head_dropout is None else task.head_dropout
    return make_head(in_dim, head.hidden, head.activation, dropout, task.output_dim)


class ParticleTransformer(nn.Module):
    """ParT with one head per task. forward(batch) -> {task: logits [B, K] or regression values [B, T]}.
    A regression task with `regress_from: particle_weights` has a `ParticleWeightRegression` (under
    `heads.<task>`), which also reads the particles and their four-vectors.

    Batch keys: `features` [B, C, P], `vectors` [B, 4, P] (px, py, pz, E), `mask` [B, 1, P] (1 = real particle).
    """

    def __init__(self, cfg: PartModelSpec, tasks: list[TaskSpec], input_dim: int):
        super().__init__()
        if cfg.pair_input_dim not in (0, NUM_PAIR_FEATURES):
            raise UserError(
                f"model.pair_input_dim: {cfg.pair_input_dim} is not supported; "
                "use 4 (ln kT, ln z, ln Delta, ln m^2) or 0 (no pair bias)"
            )
        dim = cfg.embed_dims[-1]
        self.input_dim, self.trim = input_dim, cfg.trim
        self.embed = ParticleEmbedding(input_dim, cfg.embed_dims)
        self.pair_embed = (
            PairEmbedding(cfg.pair_embed_dims, cfg.num_heads, cfg.use_pre_activation_pair) if cfg.pair_input_dim else None
        )
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.ffn_ratio, cfg.dropout, cfg.attn_dropout, cfg.activation_dropout)
            for _ in range(cfg.num_layers)
        )
        # Task-specific modules live under the task name (pathways.<task>, heads.<task>) so that lr multipliers and
        # freezing regexes can select them; a shared pathway is called "shared".
        names = [t.name for t in tasks] if cfg.task_pathways == "per_task" else ["shared"]
        self.pathways = nn.ModuleDict(
            {n: ClassAttentionPathway(dim, cfg.num_heads, cfg.ffn_ratio, cfg.num_cls_layers) for n in names}
        )
        self.pathway_of = {t.name: (t.name if cfg.task_pathways == "per_task" else "shared") for t in tasks}
        self.heads = nn.ModuleDict({
            t.name: ParticleWeightRegression(cfg.head, t, dim) if t.regress_from == "particle_weights"
            else task_head(cfg.head, t, dim)
            for t in tasks
        })
        self.reads_particles = {t.name for t in tasks if t.regress_from == "particle_weights"}
        self.export_mode = False  # set by hepml_dist.inference.export: dense, shape-static code, no trimming
        self.static_shapes = False  # use_static_shapes(): set by the engine when it compiles the model
        self._trim_calls = 0
        init_weights(self, cfg.init)
        for name in self.reads_particles:
            self.heads[name].reset_output_layers()

    def select_particles(self, features, vectors, mask):
        """Real particles first, cut to the longest jet; in training, the reference's random trimming."""
        n_real = mask.sum(dim=1)
        trimming = self.training and self.trim
        if trimming and self._trim_calls < TRIM_WARMUP_CALLS:
            self._trim_calls += 1
            trimming = False
        if trimming:
            q = torch.empty((), device=mask.device).uniform_(*TRIM_QUANTILE_RANGE).clamp_(max=1.0)
            length = torch.quantile(n_real.float(), q).long()
            # Random order of the real particles, so jets longer than `length` lose random particles.
            order = torch.rand(mask.shape, device=mask.device).masked_fill_(~mask, -1.0).argsort(dim=1, descending=True)
        else:
            length = n_real.max()
            order = mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)
        length = max(int(length), 1)
        if self.static_shapes:
            length = min(-(-length // STATIC_LENGTH_MULTIPLE) * STATIC_LENGTH_MULTIPLE, mask.shape[1])
        order = order[:, :length]
        gather = lambda t: t.gather(2, order[:, None, :].expand(-1, t.shape[1], -1))  # noqa: E731
        return gather(features), gather(vectors) if vectors is not None else None, mask.gather(1, order)

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Particle representations [B, P', D] after the particle blocks, the mask [B, P'] and the four-vectors
        [B, 4, P'] (None without vectors) of the particles they go with."""
        features, vectors = batch["features"], batch.get("vectors")
        if features.shape[1] != self.input_dim:
            raise ValueError(
                f"batch['features'] has {features.shape[1]} channels; this model was built for {self.input_dim}"
            )
        mask = batch["mask"][:, 0] > 0.5
        if not self.export_mode:
            features, vectors, mask = self.select_particles(features, vectors, mask)
        dtype = compute_dtype(features.device)
        # Per-particle layers run on the real particles only; attention sees them unpacked (export: all positions).
        dense = self.export_mode or self.static_shapes
        packing = None if dense else Packing.of(mask)
        x = self.embed(features, mask, packing)
        if self.pair_embed is not None:
            layout = "square" if self.export_mode else "triangle" if self.static_shapes else "sparse"
            bias = self.pair_embed(vectors, mask, dtype, layout=layout)
            bias = bias.masked_fill(~mask[:, None, None, :], masked_value(dtype))  # shared by every particle block
        else:
            bias = key_padding_bias(mask, dtype)
        for block in self.blocks:
            x = block(x, bias, packing=packing)
        return (packing.unpack(x) if packing is not None else x), mask, vectors

    def forward_with_embeddings(self, batch: dict[str, torch.Tensor]
                                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(outputs per task, class-token embedding [B, D] after the final LayerNorm per task); tasks that share a
        pathway share one embedding tensor."""
        x, mask, vectors = self.encode(batch)
        # The class token is one more key, never masked.
        cls_mask = torch.cat((mask.new_ones(mask.shape[0], 1), mask), dim=1)
        cls_bias = key_padding_bias(cls_mask, compute_dtype(x.device))
        embedded = {name: pathway(x, cls_bias) for name, pathway in self.pathways.items()}
        embeddings = {task: embedded[pathway] for task, pathway in self.pathway_of.items()}
        if self.reads_particles and vectors is None:
            raise ValueError(f"tasks {sorted(self.reads_particles)} regress from particle weights and need "
                             "batch['vectors']")
        # the jet: every particle of the batch, before trimming
        jet = (batch["vectors"] * (batch["mask"] > 0.5)).sum(dim=2) if self.reads_particles else None
        outputs = {
            task: self.heads[task](cls, x, mask, vectors, jet) if task in self.reads_particles
            else self.heads[task](cls)
            for task, cls in embeddings.items()
        }
        return outputs, embeddings

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.forward_with_embeddings(batch)[0]


def init_weights(model: nn.Module, mode: str) -> None:
    """`default`: PyTorch's initialisation, with the attention initialised like nn.MultiheadAttention (the 2022 model).
    `moco`: weaver-core's since 2024 (Sophon): Xavier-uniform Linear layers, Q, K and V as separate matrices, zero
    biases, then the out_proj and fc2 weights of particle block l divided by sqrt(2 l). The pair embedding keeps the
    default, as weaver's 1x1 convolutions do."""
    for name, module in model.named_modules():
        if isinstance(module, Attention) and mode == "default":
            nn.init.xavier_uniform_(module.in_proj.weight)
            nn.init.zeros_(module.in_proj.bias)
            nn.init.zeros_(module.out_proj.bias)
        elif isinstance(module, nn.Linear) and mode == "moco" and not name.startswith("pair_embed"):
            if name.endswith("in_proj"):
                for part in module.weight.chunk(3, dim=0):
                    nn.init.xavier_uniform_(part)
            else:
                nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    if mode == "moco":
        with torch.no_grad():
            for layer, block in enumerate(model.blocks, start=1):
                block.attn.out_proj.weight.div_(math.sqrt(2.0 * layer))
                block.fc2.weight.div_(math.sqrt(2.0 * layer))


def state_dict_from_weaver(state: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """weaver-core ParticleTransformer weights -> this model's names (shared pathway, one task named `task`).

    Reads the published checkpoints of jet-universe/particle_transformer (`models/ParT_*.pt`: the `mod.` prefix of
    its wrapper, nn.MultiheadAttention's `in_proj_weight`) and weaver-core's own; pair 1x1 convolutions become Linear.
    """
    renames = {"embed.embed.": "embed.layers.", "pair_embed.embed.": "pair_embed.layers.",
               "cls_token": "pathways.shared.cls_token", "cls_blocks.": "pathways.shared.blocks.",
               "norm.": "pathways.shared.norm."}
    out = {}
    for name, value in state.items():
        name = name.removeprefix("mod.").replace(".in_proj_weight", ".in_proj.weight")
        name = name.replace(".in_proj_bias", ".in_proj.bias")
        if "trimmer" in name:
            continue
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith("pair_embed.layers.") and value.dim() == 3:
            value = value.squeeze(-1)
        if name.startswith("fc."):  # fc.<k>.0.<leaf> (hidden: Linear, act, Dropout) or fc.<k>.<leaf> (output)
            parts = name.split(".")
            name = f"heads.{task}.{3 * int(parts[1])}.{parts[-1]}"
        out[name] = value
    return out


def build(spec: JobSpec) -> ParticleTransformer:
    return ParticleTransformer(spec.model, spec.tasks, FEATURE_SETS[spec.data.inputs.features])


def use_static_shapes(model: ParticleTransformer) -> None:
    """Switch to the static-shape code before torch.compile (see the module docstring). `select_particles` reads the
    batch's longest length, so it stays eager and the compiled graphs around it see few shapes; wrapped here rather
    than decorated, because the decorator imports torch._dynamo (and sympy), ~2 s of every training worker's start."""
    model.static_shapes = True
    if not hasattr(model.select_particles, "__wrapped__"):
        model.select_particles = torch.compiler.disable(model.select_particles)
