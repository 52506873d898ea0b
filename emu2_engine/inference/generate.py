"""Generation with an Emu2 model over a key/value cache: greedy text, and the regression loop
that produces an image's visual embeddings.

A prompt is one unpacked document: ids (S,) or (1, S), with `images` (N, 3, R, R) filling its
`<image>`/`[gIMG]` placeholders as `Emu2Model.logits` fills them (`Emu2Model.prompt_embeddings`).

- `prefill` runs the prompt through the decoder once and keeps every layer's keys and values
  in a `KVCache`; `extend` runs new positions after them (token ids, or input-embedding rows).
  Both give the final hidden states the full forward gives at those positions (positions
  0 .. S - 1 continuing, one document): the tests hold the logits to the full forward's within
  1e-5 at fp32.
- `generate_text`: greedy decoding, one cached step per new token, until `</s>` or
  `max_new_tokens`.
- `generate_image_embeddings`: the prompt ends with `[IMG]`; the output there, through
  `project_down`, is embedding 1; embedding k is then placed at the next position as the model
  places a real image's pooled feature at an `<image>` slot (`project_up`, `Projector.forward`),
  and the output there is embedding k + 1, n_query times: the training objective's shift of
  one (EMU2_FACTS.md, "Objectives"), run forward. The result, (n_query, vision width), is what
  `inference.decode.decode_images` takes.
- `generate_text_uncached` and `generate_image_embeddings_uncached` are the references: one
  full forward per new token or embedding over everything so far, as the official Emu2 code
  generates images (64 passes, no cache).

Generation is greedy and for one prompt at a time (batch 1); `prefill`/`extend` and the cache
take B rows of equal length. No sampling, no beam search (the paper's chat evaluation uses 5
beams). Text generation never picks a visual placeholder (`<image>`, `[gIMG]`): those positions
hold visual embeddings, never their own token embedding, so the model cannot continue from one.

`python -m emu2_engine.inference.generate` times the cached loops against the references for a
randomly initialised debug model (`benchmark`).
"""

from __future__ import annotations

import numbers
import time

import torch

from emu2_engine.models.emu2 import Emu2Model

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class KVCache:
    """Keys and values of every decoder layer for positions 0 .. length - 1 of B rows, in
    buffers of `capacity` positions allocated at a layer's first `update` (in the dtype and on
    the device of its keys). Implements `models.llama.KVStore`."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a KV cache needs a capacity of at least one position, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self._keys: dict[str, torch.Tensor] = {}
        self._values: dict[str, torch.Tensor] = {}

    def update(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; {end} are needed")
        if layer not in self._keys:
            B, H, _, D = k.shape
            self._keys[layer] = k.new_empty(B, H, self.capacity, D)
            self._values[layer] = v.new_empty(B, H, self.capacity, D)
        keys, values = self._keys[layer], self._values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# -- the cached forward ---------------------------------------------------------------------
@torch.no_grad()
def prefill(model: Emu2Model, input_ids: torch.Tensor, images: torch.Tensor | None = None, *,
            max_new: int) -> tuple[torch.Tensor, KVCache]:
    """(B, S) prompt ids (placeholders filled from `images`) -> (final hidden states
    (B, S, hidden), a cache holding the prompt with room for `max_new` more positions)."""
    h = model.prompt_embeddings(input_ids, images)
    cache = KVCache(input_ids.shape[1] + max_new)
    return model.llm.forward_cached(h, cache), cache


@torch.no_grad()
def extend(model: Emu2Model, cache: KVCache, input_ids: torch.Tensor | None = None,
           embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Run n new positions after those `cache` holds, given either as token ids (B, n) or as
    LLM input rows (B, n, hidden) (a visual embedding after `project_up`); returns their final
    hidden states (B, n, hidden). Input rows are cast to the token embeddings' dtype, as
    `Emu2Model.embed` casts the visual rows it writes."""
    if (input_ids is None) == (embeds is None):
        raise ValueError("extend takes either input_ids (B, n) or embeds (B, n, hidden), not both or neither")
    if embeds is None:
        h = model.llm.embed_tokens(input_ids)
    else:
        h = embeds.to(model.llm.embed_tokens.weight.dtype)
    return model.llm.forward_cached(h, cache)


