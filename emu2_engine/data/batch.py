"""The packed micro-batch: the contract between the data pipeline and the model.

Layout (see `shared/DESIGN.md`, "Sequence metadata"), for B rows of S tokens:

- ``input_ids`` (B, S) int64 and ``labels`` (B, S) int64. Labels are *already shifted*:
  ``labels[b, t]`` is the token that the output at position t must predict, -100 where no
  text loss is taken (visual placeholders, ``[IMG]``/``[/IMG]`` as targets, padding, the
  last token of each document).
- ``doc_ids``, ``span_ids``, ``position_ids`` (B, S) int32, as in DESIGN.md.
- ``images`` (N, 3, H, W) float: every image (or video frame) of the micro-batch, already
  normalised. ``image_slots`` (N, n_query) int64: for image n, the flat indices
  (``b * S + t``) of its ``<image>``/``[gIMG]`` slots, in order. A video frame of a model whose
  frames take fewer embeddings than its images (Emu2-Chat: 64 against 256, the model config's
  ``frame_n_query``) has that many ``[gIMG]`` slots, then -1 to the end of its row; the model
  tells frames by the token at their first slot.
- ``reg_images`` (R,) int64: which images are regression targets; ``reg_positions``
  (R, n_query) int64: flat indices of the hidden states that predict each of their
  embeddings (the ``[IMG]`` position, then the first n_query - 1 slots: the shift of one).
- ``image_mask`` (N,) bool: True for real images, False for padding images. The loader pads
  every micro-batch to the same number of images (``data.max_images``) so pipeline stages
  see fixed shapes; a padding image is zeros, its ``image_slots`` row is -1, no regression
  target names it, and the model writes its embeddings nowhere. None means every image is
  real (batches built by hand).
- ``real_images`` int, optional (not a tensor: it stays on the host): the number of real images
  when they all come before the padding ones (the loader's batches), counted on the CPU
  (`with_real_images`). A pipeline's first stage runs its encoder on those only: the padding
  must stay in the fixed-shape inputs of the schedule, but need not go through the ViT.
- ``text_rows`` (n,) int64, optional: the flat indices (``b * S + t``) where ``labels`` is not
  -100, ascending. `with_text_rows` computes them on the CPU after `validate`; the head loss
  then finds its rows without reading the labels back from the GPU (no synchronisation in the
  step). None: the head loss finds them itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class PackedBatch:
    """One packed micro-batch (all tensors on one device)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    span_ids: torch.Tensor
    position_ids: torch.Tensor
    images: torch.Tensor
    image_slots: torch.Tensor
    reg_images: torch.Tensor
    reg_positions: torch.Tensor
    image_mask: torch.Tensor | None = None
    text_rows: torch.Tensor | None = None
    real_images: int | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor moved to `device` (`real_images` is a host number)."""
        def move(t):
            return t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t
        return PackedBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @property
    def n_tokens(self) -> int:
        """Tokens in the batch that belong to a document (padding excluded)."""
        return int((self.doc_ids >= 0).sum())

    @property
    def n_images(self) -> int:
        """Real images in the batch (padding images excluded)."""
        if self.image_mask is None:
            return int(self.images.shape[0])
        return int(self.image_mask.sum())

    def without_padding_images(self) -> "PackedBatch":
        """The batch with its trailing padding images dropped, keeping at least one image slot
        when it had any; the losses and gradients are those of the padded batch.

        The loader pads every micro-batch to ``max_images`` so that pipeline stages see fixed
        shapes; without pipelining those zero images would only cost encoder time (about 4 % of
        the slots on proxy-1b's data). One slot is kept so that the encoder runs on every micro-batch:
        under FSDP every rank must gather and reduce the encoder's blocks in each step. Read on
        CPU tensors (the mask is read). A batch whose padding is not trailing (built by hand) is
        returned as is."""
        n_real = self._leading_real_images()
        if n_real is None or self.image_mask.numel() == 0:
            return self
        keep = max(n_real, 1)
        if keep == self.image_mask.numel():
            return self
        return replace(self, images=self.images[:keep], image_slots=self.image_slots[:keep],
                       image_mask=self.image_mask[:keep])

    def with_real_images(self) -> "PackedBatch":
        """The batch with ``real_images`` set when its real images all come before its padding
        ones (read on the CPU); as it is otherwise."""
        n_real = self._leading_real_images()
        return self if n_real is None else replace(self, real_images=n_real)

    def _leading_real_images(self) -> int | None:
        """The number of real images when they all come before the padding ones (the loader's
        batches), read on the CPU; None without a mask or when padding comes between them."""
        if self.image_mask is None:
            return None
        mask = self.image_mask.cpu()
        n_real = int(mask.sum())
        return n_real if bool(mask[:n_real].all()) else None

    def with_text_rows(self) -> "PackedBatch":
        """The batch with ``text_rows`` filled in from its labels (read them on the CPU, after
        `validate`: the head loss trusts the ranges of a batch that carries them)."""
        rows = (self.labels.reshape(-1) != -100).nonzero().squeeze(1)
        if self.labels.is_pinned():  # as the prefetcher hands batches over: an asynchronous copy
            rows = rows.pin_memory()
        return replace(self, text_rows=rows)

    def validate(self, vocab_size: int, n_query: int, image_size: int,
                 frame_n_query: int | None = None, frame_slot: int | None = None) -> None:
        """Check shapes, dtypes and ranges; raise ValueError naming what is wrong. Every real
        image has n_query slots, but for a video frame (`frame_slot`, the `[gIMG]` id, at its
        first slot) of a model whose frames take `frame_n_query` fewer: that many, then -1."""
        B, S = self.input_ids.shape
        for name in ("labels", "doc_ids", "span_ids", "position_ids"):
            t = getattr(self, name)
            if tuple(t.shape) != (B, S):
                raise ValueError(f"batch.{name} must have shape {(B, S)} like input_ids, got {tuple(t.shape)}")
        lo, hi = int(self.input_ids.min()), int(self.input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"batch.input_ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
        bad = (self.labels != -100) & ((self.labels < 0) | (self.labels >= vocab_size))
        if bad.any():
            raise ValueError(f"batch.labels must be -100 or in [0, {vocab_size}), got {int(self.labels[bad][0])}")
        N = self.images.shape[0]
        if self.images.dim() != 4 or tuple(self.images.shape[1:]) != (3, image_size, image_size):
            raise ValueError(f"batch.images must have shape (N, 3, {image_size}, {image_size}), "
                             f"got {tuple(self.images.shape)}")
        if tuple(self.image_slots.shape) != (N, n_query):
            raise ValueError(f"batch.image_slots must have shape ({N}, {n_query}) for {N} images "
                             f"of {n_query} embeddings, got {tuple(self.image_slots.shape)}")
        real = torch.ones(N, dtype=torch.bool) if self.image_mask is None else self.image_mask.cpu()
        if real.dtype != torch.bool or tuple(real.shape) != (N,):
            raise ValueError(f"batch.image_mask must be a ({N},) bool tensor, got "
                             f"{real.dtype} {tuple(real.shape)}")
        R = self.reg_images.shape[0]
        if tuple(self.reg_positions.shape) != (R, n_query):
            raise ValueError(f"batch.reg_positions must have shape ({R}, {n_query}), got "
                             f"{tuple(self.reg_positions.shape)}")
        if frame_n_query is not None and frame_n_query != n_query and frame_slot is None:
            raise ValueError("batch.validate needs frame_slot (the [gIMG] id) to tell the video "
                             f"frames of {frame_n_query} embeddings from the images of {n_query}")
        slots = self.image_slots.cpu()
        want = torch.where(real, n_query, 0)  # slots per row: a padding image has none
        if frame_n_query is not None and frame_n_query != n_query and N:
            first = self.input_ids.reshape(-1).cpu()[slots[:, 0].clamp(0, B * S - 1)]
            want[real & (first == frame_slot)] = frame_n_query
        used = torch.arange(n_query) < want[:, None]
        bad_rows = ((slots >= 0) != used)[real].any(1)
        if bool(bad_rows.any()):
            k = int(real.nonzero().squeeze(1)[bad_rows][0])
            kind = "a video frame" if int(want[k]) != n_query else "an image"
            raise ValueError(f"batch.image_slots row {k} ({kind}) must hold {int(want[k])} "
                             f"positions, then -1 to the end of the row; got "
                             f"{int((slots[k] >= 0).sum())} positions >= 0")
        for name, t in (("image_slots", slots[used]), ("reg_positions", self.reg_positions)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= B * S):
                raise ValueError(f"batch.{name} holds flat positions outside [0, {B * S})")
        if R and (int(self.reg_images.min()) < 0 or int(self.reg_images.max()) >= N
                  or not bool(real[self.reg_images.cpu()].all())):
            raise ValueError(f"batch.reg_images must index real images among the {N} of the batch")
        if R and bool((want[self.reg_images.cpu()] != n_query).any()):
            raise ValueError(f"batch.reg_images names a video frame of {frame_n_query} embeddings: "
                             f"only inputs of n_query = {n_query} are regressed")
