"""The static-cache decoding step replayed from CUDA graphs captured by hand (generation.compile_backend graphs).

transformers' `generate` stays in charge of everything but the decoder's forward: the prefill, the logits
processors and warpers, the random stream, stop strings and EOS. Only the one-token decoding forward is replaced:
its inputs (input ids, the 4D mask transformers builds for a static cache, positions) are copied into fixed
buffers and a CUDA graph captured from the same forward replays it, so the step costs its GPU time instead of
~1,500 kernel launches from Python (15.7 ms a step against 40 ms on the H200 bench, BENCHMARKS.md issue 21).
Nothing is compiled: a capture takes one warm-up forward (0.06 s on a 7B shape). On CPU, where the same buffers
run eagerly, outputs equal transformers' static cache (`cache_implementation="static"`, `disable_compile`) token
for token (tests/test_generation_speed.py). On an H200 the captured step's logits are bitwise the eager step's,
and equal across the capturing call, later replays and a fresh capture, once cuDNN's attention kernel is left out
(backend_hf.reproducible_attention; `bench/bench_server_requests.py --parts logits,repro`, BENCHMARKS.md issue 21).

Beam search runs on the same caches: `reorder_generated_only` gives a beam batch's cache an in-place reorder of the
generated positions only (transformers' replaces the cache's tensors, which a graph would not follow).

One `DecodeGraphs` store per model object keeps a StaticCache per batch shape (row bucket x cache length; zeroed
before every batch; at most MAX_SHAPES, and all are released when the GPU lacks room for a new one) and the graphs
captured against each, one per decoder depth (early exit runs the first L blocks of the same model) and input
signature. Caches whose layers keep Python-side state per step (sliding windows) are never captured.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time
import weakref
from typing import Any, Iterator

log = logging.getLogger(__name__)

STORE_ATTRIBUTE = "_tunelens_decode_graphs"  # the model attribute holding its store (tunelens.models.merged_copy leaves it out)


class _Captured:
    """One decoding step's fixed input buffers, its graph (CUDA) and its output logits buffer."""

    def __init__(self, inputs: dict, others: dict):
        self.inputs = inputs
        self.others = others
        self.graph = None
        self.logits = None
        self.output = None


