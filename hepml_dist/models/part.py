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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.models.losses import task_losses
from hepml_dist.models.pairs import NUM_PAIR_FEATURES, pair_features
from hepml_dist.models.registry import ModelFamily, register_family
from hepml_dist.spec import JobSpec
from hepml_dist.spec.data import FEATURE_SETS
from hepml_dist.spec.model_part import HeadSpec, PartModelSpec
from hepml_dist.spec.tasks import TaskSpec

TRIM_WARMUP_CALLS = 5
STATIC_LENGTH_MULTIPLE = 16  # static_shapes: batch lengths 16, 32, ... (capped at the padded length)
TRIM_QUANTILE_RANGE = (0.9, 1.02)
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def masked_value(dtype: torch.dtype) -> float:
    # Half the most negative finite value: zero attention weight, yet no overflow to -inf when the scores are added.
    return -0.5 * torch.finfo(dtype).max


def key_padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, P] additive attention bias: 0 for real keys, a large negative value for padded ones."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, masked_value(dtype))
    return bias[:, None, None, :]


def masked_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """`norm` on rows x [N, C] as if only the rows where `counted` [N] (bool) is true had been passed (the others
    are normalised with the same statistics). In eval mode (running statistics) it is `norm(x)`.

    The statistics are two matrix-vector products and the normalisation one fused multiply-add: x can be
    millions of rows (every pair of a padded batch), where each elementwise pass costs as much as a matmul.
    Rows that are not counted must be finite (they get weight 0)."""
    if not norm.training:
        return norm(x)
    weight = counted.to(x.dtype)
    count = weight.sum()
    mean = (weight @ x) / count
    var = ((weight @ (x * x)) / count - mean * mean).clamp(min=0.0)
    with torch.no_grad():  # as nn.BatchNorm1d: exponential average (momentum), unbiased variance
        norm.num_batches_tracked.add_(1)
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * count / (count - 1).clamp(min=1), norm.momentum)
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    return torch.addcmul(norm.bias - mean * scale, x, scale)


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded [B, L] batch are: `index` into the flattened B * L positions (row-major).

    Per-token layers run on the packed rows [N, D] only; attention unpacks to [B, L, D], with zeros in the padding.
    """

    index: torch.Tensor
    batch: int
    length: int

    @staticmethod
    def of(mask: torch.Tensor) -> "Packing":
        return Packing(mask.reshape(-1).nonzero().squeeze(1), *mask.shape)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        dense = rows.new_zeros(self.batch * self.length, rows.shape[-1]).index_copy(0, self.index, rows)
        return dense.view(self.batch, self.length, -1)

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(self.batch * self.length, -1).index_select(0, self.index)


class ParticleEmbedding(nn.Module):
    """BatchNorm over the input channels, then [LayerNorm -> Linear -> GELU] per width (a GELU after the last too)."""

    def __init__(self, input_dim: int, dims: list[int]):
        super().__init__()
        self.input_bn = nn.BatchNorm1d(input_dim)
        layers: list[nn.Module] = []
        for dim in dims:
            layers += [nn.LayerNorm(input_dim), nn.Linear(input_dim, dim), nn.GELU()]
            input_dim = dim
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, mask: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """features [B, C, P], mask [B, P] (bool) -> the real particles' rows [N, D] with `packing`, else [B, P, D]
        with zeros in the padding (dense code: export and static shapes; BatchNorm statistics of real particles)."""
        x = features.transpose(1, 2)
        if packing is not None:  # BatchNorm statistics of real particles only
            return self.layers(self.input_bn(packing.pack(x)))
        x = masked_batch_norm(self.input_bn, x.reshape(-1, x.shape[-1]), mask.reshape(-1))
        x = self.layers(x).view(*mask.shape, -1)
        return x.masked_fill(~mask[..., None], 0.0)


class PairEmbedding(nn.Module):
    """Pair features -> BN -> [Linear -> BN -> GELU] per width -> Linear -> BN (-> GELU): one bias per head.

    The Linear layers act on pairs like weaver's 1x1 Conv1d (same parameters and default initialisation).
    """

    def __init__(self, dims: list[int], num_heads: int, pre_activation: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(NUM_PAIR_FEATURES)]
        input_dim = NUM_PAIR_FEATURES
        for dim in [*dims, num_heads]:
            layers += [nn.Linear(input_dim, dim), nn.BatchNorm1d(dim), nn.GELU()]
            input_dim = dim
        if pre_activation:  # Sophon: no activation after the last layer
            layers.pop()
        self.layers = nn.Sequential(*layers)
        self.num_heads = num_heads

    def forward(
        self, vectors: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, layout: str = "sparse"
    ) -> torch.Tensor:
        """vectors [B, 4, P], mask [B, P] -> U [B, H, P, P] in `dtype`; zero on pairs with a padded particle.

        `layout`: "sparse" embeds the real a >= b pairs (data-dependent count); "triangle" every a >= b pair of the
        padded batch (static shapes, for torch.compile); "square" every (a, b) pair (static, for the ONNX export,
        which cannot trace torch.tril_indices of a dynamic length)."""
        batch, length = mask.shape
        v = vectors.transpose(1, 2)
        if layout != "sparse":
            if layout == "triangle":
                rows, cols = torch.tril_indices(length, length, device=mask.device)
                pairs = pair_features(v[:, rows], v[:, cols], same=rows == cols)  # [B, T, 4]
                counted = mask[:, rows] & mask[:, cols]
            else:
                position = torch.arange(length, device=mask.device)
                itself = position[:, None] == position[None, :]  # (not torch.eye: ONNX Runtime has no bool EyeLike)
                pairs = pair_features(v[:, :, None, :], v[:, None, :, :], same=itself)
                # BatchNorm statistics over the pairs the sparse path embeds: real ones with a >= b
                counted = (mask[:, :, None] & mask[:, None, :]).tril()
            u = pairs.reshape(-1, NUM_PAIR_FEATURES)
            for layer in self.layers:
                u = masked_batch_norm(layer, u, counted.reshape(-1)) if isinstance(layer, nn.BatchNorm1d) else layer(u)
            if layout == "triangle":
                u = u.view(batch, -1, self.num_heads)
                square = u.new_zeros(batch, length, length, self.num_heads)
                square[:, rows, cols] = u
                square[:, cols, rows] = u
                u = square
            else:
                u = u.view(batch, length, length, -1)
            pair_mask = mask[:, :, None, None] & mask[:, None, :, None]
            return u.masked_fill(~pair_mask, 0.0).permute(0, 3, 1, 2).to(dtype)  # as the sparse path
        # The features are symmetric in (a, b): embed each real pair with a >= b once, then mirror it.
        pair_mask = (mask[:, :, None] & mask[:, None, :]).tril()
        b, i, j = pair_mask.nonzero(as_tuple=True)
        u = self.layers(pair_features(v[b, i], v[b, j])).to(dtype)
        out = u.new_zeros(batch, self.num_heads, length, length)
        out_view = out.permute(0, 2, 3, 1)
        out_view[b, i, j] = u
        out_view[b, j, i] = u
        return out


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` with an additive float bias."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor | None, bias: torch.Tensor, packing: Packing | None = None
    ) -> torch.Tensor:
        """query [B, Q, D] (or packed rows [N, D]); keys [B, K, D] (None: self-attention on query);
        bias broadcastable to [B, H, Q, K]."""
        if keys is None:
            qkv = self.in_proj(query)
            q, k, v = (packing.unpack(qkv) if packing is not None else qkv).chunk(3, dim=-1)
        else:
            dim = query.shape[-1]
            q = F.linear(query, self.in_proj.weight[:dim], self.in_proj.bias[:dim])
            k, v = F.linear(keys, self.in_proj.weight[dim:], self.in_proj.bias[dim:]).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).flatten(2)
        return self.out_proj(packing.pack(out) if packing is not None else out)


class Block(nn.Module):
    """ParT block: pre-LN attention with a per-"head" output scale and a post-attention LN; FFN with an inner LN and
    a learnable scale on its residual. With `cls` given it is a CaiT class-attention block (raw cls as query)."""

    def __init__(
        self, dim: int, num_heads: int, ffn_ratio: int, dropout: float, attn_dropout: float, activation_dropout: float
    ):
        super().__init__()
        self.num_heads = num_heads
        self.pre_attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_dropout)
        # Scales the out_proj output viewed as num_heads groups of channels (the reference's placement).
        self.c_attn = nn.Parameter(torch.ones(num_heads))
        self.post_attn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_fc_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * ffn_ratio)
        self.act = nn.GELU()
        self.act_dropout = nn.Dropout(activation_dropout)
        self.post_fc_norm = nn.LayerNorm(dim * ffn_ratio)
        self.fc2 = nn.Linear(dim * ffn_ratio, dim)
        self.w_resid = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, cls: torch.Tensor | None = None, packing: Packing | None = None
    ) -> torch.Tensor:
        """x [B, P, D], or the packed real particles [N, D] with `packing`; with `cls` [B, 1, D] returns the new cls."""
        if cls is None:
            residual = x
            h = self.attn(self.pre_attn_norm(x), None, bias, packing)
        else:
            residual = cls
            h = self.attn(cls, self.pre_attn_norm(torch.cat((cls, x), dim=1)), bias)
        h = (h.unflatten(-1, (self.num_heads, -1)) * self.c_attn[:, None]).flatten(-2)
        x = residual + self.dropout(self.post_attn_norm(h))
        f = self.fc2(self.post_fc_norm(self.act_dropout(self.act(self.fc1(self.pre_fc_norm(x))))))
        return self.w_resid * x + self.dropout(f)


class ClassAttentionPathway(nn.Module):
    """A learned class token refined by class-attention blocks over the particles, then a final LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: int, num_layers: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, ffn_ratio, 0.0, 0.0, 0.0) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cls_bias: torch.Tensor) -> torch.Tensor:
        """x [B, P, D], cls_bias [B, 1, 1, 1 + P] -> [B, D]."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            cls = block(x, cls_bias, cls=cls)
        return self.norm(cls.squeeze(1))


def make_head(in_dim: int, hidden: list[int], activation: str, dropout: float, out_dim: int) -> nn.Sequential:
    """[Linear -> activation -> Dropout] per hidden width, then Linear to the task's outputs (no dropout after it)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), ACTIVATIONS[activation](), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def task_head(head: HeadSpec, task: TaskSpec, in_dim: int) -> nn.Sequential:
    dropout = head.dropout if task.head_dropout is None else task.head_dropout
    return make_head(in_dim, head.hidden, head.activation, dropout, task.output_dim)


