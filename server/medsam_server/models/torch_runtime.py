"""The torch runtime: SAM's prompt encoder + mask decoder as one batched graph (and its other mask outputs,
:class:`AlternativeMaskDecoder`), and the torch modules run as a :class:`.base.Runtime`. The only models module
that imports torch at load time (the ONNX export uses :class:`PromptedMaskDecoder` too, ``onnx_export.py``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .allocator import keep_freed_memory
from .base import LABEL_BACKGROUND, LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT, LABEL_FOREGROUND, LABEL_PAD


class PromptedMaskDecoder(nn.Module):
    """SAM's prompt encoder + mask decoder as one graph over a batch of (embedding, prompt) pairs.

    Inputs: ``embeddings`` (N, 256, 64, 64); ``coords`` (N, K, 2) as (x, y) in model
    pixels; ``labels`` (N, K) with -1 padding, 0/1 background/foreground points and
    2/3 box corners. Output: low-res mask logits (N, 1, 256, 256).

    Unlike upstream ``MaskDecoder.predict_masks``, embedding i pairs with prompt i
    (upstream repeats one image embedding per prompt), so one call decodes many
    slices. Box corners with labels 2/3 give exactly the sparse embedding of
    ``PromptEncoder(boxes=...)``; the same module is exported to ONNX, so both
    backends share it.
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, embeddings: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hs, upscaled = self.decode_tokens(embeddings, coords, labels)
        first_mask_token = hs[:, 1, :]  # multimask_output=False: MedSAM uses mask token 0 only
        hyper = self.mask_decoder.output_hypernetworks_mlps[0](first_mask_token)  # (N, C')
        b, c, h, w = upscaled.shape
        return (hyper.unsqueeze(1) @ upscaled.reshape(b, c, h * w)).reshape(b, 1, h, w)

    def decode_tokens(self, embeddings: torch.Tensor, coords: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer over (embedding i, prompt i): output tokens (N, 1 + 4 + K, 256), hs[:, 0] the
        IoU token and hs[:, 1 + t] mask token t, and the upscaled image features (N, C', 256, 256)."""
        pe = self.prompt_encoder
        dec = self.mask_decoder
        n = embeddings.shape[0]
        sparse = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)  # (N, K, 256)
        lab = labels.unsqueeze(-1)
        sparse = torch.where(lab == LABEL_PAD, pe.not_a_point_embed.weight.reshape(1, 1, -1), sparse)
        for label in (LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT):
            sparse = sparse + (lab == label).to(sparse.dtype) * pe.point_embeddings[label].weight.reshape(1, 1, -1)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *embeddings.shape[-2:])

        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = embeddings + dense
        pos_src = pe.get_dense_pe().expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = dec.transformer(src, pos_src, tokens)
        return hs, dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))


class AlternativeMaskDecoder(PromptedMaskDecoder):
    """The decoder's other mask outputs: logits (N, T, 256, 256) of SAM's mask tokens ``tokens`` (default 1..3).

    MedSAM and LiteMedSAM use mask token 0 (:class:`PromptedMaskDecoder`, left as it is so that its
    graph and its masks do not change); SAM's multimask tokens 1..3 give other masks for the same
    box, which a user may prefer (README "Review and refine"). The same weights and the same
    computation up to the hypernetworks; ``tokens=(0,)`` gives :class:`PromptedMaskDecoder`'s logits
    (tests/test_alternatives.py). Exported to ONNX as its own graph (``alternatives.py``).
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, tokens: tuple[int, ...] = (1, 2, 3)):
        super().__init__(prompt_encoder, mask_decoder)
        self.tokens = tuple(int(t) for t in tokens)

    def forward(self, embeddings: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hs, upscaled = self.decode_tokens(embeddings, coords, labels)
        # mask token t is hs[:, 1 + t], with its own hypernetwork (upstream predict_masks)
        dec = self.mask_decoder
        hyper = torch.stack([dec.output_hypernetworks_mlps[t](hs[:, 1 + t, :]) for t in self.tokens], dim=1)
        b, c, h, w = upscaled.shape
        return (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, len(self.tokens), h, w)


class TorchRuntime:
    backend, precision = "torch", "fp32"

    def __init__(self, encoder: nn.Module, decoder: PromptedMaskDecoder, device: str, autocast_bf16: bool = False):
        self.device = device
        if device == "cpu":
            keep_freed_memory()
        self.encoder = encoder.to(device).eval()
        self.decoder = decoder.to(device).eval()
        self.alternatives: AlternativeMaskDecoder | None = None  # made on first use, on the decoder's modules
        # bf16 autocast only where it helps: a CUDA device (CPU bf16 matmuls are slower here).
        self.autocast_bf16 = autocast_bf16 and device.startswith("cuda")

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_bf16)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        with self._autocast():
            out = self.encoder(torch.from_numpy(images).to(self.device))
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        with self._autocast():
            logits = self.decoder(emb, torch.from_numpy(coords.astype(np.float32)).to(self.device),
                                  torch.from_numpy(labels.astype(np.int64)).to(self.device))
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def decode_alternatives(self, embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """As :meth:`decode`, the other mask outputs: (N, 3, 256, 256) float32 logits of mask tokens 1..3."""
        if self.alternatives is None:
            self.alternatives = AlternativeMaskDecoder(self.decoder.prompt_encoder, self.decoder.mask_decoder).eval()
        emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        with self._autocast():
            logits = self.alternatives(emb, torch.from_numpy(coords.astype(np.float32)).to(self.device),
                                       torch.from_numpy(labels.astype(np.int64)).to(self.device))
        return logits.float().cpu().numpy()