class DecodeGraphs:
    """The decoding-step graphs of one model object and the StaticCaches they write into, one per shape."""

    # Shapes (row bucket x cache length) a model keeps caches for: a request's batches take one or two (the last
    # batch is smaller), and early exit reuses the generate requests' shape.
    MAX_SHAPES = 3

    def __init__(self, model):
        self.model = model
        self.caches: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()
        self.captured: dict[tuple, _Captured] = {}
        self.cache = None
        self.captures = 0
        self.capture_seconds = 0.0

    # ------------------------------------------------------------------ the caches
    def cache_for(self, rows: int, cache_len: int):
        """The model's StaticCache for `rows` x `cache_len`, zeroed: reused when one of that shape is kept (its
        graphs with it). A new shape first releases the least recently used ones beyond MAX_SHAPES, and all of
        them when the GPU lacks room for the new one."""
        from transformers import StaticCache

        shape = (rows, cache_len)
        if shape in self.caches:
            self.caches.move_to_end(shape)
        else:
            if not self._room_for(rows * cache_len):
                self.release()
            while len(self.caches) >= self.MAX_SHAPES:
                self.release(keep=list(self.caches)[1:])
            self.caches[shape] = StaticCache(config=self.model.config.get_text_config(decoder=True),
                                             max_cache_len=cache_len)
        self.cache = self.caches[shape]
        self.cache.reset()
        self.cache.__dict__.pop("reorder_cache", None)  # a beam batch's in-place reorder (reorder_generated_only)
        return self.cache

    def _room_for(self, tokens: int) -> bool:
        """Whether the model's GPU has room for a cache of `tokens` tokens beside what is allocated now, with a
        margin for the step's activations and logits (True on CPU)."""
        import torch

        from tunelens.generation.backend_hf import KV_MEMORY_SHARE, kv_bytes_per_token
        from tunelens.models import input_device

        device = input_device(self.model)
        if device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return tokens * kv_bytes_per_token(self.model) <= free * (1 - KV_MEMORY_SHARE / 2)

    def held_bytes(self) -> int:
        """GPU bytes the kept caches hold (a cache holds none before its first prefill)."""
        total = 0
        for cache in self.caches.values():
            for layer in cache.layers:
                if getattr(layer, "is_initialized", False):
                    total += layer.keys.numel() * layer.keys.element_size()
                    total += layer.values.numel() * layer.values.element_size()
        return total

    def release(self, keep=()) -> None:
        """Drop the kept caches (but those of the shapes in `keep`) and every graph captured against them; their
        memory goes back to torch's caching allocator."""
        dropped = [shape for shape in self.caches if shape not in keep]
        for shape in dropped:
            cache = self.caches.pop(shape)
            for key in [key for key in self.captured if key[0] == id(cache)]:
                del self.captured[key]
            if cache is self.cache:
                self.cache = None
        # No torch.cuda.empty_cache(): the freed blocks stay in the caching allocator, where the memory budgets
        # (auto_token_budget, _room_for, the server's room check) count them as free, and later allocations (beam
        # search's growing dynamic cache above all) reuse them instead of paying cudaMalloc again.

    # ------------------------------------------------------------------ the forward
    @contextlib.contextmanager
    def installed(self, cache) -> Iterator[None]:
        """Within the block, the model's one-token forwards on `cache` replay a graph; everything else (the
        prefill, other caches) runs the model's own forward."""
        model = self.model
        forward = model.forward  # the bound class method (or an outer wrapper, e.g. PEFT's)

        @functools.wraps(forward)  # keeps the signature: generate inspects it (logits_to_keep)
        def graphed(*args, **kwargs):
            ids = kwargs.get("input_ids")
            if (args or kwargs.get("past_key_values") is not cache or ids is None or ids.ndim != 2
                    or ids.shape[1] != 1 or kwargs.get("inputs_embeds") is not None):
                return forward(*args, **kwargs)
            return self._step(forward, cache, kwargs)

        had_own = "forward" in model.__dict__
        previous = model.__dict__.get("forward")
        model.forward = graphed
        try:
            yield
        finally:
            if had_own:
                model.forward = previous
            else:
                del model.forward

    def _step(self, forward, cache, kwargs: dict):
        import torch

        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and k != "past_key_values"}
        from tunelens.models import decoder_layers

        key = (id(cache), len(decoder_layers(self.model)),
               tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(tensors.items())),
               tuple(sorted((k, repr(v)) for k, v in others.items())))
        entry = self.captured.get(key)
        if entry is None:
            entry = self._capture(forward, cache, tensors, others)
            self.captured[key] = entry
        else:
            for name, value in tensors.items():
                entry.inputs[name].copy_(value)
        if entry.graph is not None:
            entry.graph.replay()
            output = entry.output
        else:  # CPU: the same buffers, run eagerly
            output = forward(**entry.inputs, **entry.others, past_key_values=cache)
        return output

    def _capture(self, forward, cache, tensors: dict, others: dict) -> _Captured:
        import torch

        from tunelens.models import decoder_layers

        started = time.perf_counter()
        entry = _Captured({k: v.clone() for k, v in tensors.items()}, others)
        on_cuda = all(v.device.type == "cuda" for v in tensors.values())
        if not on_cuda:
            return entry
        reason = not_capturable(cache)
        if reason:
            log.warning("decoding step not captured (%s): it runs eagerly on the static cache", reason)
            return entry
        # The warm-up forward writes this step's keys and values and advances every layer's length; the replay
        # below does the step for real, so the lengths are put back before the capture (which runs nothing).
        lengths = [layer.cumulative_length.clone() for layer in cache.layers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(**entry.inputs, **others, past_key_values=cache)
            for layer, length in zip(cache.layers, lengths):
                layer.cumulative_length.copy_(length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                entry.output = forward(**entry.inputs, **others, past_key_values=cache)
        except Exception as exc:  # e.g. a host sync inside an unusual architecture's forward: run it eagerly
            log.warning("decoding step not capturable (%s: %s); this shape runs eagerly", type(exc).__name__, exc)
            entry.output = None
            return entry
        entry.graph = graph
        self.captures += 1
        self.capture_seconds += time.perf_counter() - started
        log.info("captured a decoding step: %d rows x cache %d, %d blocks, %.2f s", tensors["input_ids"].shape[0],
                 cache.layers[0].max_cache_len, len(decoder_layers(self.model)), time.perf_counter() - started)
        return entry


def reorder_generated_only(cache, prompt_len: int) -> None:
    """Give `cache` (a StaticCache just zeroed for one beam-search batch whose left-padded prompts are
    `prompt_len` tokens) a beam reorder that works in place over the generated positions only.

    transformers' reorder (`index_select` over the whole cache) replaces each layer's tensors, which a captured
    graph would no longer see, and copies every position. But beam search only moves a row's beams among
    themselves (its indices stay within the row's `num_beams` sequences), and all beams of a row were prefilled
    from the same prompt: their keys and values at the prompt's positions are the same, so only positions
    [prompt_len, prompt_len + steps) need the gather. transformers calls the reorder once after every forward,
    the prefill included; after the k-th call's forward the cache holds prompt_len + k positions."""
    steps = [0]
    # A weak reference: the function is an attribute of the cache, and a strong one would make a reference cycle,
    # which keeps a released cache (tens of GB at 10 beams) allocated until Python's cycle collector happens to run.
    # On the H200 DAG that held ~90 GB of dropped beam caches and sent the next requests out of memory.
    cache_ref = weakref.ref(cache)

    def reorder(beam_idx) -> None:
        done = steps[0]
        steps[0] += 1
        cache = cache_ref()
        if done == 0 or cache is None:  # right after the prefill: nothing generated yet
            return
        span = slice(prompt_len, prompt_len + done)
        for layer in cache.layers:
            if not getattr(layer, "is_initialized", False):
                continue
            index = beam_idx.to(layer.keys.device)
            layer.keys[:, :, span] = layer.keys[:, :, span].index_select(0, index)
            layer.values[:, :, span] = layer.values[:, :, span].index_select(0, index)

    cache.reorder_cache = reorder


def not_capturable(cache) -> str | None:
    """Why a decoding step on `cache` cannot be replayed from a graph, or None when it can.

    Only transformers' plain StaticLayer keeps all of its per-step state in tensors (the write position is
    `cumulative_length`, advanced in place). A sliding-window layer (Gemma 2/3, Mistral-style windows) chooses
    between roll and index writes from a Python int: a captured graph would repeat the capture step's choice
    and never advance that int, and so write the wrong slots once the window fills."""
    from transformers.cache_utils import StaticLayer

    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if kinds:
        return f"cache layers {', '.join(kinds)} keep Python-side state per step"
    return None


# Every store made in this process (a server keeps up to two models: base and merged copy).
_STORES: "weakref.WeakSet[DecodeGraphs]" = weakref.WeakSet()


def decode_graphs(model) -> DecodeGraphs:
    """The model's store, made on first use (kept as an attribute of the model object)."""
    store = model.__dict__.get(STORE_ATTRIBUTE)
    if store is None:
        store = DecodeGraphs(model)
        model.__dict__[STORE_ATTRIBUTE] = store
        _STORES.add(store)
    return store


def release_others(model: Any) -> None:
    """Free the caches every other model of this process keeps, so that what a request plans and allocates does
    not depend on which variant the server answered before (the auto batch plan reads the free memory)."""
    for store in list(_STORES):
        if store.model is not model:
            store.release()


def release_all() -> None:
    """Free every kept decoding cache of this process (before a server loads another model)."""
    for store in list(_STORES):
        store.release()


def held_bytes(model) -> int:
    """GPU bytes of the decoding cache `model` keeps between batches (0 when it keeps none)."""
    store = model.__dict__.get(STORE_ATTRIBUTE)
    return store.held_bytes() if store is not None else 0


def held_bytes_all() -> int:
    """GPU bytes of the decoding caches every model of this process keeps."""
    return sum(store.held_bytes() for store in list(_STORES))


def release(model: Any) -> None:
    """Free the model's kept decoding cache and graphs (after an out-of-memory, or before a swap)."""
    store = model.__dict__.get(STORE_ATTRIBUTE)
    if store is not None:
        store.release()