class ParticleTransformer(nn.Module):
    """ParT with one head per task. forward(batch) -> {task: logits [B, K] or regression values [B, T]}.

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
        self.heads = nn.ModuleDict({t.name: task_head(cfg.head, t, dim) for t in tasks})
        self.export_mode = False  # set by hepml_dist.models.export: dense, shape-static code, no trimming
        self.static_shapes = False  # set by the engine when it compiles the model (see the module docstring)
        self._trim_calls = 0
        init_weights(self, cfg.init)

    @torch.compiler.disable  # reads the batch's longest length: eager, so the compiled graphs around it see few shapes
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

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Particle representations [B, P', D] after the particle blocks, and the mask [B, P'] they go with."""
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
        return (packing.unpack(x) if packing is not None else x), mask

    def task_embeddings(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class-token embedding [B, D] after the final LayerNorm, per task (shared tasks share one tensor)."""
        x, mask = self.encode(batch)
        # The class token is one more key, never masked.
        cls_mask = torch.cat((mask.new_ones(mask.shape[0], 1), mask), dim=1)
        cls_bias = key_padding_bias(cls_mask, compute_dtype(x.device))
        embedded = {name: pathway(x, cls_bias) for name, pathway in self.pathways.items()}
        return {task: embedded[pathway] for task, pathway in self.pathway_of.items()}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {task: self.heads[task](cls) for task, cls in self.task_embeddings(batch).items()}


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


register_family(ModelFamily(name="part", build=build, losses=task_losses))