# -- text -----------------------------------------------------------------------------------
@torch.no_grad()
def generate_text(model: Emu2Model, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                  max_new_tokens: int = 64, eos_id: int | None = None) -> torch.Tensor:
    """Greedy continuation of one prompt ((S,) or (1, S) ids, batch 1) with the KV cache.

    Returns the new ids, (n,) int64 with 1 <= n <= max_new_tokens, ending with `eos_id` (default
    the model's `</s>`) when it was generated. `<image>`/`[gIMG]` are never picked."""
    ids, eos, banned = _check_text_args(model, input_ids, max_new_tokens, eos_id)
    hidden, cache = prefill(model, ids, _to(images, ids.device), max_new=max_new_tokens - 1)
    new = []
    for step in range(max_new_tokens):
        token = _greedy(model.lm_head(hidden[:, -1]), banned)  # (1,)
        new.append(token)
        if int(token) == eos or step == max_new_tokens - 1:
            break
        hidden = extend(model, cache, input_ids=token[:, None])
    return torch.cat(new)


@torch.no_grad()
def generate_text_uncached(model: Emu2Model, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                           max_new_tokens: int = 64, eos_id: int | None = None) -> torch.Tensor:
    """`generate_text` by one full `model.logits` over the whole sequence per new token."""
    ids, eos, banned = _check_text_args(model, input_ids, max_new_tokens, eos_id)
    images = _to(images, ids.device)
    new = []
    for _ in range(max_new_tokens):
        token = _greedy(model.logits(ids, images)[:, -1], banned)
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if int(token) == eos:
            break
    return torch.cat(new)


# -- visual embeddings ----------------------------------------------------------------------
@torch.no_grad()
def generate_image_embeddings(model: Emu2Model, input_ids: torch.Tensor,
                              images: torch.Tensor | None = None) -> torch.Tensor:
    """The n_query visual embeddings (n_query, vision width) of the image a prompt ending with
    `[IMG]` opens ((S,) or (1, S) ids, batch 1), regressed one by one with the KV cache."""
    ids = _check_image_prompt(model, input_ids)
    n = model.cfg.n_query
    hidden, cache = prefill(model, ids, _to(images, ids.device), max_new=n - 1)
    out = []
    for k in range(n):
        e = model.project_down(hidden[:, -1])  # (1, C): embedding k + 1
        out.append(e)
        if k + 1 < n:  # e's slot: its input row is what a real image's pooled feature gets
            hidden = extend(model, cache, embeds=model.projector(e)[:, None])
    return torch.cat(out)


@torch.no_grad()
def generate_image_embeddings_uncached(model: Emu2Model, input_ids: torch.Tensor,
                                       images: torch.Tensor | None = None) -> torch.Tensor:
    """`generate_image_embeddings` by n_query full forward passes, each over the prompt and
    the slots of the embeddings so far (as the official Emu2 code does)."""
    ids = _check_image_prompt(model, input_ids)
    prompt = model.prompt_embeddings(ids, _to(images, ids.device))  # (1, S, hidden)
    out: list[torch.Tensor] = []
    for _ in range(model.cfg.n_query):
        rows = model.projector(torch.cat(out)) if out else prompt[0, :0]
        h = torch.cat([prompt, rows.to(prompt.dtype)[None]], dim=1)
        S = h.shape[1]
        doc = torch.zeros(1, S, dtype=torch.int32, device=h.device)
        pos = torch.arange(S, dtype=torch.int32, device=h.device)[None]
        hidden = model.llm(h, pos, doc, torch.full_like(doc, -1))
        out.append(model.project_down(hidden[:, -1]))
    return torch.cat(out)


