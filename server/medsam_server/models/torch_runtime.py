"""The torch runtime: SAM's prompt encoder + mask decoder as one batched graph (and its other mask outputs,
:class:`AlternativeMaskDecoder`), and the torch modules run as a :class:`.base.Runtime`. The only models module
that imports torch at load time (the ONNX export uses :class:`PromptedMaskDecoder` too, ``onnx_export.py``)."""

from __future__ import annotations

import math

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

    It runs in two steps, exported as two graphs: :meth:`prepare` (what depends on the slice only: a fifth of
    the work, kept for the slice's next prompt) and :meth:`decode_prepared` (the rest); ``forward`` is both.
    The two-way transformer is upstream's ``TwoWayTransformer.forward`` with layer 0 split that way; the
    upscaling is upstream's ``output_upscaling`` computed token-major (:meth:`upscaled_tokens`).
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(self, embeddings: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decode_prepared(*self.prepare(embeddings), coords, labels)

    def prepare(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slice-only part of the decoder: embeddings (N, 256, 64, 64) -> :data:`PREPARED` tensors.

        ``src`` (N, HW, 256): the image tokens (embedding + the no-mask embedding, token-major); layer 0's
        image-side projections, heads separated: ``key`` (N, H, D, HW) (transposed for ``q @ k``), ``value``
        (N, H, HW, D) of the token-to-image attention and ``query`` (N, H, HW, D) of the image-to-token one.
        The image tokens change only after that attention, so none of these depends on the prompt.
        """
        block = self.mask_decoder.transformer.layers[0]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = (embeddings + dense).flatten(2).permute(0, 2, 1)
        keyed = src + self._image_pe()
        to_image, to_token = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        key = to_image._separate_heads(to_image.k_proj(keyed), to_image.num_heads).permute(0, 1, 3, 2)
        value = to_image._separate_heads(to_image.v_proj(src), to_image.num_heads)
        query = to_token._separate_heads(to_token.q_proj(keyed), to_token.num_heads)
        return src, key, value, query

    def decode_prepared(self, src: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor,
                        coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`prepare`'s tensors of N slices and prompt i on slice i -> logits (N, 1, 256, 256)."""
        hs, keys = self.decode_tokens(src, key, value, query, coords, labels)
        first_mask_token = hs[:, 1:2, :]  # multimask_output=False: MedSAM uses mask token 0 only
        return self.mask_logits(keys, self.mask_decoder.output_hypernetworks_mlps[0](first_mask_token))

    def mask_logits(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Image tokens (N, HW, 256) and T hypernetwork outputs (N, T, C') -> mask logits (N, T, 4h, 4w)."""
        n, t = hyper.shape[:2]
        h, w = self.prompt_encoder.image_embedding_size
        logits = self.upscaled_tokens(keys) @ hyper.transpose(1, 2)  # (N, HW * 16, T), sub-pixels (i, j, k, l)
        logits = logits.reshape(n, h, w, 2, 2, 2, 2, t).permute(0, 7, 1, 3, 5, 2, 4, 6)  # rows h,i,k; cols w,j,l
        return logits.reshape(n, t, 4 * h, 4 * w)

    def upscaled_tokens(self, keys: torch.Tensor) -> torch.Tensor:
        """Upstream's ``output_upscaling`` (two stride-2, 2x2 transposed convolutions, a LayerNorm2d and GELUs)
        token-major: (N, HW, 256) -> (N, HW * 16, C'), each token's 2x2 x 2x2 output pixels in a row.

        A stride-2, 2x2 transposed convolution is a matrix product per input pixel, and LayerNorm2d a layer
        norm over each pixel's channels; channels last, the graph needs no transposes and no ReduceMean over
        a strided axis (upstream's layout), ``mask_logits`` puts the pixels in place at the end (1 channel).
        """
        conv1, norm, act1, conv2, act2 = self.mask_decoder.output_upscaling
        n, hw, c = keys.shape
        y = (keys @ conv1.weight.permute(0, 2, 3, 1).reshape(c, -1)).reshape(n, hw * 4, -1) + conv1.bias
        y = act1(torch.nn.functional.layer_norm(y, (conv1.out_channels,), norm.weight, norm.bias, norm.eps))
        y = y @ conv2.weight.permute(0, 2, 3, 1).reshape(conv1.out_channels, -1)
        return act2(y.reshape(n, hw * 16, -1) + conv2.bias)

    def decode_tokens(self, src: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor,
                      coords: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer over (slice i, prompt i): output tokens (N, 1 + 4 + K, 256), hs[:, 0] the
        IoU token and hs[:, 1 + t] mask token t, and the image tokens (N, HW, 256)."""
        dec = self.mask_decoder
        transformer, block = dec.transformer, dec.transformer.layers[0]
        n = src.shape[0]
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), self._sparse(coords, labels)], dim=1)
        # layer 0 (skip_first_layer_pe) with the image-side projections from prepare
        queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
        to_image = block.cross_attn_token_to_image
        q = to_image._separate_heads(to_image.q_proj(queries + tokens), to_image.num_heads)
        queries = block.norm2(queries + self._attend(to_image, q, key, value))
        queries = block.norm3(queries + block.mlp(queries))
        to_token, k = block.cross_attn_image_to_token, queries + tokens
        k = to_token._separate_heads(to_token.k_proj(k), to_token.num_heads).permute(0, 1, 3, 2)
        v = to_token._separate_heads(to_token.v_proj(queries), to_token.num_heads)
        keys = block.norm4(src + self._attend(to_token, query, k, v))
        image_pe = self._image_pe()
        for layer in transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=image_pe)
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + image_pe, v=keys)
        return transformer.norm_final_attn(queries + attn_out), keys

    def _sparse(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The prompt encoder's sparse embedding (N, K, 256) of points and box corners."""
        pe = self.prompt_encoder
        sparse = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)  # (N, K, 256)
        lab = labels.unsqueeze(-1)
        sparse = torch.where(lab == LABEL_PAD, pe.not_a_point_embed.weight.reshape(1, 1, -1), sparse)
        for label in (LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT):
            sparse = sparse + (lab == label).to(sparse.dtype) * pe.point_embeddings[label].weight.reshape(1, 1, -1)
        return sparse

    @staticmethod
    def _attend(attention: nn.Module, q: torch.Tensor, key_t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Upstream ``Attention.forward`` after its input projections: q (N, H, Tq, D), key_t (N, H, D, Tk) and
        v (N, H, Tk, D), heads separated (the key transposed) -> (N, Tq, C)."""
        attn = torch.softmax(q @ key_t / math.sqrt(q.shape[-1]), dim=-1)
        return attention.out_proj(attention._recombine_heads(attn @ v))

    def _image_pe(self) -> torch.Tensor:
        """The image positional encoding, token-major: (1, HW, 256) (a constant of the exported graphs)."""
        return self.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)



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
        hs, keys = self.decode_tokens(*self.prepare(embeddings), coords, labels)
        # mask token t is hs[:, 1 + t], with its own hypernetwork (upstream predict_masks)
        dec = self.mask_decoder
        hyper = torch.stack([dec.output_hypernetworks_mlps[t](hs[:, 1 + t, :]) for t in self.tokens], dim=1)
        return self.mask_logits(keys, hyper)


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
    def prepare(self, embeddings: np.ndarray) -> tuple[np.ndarray, ...]:
        """The decoder's slice-only tensors (:meth:`PromptedMaskDecoder.prepare`) of (N, 256, 64, 64) embeddings."""
        emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        with self._autocast():
            return tuple(t.float().cpu().numpy() for t in self.decoder.prepare(emb))

    @torch.inference_mode()
    def decode_prepared(self, prepared: tuple[np.ndarray, ...], coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """As :meth:`decode`, from :meth:`prepare`'s tensors of the N slices: (N, 1, 256, 256) logits."""
        tensors = [torch.from_numpy(np.ascontiguousarray(t)).to(self.device) for t in prepared]
        with self._autocast():
            logits = self.decoder.decode_prepared(*tensors, torch.from_numpy(coords.astype(np.float32)).to(self.device),
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
