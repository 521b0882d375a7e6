"""ATHWE: Adaptive Time-aware Hierarchical Wavelet Expert (multimodal sequential recommender).

The model of specs/athwe.md, one block per step of its forward pass:

1. per-modality inputs (ID embedding, projected text, projected image) plus one shared position
   embedding; padded positions are zeroed (only real items carry signal into the wavelets);
2. ``WaveletAlign``: a J-level DWT (pytorch-wavelets, db4, zero mode) of every modality along the
   sequence; each target modality's low band and detail bands are gated sums of all modalities'
   bands; the inverse transform, cropped to L (any L works), is mixed in with a learned weight;
3. gap-based time encoding: bucket = round(span (1 - exp(-dt / scale))) of the gap to the previous
   real item (1 for the first, 0 for padding), embedded;
4. ``SparseMoE``: 1 shared + top-k of E routed experts (registered parameters), routed by the time
   embedding (``time_routing: false`` routes on the fused content itself, the reference's
   fallback), with a diversity loss on the routed experts' outputs;
5. per-modality LayerNorm -> Dropout -> SASRec blocks (causal + padding mask), last position;
6. scores = [w_id s_id, w_t s_t, w_v s_v] . [E_id, P_t T, P_v V] with w = softmax(a): the query and
   item vectors' inner product, so one inner-product index reproduces the ranking exactly.

``forward`` runs these steps and returns an ``ATHWEOutput``. ``loss`` runs it once (with the
temporal-contrast views) and adds to the ranking loss (CE or BCE of the query against the item
vectors): ID contrastive (InfoNCE, same-target rows out of the denominator), category prediction and
cluster pseudo-label CE over exactly the valid input positions, temporal contrastive (floor(len *
beta) random valid positions of the text/image streams replaced by a time placeholder), and the
expert diversity loss; each weighted by the config.

Items without a feature (mask False) use a learned "missing" vector in place of their projected
feature and are never cluster targets; items with no category are not CP targets, and without
category features at all the CP term is off. The feature tables are buffers that are not saved;
the checkpoint records their fingerprint and refuses to load onto other features. Fixes of the
reference (specs/athwe.md): experts are registered, CP/cluster losses use a flattened mask, TCL
masks floor(len * beta) positions, no hard-coded device, K-medoids memory-bounded and cached.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from athwe.dataset.sequences import format_seconds
from athwe.dataset.split import Batch, SampleSet
from athwe.errors import AthweError, ConfigError
from athwe.models.base import EncoderConfig, SequentialRecommender, register_model
from athwe.models.layers import (Dropout, Tokens, TransformerBlock, attention_mask, init_weights, lookup,
                                 ranking_loss)

MODALITIES = ("id", "text", "image")
FEATURE_MODALITIES = ("text", "image")
#: the reference's gap scale in seconds (months: suited to review data)
REFERENCE_TIME_SCALE = 1.5e7
#: time_scale "auto" is this quantile of the positive training gaps: a gap at it lands in bucket
#: round(span (1 - 1/e)), 126 of 200, so the bulk of the gaps spreads over the lower buckets and the
#: long tail over the rest. (The median would push every gap a few times longer than typical into the
#: top bucket: on the demo, whose gap kinds are minutes-hours, days and weeks, it merges the last two.)
AUTO_TIME_QUANTILE = 0.9
#: settings that change nothing while ``moe`` is false: they only shape the experts, their routing
#: and the diversity loss, none of which is built then
MOE_ONLY_KEYS = ("time_routing", "routed_experts", "moe_topk", "shared_experts", "expert_init_std",
                 "cosine_lambda", "diversity_weight")


@dataclass
class ATHWEConfig(EncoderConfig):
    #: any non-empty subset of id, text, image (always used in that order)
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    #: initial wavelet residual weight per modality, in the order id, text, image
    initializer_weight: list[float] = field(default_factory=lambda: [0.1, 1.0, 1.0])
    wavelet: bool = True
    wavelet_name: str = "db4"
    wavelet_J: int = 4
    moe: bool = True
    #: route experts by the time embedding; false = by the fused content itself
    time_routing: bool = True
    routed_experts: int = 8
    moe_topk: int = 6
    shared_experts: int = 1
    expert_init_std: float = 0.1
    cosine_lambda: float = 1.0
    diversity_weight: float = 0.9
    time_span: int = 200
    #: seconds; "auto": the AUTO_TIME_QUANTILE (90%) quantile of the positive gaps in the training
    #: data (resolved in `prepare`, saved with the model)
    time_scale: float | str = REFERENCE_TIME_SCALE
    temperature: float = 0.1
    idcl_weight: float = 1.0
    cp_weight: float = 1.0
    cluster_weight: float = 1.0
    n_clusters: int = 100
    cluster_seed: int = 2025
    cluster_sample: int = 4000
    beta: float = 0.2
    phcl_temperature: float = 1.0
    phcl_weight: float = 1.0

    @staticmethod
    def unused_keys(values: dict[str, Any]) -> set[str]:
        """The keys of `values` (model settings, defaults left out or not) that cannot change what
        the model computes given the others: the expert settings while ``moe`` is false."""
        return set(MOE_ONLY_KEYS) & set(values) if values.get("moe", True) is False else set()

    def __post_init__(self) -> None:
        super().__post_init__()
        ts = self.time_scale
        if isinstance(ts, str) and ts != "auto":
            try:
                ts = float(ts)
            except ValueError:
                raise ConfigError(f"athwe: time_scale must be a number of seconds or 'auto', got {ts!r}") from None
        if isinstance(ts, bool) or not isinstance(ts, (int, float, str)):
            raise ConfigError(f"athwe: time_scale must be a number of seconds or 'auto', got {ts!r}")
        self.time_scale = ts if isinstance(ts, str) else float(ts)
        mods = list(self.modalities) if isinstance(self.modalities, (list, tuple)) else None
        if not mods or len(set(mods)) != len(mods) or any(m not in MODALITIES for m in mods):
            raise ConfigError(f"athwe: modalities must be a non-empty subset of {list(MODALITIES)}, "
                              f"got {self.modalities!r}")
        self.modalities = mods
        iw = self.initializer_weight
        if not isinstance(iw, (list, tuple)) or len(iw) != 3 or not all(isinstance(v, (int, float)) for v in iw):
            raise ConfigError(f"athwe: initializer_weight must be 3 numbers (id, text, image), got {iw!r}")
        self.initializer_weight = [float(v) for v in iw]
        if self.wavelet_J < 1:
            raise ConfigError(f"athwe: wavelet_J must be >= 1, got {self.wavelet_J}")
        if self.routed_experts < 1 or not 1 <= self.moe_topk <= self.routed_experts or self.shared_experts < 0:
            raise ConfigError(f"athwe: need 1 <= moe_topk ({self.moe_topk}) <= routed_experts ({self.routed_experts}) "
                              f"and shared_experts >= 0 ({self.shared_experts})")
        if self.time_span < 1 or (self.time_scale != "auto" and self.time_scale <= 0):
            raise ConfigError(f"athwe: time_span must be >= 1 and time_scale > 0, "
                              f"got {self.time_span}, {self.time_scale}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"athwe: beta must be in [0, 1], got {self.beta}")
        if self.copy_first_block:
            raise ConfigError("athwe: copy_first_block does not apply (its encoders' blocks have no parameters "
                              "the weight init leaves alone)")
        if self.temperature <= 0 or self.phcl_temperature <= 0:
            raise ConfigError("athwe: temperature and phcl_temperature must be > 0")
        if self.n_clusters < 1 or self.cluster_sample < 2:
            raise ConfigError("athwe: n_clusters must be >= 1 and cluster_sample >= 2")
        for name in ("idcl_weight", "cp_weight", "cluster_weight", "phcl_weight", "diversity_weight", "cosine_lambda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"athwe: {name} must be >= 0, got {getattr(self, name)}")


class FeatureSetLike(Protocol):
    """What the model reads from a feature store entry (athwe.feature_extraction.store.FeatureSet):
    float32 tables with row i = internal item i and row 0 = padding."""

    text: torch.Tensor | None
    image: torch.Tensor | None
    cat: torch.Tensor | None
    text_mask: torch.Tensor | None
    image_mask: torch.Tensor | None
    fingerprint: str


def time_buckets(timestamps: torch.Tensor, valid: torch.Tensor, span: int, scale: float) -> torch.Tensor:
    """(B, L) int64 gap buckets: dt = max(t_i - t_{i-1}, 0) after a real item, 1 after padding
    (the first item), 0 at padding; bucket = round(span (1 - exp(-dt / scale))) in [0, span]."""
    t = timestamps.double()
    prev_valid = F.pad(valid[:, :-1], (1, 0), value=False)
    gap = (t - F.pad(t[:, :-1], (1, 0))).clamp(min=0.0)
    dt = torch.where(prev_valid, gap, torch.ones_like(gap)) * valid
    return torch.round(span * (1.0 - torch.exp(-dt / scale))).long()


def info_nce(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of (a_i, b_i) against b_j, cosine / temperature; other rows with the same target
    are left out of the denominator (they are not negatives)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / temperature
    same = target.unsqueeze(1) == target.unsqueeze(0)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def tcl_mask(valid: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, L) bool: floor(len * beta) distinct random valid positions per row (global torch RNG)."""
    lengths = valid.sum(1)
    count = torch.floor(lengths.double() * beta + 1e-9).long()
    r = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
    rank = r.argsort(1).argsort(1)
    return (rank < count.unsqueeze(1)) & valid


