"""The brain vision tower: per-modality 3D patch embeddings feeding a shared transformer encoder.

Shapes::

    pixel_values (B, C, D, H, W) or (B, C, D, H, W, T)  --patch embedding of `modality`-->  (B, N, hidden)
    N = prod(image_size // patch_size), e.g. 96³ / 16³ = 216 tokens; 96³×20 / 16³×20 = 216
    --encoder layers-->  hidden_states: tuple of num_hidden_layers + 1 tensors (B, N, hidden)

There is no CLS token (LLaVA must use ``vision_feature_select_strategy="full"``) and no final layer
norm, so every parameter takes part in the features LLaVA selects (``vision_feature_layer=-1``).
Encoder layers are SigLIP encoder layers, so a pretrained SigLIP tower's layers load one to one.
Parameter names carry the modality (``embeddings.T1.proj.weight``) so the trainer finds idle ones.

Two patch embeddings, chosen per modality (``embed`` in the modality spec, ``model.patch_embed``):
"linear" cuts non-overlapping patches and maps each linearly (a Conv3d with kernel = stride =
patch); "conv" first runs a light strided convolutional stem, after "Early convolutions help
transformers see better" (Xiao et al., NeurIPS 2021), and yields the same token grid::

    (B, C, 96, 96, 96) --[Conv3d k3 s2 p1, GroupNorm, GELU] x4--> (B, 128, 6, 6, 6)
                       --Conv3d 1x1x1 (proj)--> (B, hidden, 6, 6, 6) --> (B, 216, hidden)

Stage widths are ``stem_channels`` (default 16, 32, 64, 128). ``stem_style`` "strided" (default)
is the stem drawn above, normalised by GroupNorm, which uses no batch statistics (small per-rank
batches, DDP); "pooled" builds each stage as brain-age CNNs do, Conv3d k3 s1 + BatchNorm + ReLU
+ 2x max-pool (:class:`StemStage`): its batch statistics are each rank's own under DDP (no
synchronisation; gloo has none for BatchNorm), its running statistics are saved with the weights.
Stem convolutions start Kaiming-normal (fan_out), the final projection too, as torchvision's
conv-stem ViT does; norms start at 1 / 0.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from umbrella.geometry import num_patches, stem_plan
from umbrella.model.configuration_brain_vit import BrainViTConfig


class StemStage(nn.Module):
    """One stage of the convolutional stem: (B, C, D, H, W) -> (B, C', D/sd, H/sh, W/sw).

    ``style="strided"``: Conv3d k3 p1 with the stage's stride (no bias) -> GroupNorm -> GELU, as
    the conv-stem ViTs build it. ``style="pooled"``: Conv3d k3 p1 stride 1 (no bias) -> BatchNorm
    -> ReLU -> max-pool of the stage's stride, as brain-age CNNs build theirs (e.g. SFCN, Peng et
    al., Medical Image Analysis 2021). GroupNorm standardises every image over space, which also
    removes what a scan's overall intensities say; BatchNorm standardises by the population's
    statistics (running ones at evaluation) and keeps it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int],
                 style: str = "strided"):
        super().__init__()
        pooled = style == "pooled"
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False,
                              stride=1 if pooled else stride)
        self.norm = (nn.BatchNorm3d(out_channels) if pooled
                     else nn.GroupNorm(math.gcd(out_channels, 8), out_channels))
        self.act = nn.ReLU() if pooled else nn.GELU()
        self.pool = nn.MaxPool3d(stride) if pooled and max(stride) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(self.conv(x)))
        return x if self.pool is None else self.pool(x)