# -- checks and helpers ---------------------------------------------------------------------
def _check_ids(model: Emu2Model, input_ids) -> torch.Tensor:
    """One prompt as (1, S) int64 on the model's device; ValueError naming what is wrong."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in _ID_DTYPES:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be one prompt, (S,) or (1, S) with S >= 1 (generation "
                         f"runs one prompt at a time), got shape {tuple(input_ids.shape)}")
    V = model.cfg.llm.vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"input_ids must lie in [0, {V}) (the model's vocabulary), got values "
                         f"in [{lo}, {hi}]")
    return ids.to(device=model.lm_head.weight.device, dtype=torch.int64)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_text_args(model: Emu2Model, input_ids, max_new_tokens,
                     eos_id) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(1, S) ids, the stop id, the ids never generated (the visual placeholders)."""
    ids = _check_ids(model, input_ids)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    special = model.cfg.special_ids
    eos = special.eos if eos_id is None else eos_id
    V = model.cfg.llm.vocab_size
    if not _is_int(eos) or not 0 <= eos < V:
        raise ValueError(f"eos_id must be a token id in [0, {V}), got {eos_id!r}")
    # the last new token is produced, not fed: S + max_new_tokens - 1 positions run
    _check_length(model, ids.shape[1], max_new_tokens - 1, "positions for max_new_tokens new tokens")
    banned = torch.tensor(special.visual_slots, device=ids.device)
    return ids, int(eos), banned


def _check_length(model: Emu2Model, prompt: int, new: int, what: str) -> None:
    """The prompt and what is generated after it fit the model's positions."""
    limit = model.cfg.llm.max_positions
    if prompt + new > limit:
        raise ValueError(f"a prompt of {prompt} positions and {new} {what} exceed the model's "
                         f"max_positions ({limit})")


def _check_image_prompt(model: Emu2Model, input_ids) -> torch.Tensor:
    ids = _check_ids(model, input_ids)
    img = model.cfg.special_ids.img
    if int(ids[0, -1]) != img:
        raise ValueError(f"an image-generation prompt must end with [IMG] (id {img}): the output "
                         f"there predicts the first visual embedding; it ends with id {int(ids[0, -1])}")
    # the slots of embeddings 1 .. n_query - 1 follow the prompt
    _check_length(model, ids.shape[1], model.cfg.n_query - 1, "visual embedding slots")
    return ids


def _greedy(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) argmax ids, never one of `banned`."""
    logits = logits.float().index_fill(-1, banned, float("-inf"))
    return logits.argmax(-1)


def _to(images: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if images is None else images.to(device)


# -- timing ---------------------------------------------------------------------------------
def benchmark(preset: str = "debug", prompt_len: int = 101, new_tokens: int = 32, seed: int = 0,
              repeats: int = 3) -> dict[str, float]:
    """Seconds per call (best of `repeats`, after a warm-up) of the cached loops and their
    references for a randomly initialised `preset` model at fp32 on the CPU: `new_tokens`
    greedy tokens after a text prompt of `prompt_len` ids (no early stop: `eos_id` is a visual
    placeholder, which is never picked), and n_query embeddings after the same prompt +
    `[IMG]`. Prints a table."""
    from emu2_engine.models.config import Emu2Config

    torch.manual_seed(seed)
    model = Emu2Model(Emu2Config.from_preset(preset)).eval()
    special = model.cfg.special_ids
    text = torch.randint(3, model.cfg.base_vocab_size, (prompt_len,))
    text[0] = special.bos
    image_prompt = torch.cat([text, torch.tensor([special.img])])
    never = special.image
    text_args = dict(max_new_tokens=new_tokens, eos_id=never)
    runs = {
        "text, cached": lambda: generate_text(model, text, **text_args),
        "text, uncached": lambda: generate_text_uncached(model, text, **text_args),
        "image embeddings, cached": lambda: generate_image_embeddings(model, image_prompt),
        "image embeddings, uncached": lambda: generate_image_embeddings_uncached(model, image_prompt),
    }
    seconds = {}
    for name, run in runs.items():
        run()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds[name] = min(times)
    print(f"{preset} model, fp32, CPU ({torch.get_num_threads()} threads); prompt {prompt_len} ids, "
          f"{new_tokens} new tokens, {model.cfg.n_query} embeddings (best of {repeats})")
    for name, s in seconds.items():
        print(f"  {name:28s} {s * 1e3:9.1f} ms")
    for kind in ("text", "image embeddings"):
        print(f"  {kind}: cached is {seconds[kind + ', uncached'] / seconds[kind + ', cached']:.1f}x faster")
    return seconds


if __name__ == "__main__":
    benchmark()