def _wavelet_modules(levels: int, wave: str) -> tuple[nn.Module, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-wavelets imports the deprecated pkg_resources
        from pytorch_wavelets import DWT1DForward, DWT1DInverse
    try:
        return DWT1DForward(J=levels, wave=wave, mode="zero"), DWT1DInverse(wave=wave, mode="zero")
    except ValueError as e:
        raise ConfigError(f"athwe: unknown wavelet {wave!r} ({e})") from None


class WaveletAlign(nn.Module):
    """AlignWaveletFusion: x_m <- x_m + w_m (IDWT(fused bands of m)[:L] - x_m), where band k of
    target m is sum_s sigmoid(W[k, m, s] c_{s,k}) * c_{s,k} over source modalities s (bias-free
    H x H gates, k = low band and each of the J detail levels).

    The transforms are pytorch-wavelets' DWT1DForward / DWT1DInverse (zero mode). Both are linear
    along the sequence, so for each length L they are evaluated once on a basis and then applied
    as two small matrices (identical values; the library's strided grouped convolutions cost
    several times the rest of the model on CPU)."""

    def __init__(self, n_mod: int, hidden: int, levels: int, wave: str, init_weight: list[float], std: float):
        super().__init__()
        self.dwt, self.idwt = _wavelet_modules(levels, wave)
        self.n_mod, self.hidden = n_mod, hidden
        # gates[k, target, source] is the (out, in) weight of a bias-free Linear(H, H)
        self.gates = nn.Parameter(torch.empty(levels + 1, n_mod, n_mod, hidden, hidden).normal_(0.0, std))
        self.weight = nn.Parameter(torch.tensor(init_weight, dtype=torch.float32))
        self._operators: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}

    def operators(self, n: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(analysis (L, T), synthesis (T, L), band lengths) of the J-level transform for length L:
        coefficients = x @ analysis, split into [low, detail_1, ..., detail_J]; IDWT(...)[:L] =
        coefficients @ synthesis. Built outside inference mode, so a first call while evaluating
        does not leave inference tensors that training could not use."""
        key = (n, str(device), dtype)
        if key not in self._operators:
            with torch.inference_mode(False), torch.no_grad():
                self._operators[key] = self._build_operators(n, device, dtype)
        return self._operators[key]

    def _build_operators(self, n: int, device: torch.device,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        dwt, idwt = copy.deepcopy(self.dwt).cpu().double(), copy.deepcopy(self.idwt).cpu().double()
        low, highs = dwt(torch.eye(n, dtype=torch.float64).unsqueeze(1))
        bands = [low, *highs]
        sizes = [b.shape[-1] for b in bands]
        analysis = torch.cat([b[:, 0] for b in bands], 1)  # (L, T)
        basis = torch.eye(sum(sizes), dtype=torch.float64).unsqueeze(1)
        parts = list(basis.split(sizes, dim=-1))
        rec = idwt((parts[0], parts[1:]))[:, 0]  # (T, L')
        rec = rec[:, :n] if rec.shape[-1] >= n else F.pad(rec, (0, n - rec.shape[-1]))
        return analysis.to(device, dtype), rec.contiguous().to(device, dtype), sizes

    def window_operators(self, n: int, window: int, device: torch.device,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The operators of `operators` for inputs that are zero outside their last `window` of L
        columns, whose output is read there only: analysis (window, T_w) and synthesis (T_w, window)
        over the T_w coefficients whose filters reach those columns (every other coefficient is
        exactly zero, and so is its gated band value), and their band sizes."""
        key = (n, window, str(device), dtype)
        if key not in self._operators:
            analysis, synthesis, sizes = self.operators(n, device, dtype)
            with torch.inference_mode(False), torch.no_grad():
                live = analysis[n - window:].ne(0).any(0)
                bands = [int(part.sum()) for part in live.split(sizes)]
                self._operators[key] = (analysis[n - window:, live].contiguous(),
                                        synthesis[live, n - window:].contiguous(), bands)
        return self._operators[key]

    def forward_windows(self, x: torch.Tensor, groups: list[tuple[int, int]], n: int) -> torch.Tensor:
        """`forward` on windows of rows (layers.Windows): x (S, M, H) holds, group after group, the
        last `window` columns of each of the group's `rows` rows of an (B, L) input that is zero
        outside them; returns the same positions of `forward`'s output."""
        out, start = [], 0
        for rows, window in groups:
            part = x[start:start + rows * window].view(rows, window, *x.shape[1:])
            start += rows * window
            out.append(self._align(part, *self.window_operators(n, window, x.device, x.dtype)).view(-1, *x.shape[1:]))
        return torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, M, H) -> same shape."""
        return self._align(x, *self.operators(x.shape[1], x.device, x.dtype))

    def _align(self, x: torch.Tensor, analysis: torch.Tensor, synthesis: torch.Tensor,
               sizes: list[int]) -> torch.Tensor:
        """x (B, L, M, H) -> same shape, through an analysis (L, T) and synthesis (T, L) pair.

        The coefficients are computed source-major, (M, T, B*H): each band of each source is then one
        contiguous (T_k*B, H) block, so a band's gates are one batched product over the sources, and
        the bands are taken apart with split (whose backward is one concatenation, where slicing
        would zero-fill a full-size gradient per slice)."""
        b, n, m, h = x.shape
        coeffs = analysis.t() @ x.permute(2, 1, 0, 3).reshape(m, n, b * h)  # (source, T, B*H)
        # w[k] is (source, in, target*out): the gates of band k, one (H, M*H) matrix per source
        w = self.gates.permute(0, 2, 4, 1, 3).reshape(len(sizes), m, h, m * h)
        fused = []
        for k, c in enumerate(coeffs.split(sizes, dim=1)):
            c = c.reshape(m, -1, h)  # (source, T_k*B, H)
            gate = torch.sigmoid(torch.bmm(c, w[k])).view(m, -1, m, h)  # (source, T_k*B, target, H)
            fused.append((gate * c.unsqueeze(2)).sum(0))  # (T_k*B, target, H)
        rec = (synthesis.t() @ torch.cat(fused).view(sum(sizes), -1)).view(n, b, m, h).transpose(0, 1)
        return torch.lerp(x, rec.to(x.dtype), self.weight.view(1, 1, m, 1)).contiguous()  # bf16 under autocast


class SparseMoE(nn.Module):
    """out = x * (sum of shared experts + sum_{k in top} p_k e_k): vector experts on D = M*H
    channels, top-k of a softmax router (renormalised), all experts registered parameters."""

    def __init__(self, dim: int, n_routed: int, topk: int, n_shared: int, std: float):
        super().__init__()
        self.topk = topk
        self.router = nn.Linear(dim, n_routed)
        self.experts = nn.Parameter(torch.empty(n_routed, dim).normal_(0.0, std))
        self.shared = nn.Parameter(torch.empty(n_shared, dim).normal_(0.0, std)) if n_shared else None

    def route(self, routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (N, E), the top-k experts (N, k) and their renormalised weights. In
        float32 under bf16 autocast too: with a near-uniform router, bfloat16 rounding of the logits
        would decide which experts are chosen."""
        with torch.autocast(routing.device.type, enabled=False):
            probs = torch.softmax(F.linear(routing.float(), self.router.weight, self.router.bias), dim=-1)
        top, idx = probs.topk(self.topk, dim=-1)
        return probs, idx, top / top.sum(-1, keepdim=True).clamp(min=1e-6)

    def forward(self, x: torch.Tensor, routing: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, routing (N, D); valid (N,) bool. Returns the output (N, D) and the mean off-diagonal
        cosine similarity between the routed experts' outputs over the valid tokens."""
        probs, idx, weights = self.route(routing)
        scale = torch.zeros_like(probs).scatter(1, idx, weights) @ self.experts
        if self.shared is not None:
            scale = scale + self.shared.sum(0)
        out = x * scale
        # <x*e_i, x*e_j> over tokens = sum_d s_d e_i[d] e_j[d] with s_d = sum_n x_nd^2: no (E, N, D) tensor
        with torch.autocast(x.device.type, enabled=False):  # float32 under bf16 autocast too
            s = (x.float().square() * valid.unsqueeze(1)).sum(0)
            gram = (self.experts * s) @ self.experts.t()
        norm = gram.diagonal().clamp(min=1e-16).sqrt()
        cos = gram / (norm.unsqueeze(1) * norm.unsqueeze(0))
        e = len(self.experts)
        diversity = (cos.sum() - cos.diagonal().sum()) / max(e * (e - 1), 1)
        return out, diversity


@dataclass
class ATHWEOutput:
    """What one forward pass computes: the (possibly cropped) input ids and their validity, the
    per-modality item tables and their concatenation (the item vectors; None when the pass was
    asked for the query vectors only), the query vectors, each modality's read-out (and its
    temporal-contrast view), and the experts' diversity loss."""

    ids: torch.Tensor
    valid: torch.Tensor
    tables: dict[str, torch.Tensor] | None
    items: torch.Tensor | None
    query: torch.Tensor
    seq: dict[str, torch.Tensor]
    augmented: dict[str, torch.Tensor]
    diversity: torch.Tensor | None


def _fingerprint_tensor(fp: str) -> torch.Tensor:
    return torch.tensor(list(fp.encode("utf-8")), dtype=torch.uint8)


def fingerprint_text(t: torch.Tensor) -> str:
    """A `feature_fingerprint` buffer as text ("" for a model without features)."""
    return bytes(t.cpu().tolist()).decode("utf-8", "replace")


@register_model("athwe", ATHWEConfig, "ATHWE: wavelet-aligned ID/text/image streams, time-routed experts (multimodal)",
                needs_features=True)
class ATHWE(SequentialRecommender):
    """ATHWE: wavelet-aligned ID/text/image streams, time-routed experts (multimodal)."""

    supports_trimming = False  # the wavelet transform spans every column, padding included

    def __init__(self, config: ATHWEConfig, n_items: int, max_seq_length: int, loss_type: str = "ce",
                 features: FeatureSetLike | None = None):
        super().__init__(config, n_items, max_seq_length, loss_type)
        c = config
        self.modalities = [m for m in MODALITIES if m in c.modalities]
        h, n_mod = c.hidden_size, len(self.modalities)

        fingerprint = self._register_features(features, n_items)
        self.register_buffer("feature_fingerprint", _fingerprint_tensor(fingerprint))
        self.register_load_state_dict_pre_hook(self._before_load)

        # 1. inputs
        if "id" in self.modalities:
            self.item_embedding = nn.Embedding(n_items + 1, h, padding_idx=0)
        self.projections = nn.ModuleDict({m: nn.Linear(getattr(self, f"{m}_raw").shape[1], h)
                                          for m in self.modalities if m in FEATURE_MODALITIES})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(h)) for m in self.projections
                                         if not bool(getattr(self, f"{m}_has")[1:].all())})
        self.position = nn.Embedding(max_seq_length, h)
        # 2. wavelet alignment
        init_w = [c.initializer_weight[MODALITIES.index(m)] for m in self.modalities]
        self.fusion = (WaveletAlign(n_mod, h, c.wavelet_J, c.wavelet_name, init_w, c.initializer_range)
                       if c.wavelet else None)
        # 3./4. time encoding and experts
        self.tcl_modalities = [m for m in self.modalities if m in FEATURE_MODALITIES] if c.phcl_weight > 0 else []
        if (c.moe and c.time_routing) or self.tcl_modalities:
            self.time_embedding = nn.Embedding(c.time_span + 10, h)
        auto = c.time_scale == "auto"
        self.register_buffer("time_scale_s", torch.tensor(float("nan") if auto else c.time_scale, dtype=torch.float64))
        self._time_scale: float | None = None if auto else float(c.time_scale)
        if c.moe:
            if c.time_routing:
                self.time_routing = nn.Linear(h, n_mod * h)
                self.routing_dropout = Dropout(c.hidden_dropout)
            self.moe = SparseMoE(n_mod * h, c.routed_experts, c.moe_topk, c.shared_experts, c.expert_init_std)
        # 5. per-modality encoders
        self.norms = nn.ModuleDict({m: nn.LayerNorm(h, eps=c.layer_norm_eps) for m in self.modalities})
        self.dropout = Dropout(c.hidden_dropout)
        self.encoders = nn.ModuleDict({m: nn.ModuleList(
            TransformerBlock(h, c.num_heads, c.inner_size, c.attn_dropout, c.hidden_dropout, c.layer_norm_eps)
            for _ in range(c.num_layers)) for m in self.modalities})
        # 6. modality score weights (a single modality has weight 1)
        self.fusion_weights = nn.Parameter(torch.ones(n_mod)) if n_mod > 1 else None
        # auxiliary heads
        if c.cp_weight > 0 and self.cat is not None:
            self.cat_head = nn.Linear(n_mod * h, self.cat.shape[1])
        if c.cluster_weight > 0:
            self.cluster_heads = nn.ModuleDict({m: nn.Linear(h, c.n_clusters) for m in self.projections})
            for m in self.cluster_heads:
                self.register_buffer(f"{m}_labels", None, persistent=False)
        self.placeholders = nn.ModuleDict({m: nn.Linear(h, h) for m in self.tcl_modalities})

        self.apply(lambda mod: init_weights(mod, c.initializer_range))
        if "id" in self.modalities:
            self.item_embedding.weight.data[0].zero_()
        for p in self.missing.values():
            p.data.normal_(0.0, c.initializer_range)

    # -- features ----------------------------------------------------------------------------
    def _register_features(self, features: FeatureSetLike | None, n_items: int) -> str:
        """Keep the frozen feature tables as (non-saved) buffers; returns their fingerprint."""
        from athwe.models.clustering import content_fingerprint

        needed = [m for m in self.modalities if m in FEATURE_MODALITIES]
        if features is None and (needed or self.config.cp_weight > 0):
            raise AthweError("athwe needs item features (text, image, categories): "
                             "run `athwe extract --dataset NAME`, "
                             "or set model_args.modalities=[id] and model_args.cp_weight=0")
        rows = n_items + 1
        for m in needed:
            table = getattr(features, m, None)
            if table is None:
                raise AthweError(f"athwe: modality {m} needs {m} features, but the feature set has none "
                                 f"(extract them, or drop {m} from model_args.modalities)")
            table = torch.as_tensor(table, dtype=torch.float32)
            if table.ndim != 2 or table.shape[0] != rows:
                raise AthweError(f"athwe: {m} features have shape {tuple(table.shape)}, expected ({rows}, d) for "
                                 f"{n_items} items (features extracted for another item map?)")
            mask = getattr(features, f"{m}_mask", None)
            has = (torch.ones(rows, dtype=torch.bool) if mask is None
                   else torch.as_tensor(mask, dtype=torch.bool).clone())
            if has.shape != (rows,):
                raise AthweError(f"athwe: {m}_mask has shape {tuple(has.shape)}, expected ({rows},)")
            has[0] = False
            self.register_buffer(f"{m}_raw", table, persistent=False)
            self.register_buffer(f"{m}_has", has, persistent=False)
        cat = getattr(features, "cat", None) if features is not None else None
        if cat is not None and self.config.cp_weight > 0:
            cat = torch.as_tensor(cat, dtype=torch.float32)
            if cat.ndim != 2 or cat.shape[0] != rows:
                raise AthweError(f"athwe: category features have shape {tuple(cat.shape)}, expected ({rows}, n_cat)")
            if cat.shape[1] == 0:
                cat = None
        else:
            cat = None
        self.register_buffer("cat", cat, persistent=False)
        self.register_buffer("cat_has", None if cat is None else cat.sum(1) > 0, persistent=False)
        if features is None:
            return ""
        fp = getattr(features, "fingerprint", None)
        if fp:
            return str(fp)
        parts = [content_fingerprint(getattr(self, f"{m}_raw"), getattr(self, f"{m}_has")) for m in needed]
        if cat is not None:
            parts.append(content_fingerprint(cat, None))
        return "-".join(parts)

    def _before_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Refuse a checkpoint trained on other features; drop the feature sketch that older
        checkpoints carry; take the checkpoint's resolved time scale (one saved before the scale was
        kept with the model gets the configured one)."""
        saved = state_dict.get(prefix + "feature_fingerprint")
        if saved is not None and not torch.equal(saved.cpu(), self.feature_fingerprint.cpu()):
            got = fingerprint_text(saved) or "none"
            mine = fingerprint_text(self.feature_fingerprint) or "none"
            raise AthweError(f"athwe: the checkpoint was trained on features {got}, but the loaded features are "
                             f"{mine}: they were produced differently (other extractor, settings, items or texts); "
                             f"re-extract them with the run's settings, or train a new run")
        state_dict.pop(prefix + "feature_sketch", None)
        key = prefix + "time_scale_s"
        if key not in state_dict:
            state_dict[key] = self.time_scale_s.detach().clone()
        value = float(state_dict[key])
        if value == value:  # not NaN: resolved
            ts = self.config.time_scale
            if ts != "auto" and abs(float(ts) - value) > 1e-6 * max(abs(value), 1.0):
                warnings.warn(f"athwe: the checkpoint was trained with time_scale {value:g} s; it keeps that scale "
                              f"(model_args.time_scale {float(ts):g} applies to new training only)", stacklevel=2)
            self._time_scale = value

    def ensure_cluster_labels(self) -> None:
        """Compute (or load from the cache) the K-medoids pseudo-labels the cluster loss needs."""
        if not hasattr(self, "cluster_heads"):
            return
        from athwe.models.clustering import cluster_labels

        fp = fingerprint_text(self.feature_fingerprint) or None
        c = self.config
        for m in self.cluster_heads:
            if getattr(self, f"{m}_labels") is None:
                raw, has = getattr(self, f"{m}_raw"), getattr(self, f"{m}_has")
                labels = cluster_labels(raw, has, c.n_clusters, c.cluster_seed, fingerprint=fp, modality=m,
                                        sample_size=c.cluster_sample)
                setattr(self, f"{m}_labels", labels.to(raw.device))

    @property
    def uses_timestamps(self) -> bool:
        """The query vectors depend on the gaps when the experts are routed by time (the temporal
        contrast's placeholders read them in training only)."""
        return bool(self.config.moe and self.config.time_routing)

    @property
    def time_scale(self) -> float:
        """The gap scale of the time buckets in seconds: the configured one, or for "auto" the one
        resolved from the training data (`prepare`) or read from a checkpoint."""
        if self._time_scale is None:
            raise AthweError("athwe: model_args.time_scale is 'auto' and not resolved yet: it is taken from the "
                             "training data when training starts, or from a trained checkpoint")
        return self._time_scale

    @staticmethod
    def _train_gaps(train: SampleSet) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the last two input positions' timestamps, their item ids) of the training samples whose
        last two items are real: the gap into each training interaction, once each; None if none."""
        if train.input_ids.shape[1] < 2:
            return None
        ids, ts = train.input_ids[:, -2:], train.timestamps[:, -2:]
        real = (ids > 0).all(1)
        if not bool(real.any()):
            return None
        return ts[real], ids[real]

    def prepare(self, train: SampleSet) -> None:
        if self._time_scale is None:  # "auto" (the reference scale when no gap is positive)
            pair = self._train_gaps(train)
            gaps = (pair[0][:, 1] - pair[0][:, 0]) if pair is not None else torch.zeros(0)
            gaps = gaps[gaps > 0].double().sort().values
            value = float(gaps[int(AUTO_TIME_QUANTILE * (len(gaps) - 1))]) if len(gaps) else REFERENCE_TIME_SCALE
            self.time_scale_s.fill_(value)
            self._time_scale = value
        self.ensure_cluster_labels()

    def training_notes(self, train: SampleSet) -> list[str]:
        """Warns when the gap buckets are (nearly) constant over the training data, i.e. when
        time_scale does not suit the dataset's gaps (or it has no timestamps): the time embedding
        then carries no signal into the expert routing and the temporal-contrast placeholders."""
        c = self.config
        pair = self._train_gaps(train)
        if not ((c.moe and c.time_routing) or self.tcl_modalities) or pair is None:
            return []
        ts, ids = pair
        notes = []
        if c.time_scale == "auto":
            notes.append(f"athwe: time_scale auto = {format_seconds(self.time_scale)} "
                         f"({AUTO_TIME_QUANTILE:.0%} quantile of "
                         "the positive gaps in the training data)")
        gaps = (ts[:, 1] - ts[:, 0]).clamp(min=0.0)
        bucket = time_buckets(ts, ids > 0, c.time_span, self.time_scale)[:, 1]
        uses = " and ".join(u for u, on in (("expert routing", c.moe and c.time_routing),
                                             ("temporal-contrast placeholders", bool(self.tcl_modalities))) if on)
        for value, where in ((0, "the lowest"), (c.time_span, "the top")):
            share = float((bucket == value).double().mean())
            if share >= 0.9:
                return notes + [
                    f"athwe: {share:.0%} of the training gaps fall in {where} time bucket at model_args.time_scale "
                    f"{self.time_scale:g} s (median gap {float(gaps.median()):g} s), so the time embedding ({uses}) "
                    f"is nearly constant; set time_scale near the dataset's typical gap, or to auto "
                    f"(`athwe data info` lists them; BSARec .txt data have no timestamps)"]
        return notes

    # -- forward -----------------------------------------------------------------------------
    def _feature_rows(self, m: str, rows: torch.Tensor | slice) -> torch.Tensor:
        """P_m times feature modality m's raw rows at `rows` (indices or a slice of the table), with
        the learned missing vector for items without the feature."""
        raw, has = getattr(self, f"{m}_raw"), getattr(self, f"{m}_has")
        if isinstance(rows, torch.Tensor):
            raw, has = raw.index_select(0, rows), has.index_select(0, rows)
        else:
            raw, has = raw[rows], has[rows]
        proj = self.projections[m](raw)
        return torch.where(has.unsqueeze(1), proj, self.missing[m]) if m in self.missing else proj

    def item_tables(self) -> dict[str, torch.Tensor]:
        """Per-modality candidate tables (n_items + 1, H): E_id, P_t T, P_v V, where items without
        the feature get the learned missing vector; row 0 (padding) is zero."""
        tables: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            if m == "id":
                tables[m] = self.item_embedding.weight
                continue
            proj = self._feature_rows(m, slice(1, None))
            tables[m] = torch.cat([proj.new_zeros(1, proj.shape[1]), proj])
        return tables

    def item_rows(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Per modality, the rows of `item_tables()` at `ids` (zero for padding), computed for those
        items alone: what the query vectors need, without projecting the whole catalogue."""
        padding = (ids == 0).unsqueeze(1)
        return [lookup(self.item_embedding.weight, ids) if m == "id"
                else self._feature_rows(m, ids).masked_fill(padding, 0.0) for m in self.modalities]

    def _encode_stream(self, m: str, h: torch.Tensor, mask: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """Modality m's encoder on its inputs at the kept tokens, (R, H): its output at each row's
        last position, (B, H). Everything in it is per position except attention, where padding keys
        are masked, so only the real items (and each row's last position) are computed."""
        z = self.dropout(self.norms[m](h))
        blocks = self.encoders[m]
        for i, block in enumerate(blocks):
            z = block.forward_packed(z, tokens, mask, last=i == len(blocks) - 1)
        return z

    def forward(self, input_ids: torch.Tensor, timestamps: torch.Tensor, with_tcl: bool = False,
                with_items: bool = True) -> ATHWEOutput:
        """Steps 1-6 of the module docstring on left-padded (B, L) ids and their timestamps (the last
        max_seq_length columns are used). With `with_tcl` (training) the text and image streams are
        also encoded with floor(len * beta) random valid positions replaced by their time placeholder.
        Without `with_items` the item tables are not built (the inputs' rows are computed alone) and
        the output's tables and items are None.

        The wavelets span the whole grid; from the experts on, every step is per position or
        attention over real keys, so it runs on the kept tokens only (`Tokens`): the real items and
        each row's last position."""
        c = self.config
        ids, ts = input_ids, timestamps
        if ids.shape[1] > self.max_seq_length:
            ids, ts = ids[:, -self.max_seq_length:], ts[:, -self.max_seq_length:]
        b, n = ids.shape
        valid = ids > 0
        # 1. per-modality inputs plus the shared position embedding, zero at padding
        # (computed at the cells of the attention windows: each row's columns from its first item on)
        tokens = Tokens.of(ids)
        win = tokens.windows
        cell_ids = ids.view(-1).index_select(0, win.cells)
        tables = self.item_tables() if with_items else None
        rows = [lookup(tables[m], cell_ids) for m in self.modalities] if with_items else self.item_rows(cell_ids)
        pos = self.position(win.cells % n + (self.max_seq_length - n))
        x = torch.stack(rows, 1) + pos.unsqueeze(1)
        x = x * (cell_ids > 0).view(-1, 1, 1).to(x.dtype)  # (cells, M, H), zero at padding
        # 2. wavelet alignment across modalities (the grid is zero outside the windows)
        if self.fusion is not None:
            x = self.fusion.forward_windows(x, win.groups, n)
        flat = F.pad(x.reshape(len(x), -1), (0, 0, 0, 1)).index_select(0, win.back)  # (R, M*H) at the kept tokens
        kept_valid = valid.view(-1).index_select(0, tokens.rows)
        # 3. gap-based time encoding
        tau = None
        if hasattr(self, "time_embedding"):
            buckets = time_buckets(ts, valid, c.time_span, self.time_scale)
            tau = self.time_embedding(buckets.view(-1).index_select(0, tokens.rows))  # (R, H)
        # 4. shared + routed experts over the fused tokens
        diversity = None
        if c.moe:
            if c.time_routing:  # float32 under autocast too, like the router it feeds
                with torch.autocast(ids.device.type, enabled=False):
                    routing = self.routing_dropout(F.relu(self.time_routing(tau.float())))
            else:
                routing = flat
            flat, diversity = self.moe(flat, routing, kept_valid)
        x = flat.view(len(flat), len(self.modalities), -1)  # (R, M, H)
        # 5. per-modality encoders (and, for temporal contrast, the placeholder views), last position
        mask = attention_mask(ids, causal=True)
        placed = None
        if with_tcl and self.tcl_modalities:
            placed = tcl_mask(valid, c.beta).view(-1).index_select(0, tokens.rows).unsqueeze(-1)
        seq: dict[str, torch.Tensor] = {}
        augmented: dict[str, torch.Tensor] = {}
        for i, m in enumerate(self.modalities):
            h = x[:, i]
            if placed is not None and m in self.placeholders:
                aug = torch.where(placed, self.placeholders[m](tau), h)
                both = self._encode_stream(m, torch.cat([h, aug]), torch.cat([mask, mask]), tokens.repeat(2))
                seq[m], augmented[m] = both[:b], both[b:]
            else:
                seq[m] = self._encode_stream(m, h, mask, tokens)
        # 6. weighted concatenation: query . items is the score
        w = torch.softmax(self.fusion_weights, 0) if self.fusion_weights is not None else x.new_ones(1)
        query = torch.cat([w[i] * seq[m] for i, m in enumerate(self.modalities)], -1)
        items = torch.cat([tables[m] for m in self.modalities], -1) if with_items else None
        return ATHWEOutput(ids, valid, tables, items, query, seq, augmented, diversity)

    def query_vectors(self, batch: Batch) -> torch.Tensor:
        return self(batch.input_ids, batch.timestamps, with_items=False).query

    def item_vectors(self) -> torch.Tensor:
        return torch.cat([t for t in self.item_tables().values()], -1)

    # -- losses ------------------------------------------------------------------------------
    def category_loss(self, ids: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE of the category head over every valid input position whose item has a category;
        returns (mean loss, number of positions). A position's term depends on its item alone, so
        each distinct item is computed once and weighted by how often it occurs."""
        flat = ids.reshape(-1)
        kept = flat[(flat > 0) & self.cat_has[flat]]
        uniq, times = torch.unique(kept, return_counts=True)
        logits = self.cat_head(lookup(items, uniq))
        per = F.binary_cross_entropy_with_logits(logits, self.cat[uniq], reduction="none").sum(1)
        count = times.sum()
        return (per * times).sum() / (count.clamp(min=1) * self.cat.shape[1]), count

    def cluster_loss(self, ids: torch.Tensor, tables: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over text/image of the pseudo-label CE over every valid input position whose item
        has that feature; returns (loss, positions per modality)."""
        self.ensure_cluster_labels()
        uniq, times = torch.unique(ids[ids > 0], return_counts=True)  # each distinct item once, weighted
        losses, counts = [], []
        for m, head in self.cluster_heads.items():
            labels = getattr(self, f"{m}_labels")[uniq]
            w = times * (labels >= 0)
            per = F.cross_entropy(head(lookup(tables[m], uniq)), labels.clamp(min=0), reduction="none")
            count = w.sum()
            losses.append((per * w).sum() / count.clamp(min=1))
            counts.append(count)
        return torch.stack(losses).mean(), torch.stack(counts)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The ranking loss plus the weighted auxiliary terms, all from one forward pass."""
        c = self.config
        out = self(batch.input_ids, batch.timestamps, with_tcl=True)
        main = ranking_loss(out.query, out.items, batch.target, batch.neg, self.loss_type, c.ce_padding)
        terms: list[torch.Tensor] = []
        if "id" in self.modalities and c.idcl_weight > 0:
            target = batch.target
            terms.append(c.idcl_weight * info_nce(out.seq["id"], self.item_embedding(target), target, c.temperature))
        if hasattr(self, "cat_head"):
            terms.append(c.cp_weight * self.category_loss(out.ids, out.items)[0])
        if hasattr(self, "cluster_heads") and len(self.cluster_heads):
            terms.append(c.cluster_weight * self.cluster_loss(out.ids, out.tables)[0])
        if out.augmented:
            tcl = [info_nce(out.seq[m], out.augmented[m], batch.target, c.phcl_temperature) for m in out.augmented]
            terms.append(c.phcl_weight * torch.stack(tcl).mean())
        if out.diversity is not None and c.diversity_weight > 0:
            terms.append(c.diversity_weight * c.cosine_lambda * out.diversity)
        return main + sum(terms) if terms else main

    # -- items added after training ----------------------------------------------------------
    def append_items(self, id_rows: torch.Tensor | None, raw: dict[str, torch.Tensor],
                     has: dict[str, torch.Tensor]) -> None:
        """Extend the item tables in memory by n new items, ids n_items + 1 .. n_items + n in order,
        so that item_tables(), item_vectors() and the inputs of forward() cover them: `id_rows`
        (n, H) are their ID embedding rows (with the id modality), `raw[m]` (n, d_m) and `has[m]`
        (n,) their raw features and has-masks for each modality in `projections` (a False mask
        gives the learned missing vector, as for trained items). Their category and cluster-label
        rows are empty (those feed training losses only). Every changed table is replaced, never
        written in place; the rows are never saved (feature buffers are not persistent)."""
        n = int(id_rows.shape[0]) if id_rows is not None else int(next(iter(has.values())).shape[0])
        if ("id" in self.modalities) != (id_rows is not None) or set(raw) != set(self.projections) \
                or set(has) != set(self.projections):
            raise ValueError(f"append_items needs id rows iff the id modality is used, and raw features and masks "
                             f"for exactly {sorted(self.projections)}")
        with torch.no_grad():
            if id_rows is not None:
                w = self.item_embedding.weight
                self.item_embedding.weight = nn.Parameter(torch.cat([w.detach(), id_rows.to(w.device, w.dtype)]),
                                                          requires_grad=w.requires_grad)
                self.item_embedding.num_embeddings = self.item_embedding.weight.shape[0]
            for m in self.projections:
                table, mask = getattr(self, f"{m}_raw"), getattr(self, f"{m}_has")
                if raw[m].shape != (n, table.shape[1]) or has[m].shape != (n,):
                    raise ValueError(f"append_items: {m} rows must be ({n}, {table.shape[1]}) with ({n},) masks")
                setattr(self, f"{m}_raw", torch.cat([table, raw[m].to(table.device, table.dtype)]))
                setattr(self, f"{m}_has", torch.cat([mask, has[m].to(mask.device, torch.bool)]))
            if self.cat is not None:
                self.cat = torch.cat([self.cat, self.cat.new_zeros(n, self.cat.shape[1])])
                self.cat_has = torch.cat([self.cat_has, self.cat_has.new_zeros(n)])
            for m in getattr(self, "cluster_heads", {}):
                labels = getattr(self, f"{m}_labels")
                if labels is not None:
                    setattr(self, f"{m}_labels", torch.cat([labels, labels.new_full((n,), -1)]))
        self.n_items += n