class PopulationCentering(nn.Module):
    """Subtracts the training population's mean image, voxel by voxel, and divides by one number,
    the root mean square of the population's voxel standard deviations (``center`` in the spec).

    Every brain of a cohort shares most of its image with every other (the same anatomy in the
    same place after preprocessing); what tells subjects apart is a small deviation from that
    common image. Removing the mean image hands the patch embedding the deviations at unit scale,
    as a voxel-wise linear model standardises its features. The statistics are running sums over
    every training batch (each batch's moments in float32, combined by Chan et al.'s parallel
    update in float64), persistent buffers saved with the weights, frozen outside training; time
    (4D inputs) counts as more samples of each voxel.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(shape, dtype=torch.float64))

    def reset(self) -> None:
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Adds a batch (B, C, D, H, W) or (B, C, D, H, W, T) to the running statistics."""
        x = x.detach().float()  # the batch's own moments in float32, the running ones in float64
        if x.dim() == 6:
            x = x.permute(0, 5, 1, 2, 3, 4).reshape(-1, *x.shape[1:5])
        n = x.shape[0]
        mean = x.mean(0)
        m2 = ((x - mean) ** 2).sum(0).double()
        mean = mean.double()
        count, old_mean, old_m2 = (b.to(torch.float64) for b in (self.count, self.mean, self.m2))
        total = count + n
        delta = mean - old_mean
        self.mean.copy_(old_mean + delta * (n / total))
        self.m2.copy_(old_m2 + m2 + delta ** 2 * (count * n / total))
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(x)
        if self.count < 2:
            return x
        # float32 from the buffers as stored: a model reloaded in float32 centres identically
        mean, m2, count = self.mean.float(), self.m2.float(), self.count.float()
        scale = (m2 / (count - 1)).mean().sqrt().clamp_min(1e-6)
        if x.dim() == 6:
            mean = mean[..., None]
        return (x.float() - mean) / scale  # float32; the patch embedding casts it once


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes, whatever its dtype (bfloat16 included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


class OutputCache:
    """A bounded memo of a module's per-image outputs, keyed by the input image's bytes.

    For a patch embedding whose output is a fixed function of its input: frozen weights in
    evaluation mode (``model.train_embeddings=frozen`` over a pretrained tower), or any embedding
    under ``torch.no_grad`` in evaluation. Each distinct input (an image, its flipped copy) is then
    embedded once per run instead of at every step. Keys are SHA-1 digests of each image's bytes
    with its shape, dtype and the compute dtype; entries are dropped least-recently-used beyond
    ``max_bytes``, and all of them when a weight or buffer of the module changes (a digest of
    their bytes, checked at every use: fused optimisers update weights without bumping tensor
    version counters).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes, self.hits, self.misses, self.state = 0, 0, 0, None

    def clear(self) -> None:
        self.entries.clear()
        self.bytes, self.state = 0, None

    def validate(self, module: nn.Module) -> None:
        """Drops every entry when the module's weights or buffers changed since they were made."""
        digest = hashlib.sha1()
        for tensor in (*module.parameters(), *module.buffers()):
            digest.update(_bytes(tensor))
        state = digest.digest()
        if state != self.state:
            self.clear()
            self.state = state

    @staticmethod
    def key(image: torch.Tensor, tag: str) -> bytes:
        digest = hashlib.sha1(_bytes(image))
        digest.update(f"{tuple(image.shape)}|{image.dtype}|{tag}".encode())
        return digest.digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        out = self.entries.get(key)
        if out is not None:
            self.entries.move_to_end(key)
        return out

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if (old := self.entries.pop(key, None)) is not None:
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


class BrainPatchEmbedding(nn.Module):
    """Patches -> (optional convolutional stem ->) projection + learned position table of this
    modality.

    3D: (B, C, D, H, W), patches (pd, ph, pw) -> N = (D/pd)(H/ph)(W/pw) tokens.
    4D: (B, C, D, H, W, T), patches (pd, ph, pw, pt): each block of pt frames is folded into the
    channels of a 3D patch (or of the stem's input), so N = (T/pt)(D/pd)(H/ph)(W/pw), time blocks
    outermost.
    ``embed="linear"``: ``proj`` is a Conv3d with kernel = stride = patch. ``embed="conv"``: ``stem``
    (stride-2 :class:`StemStage` s, :func:`stem_plan`) then ``proj`` with kernel = stride = the
    odd rest of the patch (1x1x1 for powers of two). ``embed="connectivity"`` (4D, one time
    block: the patch spans the window): every patch is a region and its token is
    ``connectivity`` (a Linear over regions) of the region's row of the window's correlation
    matrix (Pearson, of the regions' mean series) plus its position, as brain-network
    transformers tokenise connectivity, parcel-free here: the token holds what the region shares
    over time with every other region, not its intensities (no ``proj``).
    """

    def __init__(self, hidden_size: int, spec: dict, name: str = "image"):
        super().__init__()
        self.image_size = tuple(spec["image_size"])
        self.in_channels = spec["in_channels"]
        patch = tuple(spec["patch_size"])
        self.time_patch = patch[3] if len(patch) == 4 else None
        channels = self.in_channels * (self.time_patch or 1)
        self.stem = None
        kernel = patch[:3]
        if spec.get("embed", "linear") == "conv":
            strides, kernel = stem_plan(name, spec)
            widths = [channels, *spec["stem_channels"][:len(strides)]]
            style = spec.get("stem_style", "strided")
            self.stem = nn.Sequential(*(StemStage(c_in, c_out, s, style) for c_in, c_out, s
                                        in zip(widths[:-1], widths[1:], strides, strict=True)))
            channels = widths[-1]
        self.region = tuple(kernel)
        if spec.get("embed") == "connectivity":  # the region's correlation row is its content
            self.proj, self.connectivity = None, nn.Linear(num_patches(spec), hidden_size)
        else:
            self.proj = nn.Conv3d(channels, hidden_size, kernel_size=kernel, stride=kernel)
            self.connectivity = None
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches(spec), hidden_size))
        self.center = (PopulationCentering((self.in_channels, *self.image_size[:3]))
                       if spec.get("center") else None)

    frozen = False  # set by the trainable policy (model.train_embeddings=frozen)
    output_cache: OutputCache | None = None  # set by enable_output_cache

    def train(self, mode: bool = True):
        """A frozen embedding stays in evaluation mode (stored BatchNorm and centering
        statistics) when the model around it trains."""
        return super().train(mode and not self.frozen)

    def _cacheable(self, pixel_values: torch.Tensor) -> bool:
        """Whether the output is a fixed function of the input: evaluation mode, on the CPU, and
        no gradient to the weights (frozen, or under no_grad)."""
        return (self.output_cache is not None and not self.training
                and pixel_values.device.type == "cpu"
                and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())))

    def _compute_dtype(self, pixel_values: torch.Tensor) -> torch.dtype:
        """The dtype the projection runs in: autocast's where it is on (float16 batches are cast
        once, straight to bfloat16, not through float32), else the weights'."""
        device = pixel_values.device.type
        if device == "cuda" and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return (self.proj if self.proj is not None else self.connectivity).weight.dtype

    def _fold_time(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W, T) -> (B * T/pt, C * pt, D, H, W)."""
        b, c, d, h, w, t = x.shape
        pt = self.time_patch
        x = x.reshape(b, c, d, h, w, t // pt, pt).permute(0, 5, 1, 6, 2, 3, 4)
        return x.reshape(b * (t // pt), c * pt, d, h, w)

    def region_correlation(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W, T) -> (B, N, N) float32: Pearson correlation over the T frames of the
        regions' mean series (each patch a region, channels averaged; a flat series correlates 0)."""
        b, c, d, h, w, t = x.shape
        frames = x.float().permute(0, 1, 5, 2, 3, 4).reshape(b, c * t, d, h, w)
        pooled = nn.functional.avg_pool3d(frames, self.region)  # (B, C*T, D', H', W')
        series = pooled.reshape(b, c, t, -1).mean(1)  # (B, T, N)
        series = series - series.mean(1, keepdim=True)
        norm = series.square().sum(1, keepdim=True).sqrt()
        series = series / norm.clamp_min(1e-6)
        return series.transpose(1, 2) @ series

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) or (B, C, D, H, W, T) -> (B, N, hidden)."""
        expected = (self.in_channels, *self.image_size)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} do not match this "
                             f"modality's (B, {', '.join(map(str, expected))})")
        if not self._cacheable(pixel_values):
            return self._embed(pixel_values)
        cache = self.output_cache
        cache.validate(self)
        tag = f"{self._compute_dtype(pixel_values)}|{torch.is_autocast_enabled('cpu')}"
        keys = [cache.key(image, tag) for image in pixel_values]
        found = {k: row for k in set(keys) if (row := cache.get(k)) is not None}
        todo = list({k: i for i, k in enumerate(keys) if k not in found}.items())  # distinct
        cache.hits += len(keys) - len(todo)
        cache.misses += len(todo)
        if todo:
            with torch.no_grad():
                fresh = self._embed(pixel_values[[i for _, i in todo]])
            for (key, _), row in zip(todo, fresh, strict=True):
                found[key] = row.clone()  # not a view that would keep the whole batch alive
                cache.put(key, found[key])
        return torch.stack([found[k] for k in keys])

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.center is not None:
            pixel_values = self.center(pixel_values)
        if self.connectivity is not None:
            corr = self.region_correlation(pixel_values).to(self.connectivity.weight.dtype)
            return self.connectivity(corr) + self.position_embedding
        x = pixel_values.to(self._compute_dtype(pixel_values))
        batch = x.shape[0]
        if self.time_patch is not None:
            x = self._fold_time(x)
        if self.stem is not None:
            x = self.stem(x)
        patches = self.proj(x).flatten(2).transpose(1, 2)  # (B * blocks, n, hidden)
        return patches.reshape(batch, -1, patches.shape[-1]) + self.position_embedding


def enable_output_cache(model: nn.Module, megabytes: float) -> int:
    """Gives every patch embedding of ``model`` an :class:`OutputCache`, ``megabytes`` MiB shared
    equally between them (0 removes them). Returns how many embeddings got one. The caches are
    not saved with the model."""
    embeddings = [m for m in model.modules() if isinstance(m, BrainPatchEmbedding)]
    for module in embeddings:
        module.output_cache = (OutputCache(megabytes * 2**20 / len(embeddings))
                               if megabytes > 0 else None)
    return len(embeddings) if megabytes > 0 else 0


def output_cache_counts(model: nn.Module) -> dict[str, int]:
    """{"hits": n, "misses": n, "entries": n} summed over the model's patch embeddings' caches."""
    caches = [m.output_cache for m in model.modules()
              if isinstance(m, BrainPatchEmbedding) and m.output_cache is not None]
    return {"hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches),
            "entries": sum(len(c.entries) for c in caches)}


class BrainViTPreTrainedModel(PreTrainedModel):
    config_class = BrainViTConfig
    config: BrainViTConfig
    base_model_prefix = "brain_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SiglipEncoderLayer", "BrainPatchEmbedding"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PopulationCentering):
            module.reset()
        if isinstance(module, BrainPatchEmbedding):  # runs after its children: overrides them
            init.trunc_normal_(module.position_embedding, std=self.config.initializer_range)
            if module.stem is not None:
                for conv in (*(stage.conv for stage in module.stem), module.proj):
                    init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    if conv.bias is not None:
                        init.zeros_(conv.bias)


class BrainViTModel(BrainViTPreTrainedModel):
    def __init__(self, config: BrainViTConfig):
        super().__init__(config)
        self.embeddings = nn.ModuleDict(
            {m: BrainPatchEmbedding(config.hidden_size, spec, m) for m, spec in config.modalities.items()})
        self.layers = nn.ModuleList([SiglipEncoderLayer(config)
                                     for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def _pick_modality(self, modality: str | None) -> str:
        if modality is None:
            if len(self.embeddings) == 1:
                return next(iter(self.embeddings))
            raise ValueError(f"this tower has several modalities ({', '.join(self.embeddings)}): "
                             "pass modality=...")
        if modality not in self.embeddings:
            raise ValueError(f"modality {modality!r} has no patch embedding in this model; it has "
                             f"{', '.join(self.embeddings)}")
        return modality

    def forward(self, pixel_values: torch.Tensor, modality: str | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        """pixel_values (B, C, D, H, W[, T]) of one modality -> last_hidden_state (B, N, hidden).

        ``hidden_states`` (embeddings, then each layer's output) is always returned: LLaVA selects
        its features from it.
        """
        hidden = self.embeddings[self._pick_modality(modality)](pixel_values)
        states = [hidden]
        for layer in self.layers:
            hidden = layer(hidden, None)
            states.append(hidden)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=None,
                                          hidden_states=tuple(states))
