"""Decoder layers replayed from CUDA graphs while fine-tuning (issue 24).

A QLoRA step of a 7B model on ~1,000 tokens launches ~8,000 small kernels from Python (PEFT's layers, the norms,
rotary embeddings, the autograd engine); the GPU waits on the CPU. Here every decoder layer's forward and backward
for one input shape is captured once as a pair of CUDA graphs (`torch.cuda.make_graphed_callables`, the layers of
one shape in one call so that they share a memory pool) and replayed in later steps: one launch per layer and
direction instead of hundreds. Embeddings, the final norm, the LM head, the loss, clipping and the optimizer stay
eager (a few dozen kernels).

What a graph needs, and what happens otherwise:
- fixed shapes: the batch is padded to a multiple of `pad_to_multiple_of` tokens (the caller sets the collator),
  so a training set has a handful of shapes; each is captured the first time it is seen (a few seconds), up to
  `max_shapes` and a memory budget; a shape beyond them runs eagerly;
- no host reads inside a layer, no activation checkpointing, one process (no DDP hooks), attention that reads the
  mask it is given (SDPA or eager; flash-attention's varlen metadata comes as arguments the graph cannot follow);
- training mode with gradients on. Anything else (evaluation, `no_grad`, a cache, an unknown argument) runs the
  layer's own forward; the counts and reasons go to metrics.json (`summary()`).

The graphs compute what the eager layers compute on the same inputs: the same kernels, recorded. The padding the
buckets add is masked out of attention and loss as the collator's own padding is. Dropout inside a graph draws from
the same generator through PyTorch's graph-safe random offsets, so its masks differ from an eager run's (as they do
between two eager runs with different kernels); the warm-up iterations of a capture draw from it as well.

Gradients: a graph writes its parameters' gradients into fixed buffers, and autograd may keep such a buffer as a
parameter's `.grad`. With gradient accumulation the next replay would overwrite a gradient still being summed, so a
layer's gradients still held at its next forward are first copied out of the graph's buffers (a CPU test with a
stand-in that has those buffers fails without the copy).
"""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("tunelens.training.finetune")

# Keyword arguments a decoder layer receives in training that SDPA and eager attention do not read: TRL's varlen
# metadata for flash-attention (padding-free/packing collators), the Trainer's loss normaliser, cache flags.
# The hidden-states flag is read outside the layers (transformers records a layer's output from its call).
IGNORED_KWARGS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
                            "num_items_in_batch", "cache_position", "output_hidden_states", "output_attentions",
                            "return_dict"})
GRAPH_ATTENTION = ("sdpa", "eager")
PAD_TO_MULTIPLE_OF = 64  # tokens: at 512-token rows, at most 8 shapes per batch size


def _layer_call_class():
    import torch

    class LayerCall(torch.nn.Module):
        """One decoder layer as a function of tensors only (what make_graphed_callables captures).

        Not part of the model's module tree (the state dict is unchanged); `layer` is registered so that the graph
        computes the gradients of its parameters."""

        def __init__(self, layer, forward, present):
            super().__init__()
            self.layer = layer
            self._forward = forward  # the layer's own forward (its `forward` attribute is the dispatcher)
            self._present = present  # which of mask, position_ids, cos, sin are given

        def forward(self, hidden, *tensors):
            it = iter(tensors)
            mask, position_ids, cos, sin = (next(it) if here else None for here in self._present)
            return self._forward(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=None,
                                 use_cache=False, position_embeddings=(cos, sin))

    return LayerCall


def _signature(hidden, mask, position_ids, cos, sin) -> tuple:
    def meta(t):
        return None if t is None else (tuple(t.shape), t.dtype, t.device)
    return (meta(hidden), meta(mask), meta(position_ids), meta(cos), meta(sin))


class LayerGraphs:
    """The dispatcher installed on every decoder layer of `model` (see the module docstring).

    `memory_budget` caps the bytes the captured shapes' fixed buffers may take (None: no cap); `make_graphed` is
    `torch.cuda.make_graphed_callables` unless a test gives a stand-in (with `device_types` including "cpu")."""

    def __init__(self, model, *, max_shapes: int = 16, memory_budget: int | None = None, warmup: int = 2,
                 make_graphed=None, device_types: tuple[str, ...] = ("cuda",)):
        from tunelens.models import decoder_layers

        self.layers = list(decoder_layers(model))
        self.originals = [layer.forward for layer in self.layers]
        self._own_forward = ["forward" in vars(layer) for layer in self.layers]  # e.g. another patch before this one
        self.trainable = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        self.max_shapes = max_shapes
        self.memory_budget = memory_budget
        self.warmup = warmup
        self.make_graphed = make_graphed
        self.device_types = device_types
        self.enabled = True
        # per shape: the graphed layers, and whether each layer's input requires grad
        self.graphs: dict[tuple, tuple[tuple, list[bool]]] = {}
        self.refused: dict[tuple, str] = {}
        self.static_bytes = 0
        self.pool = None
        self.captures: list[dict] = []
        self.graphed_passes = 0
        self.eager_passes: dict[str, int] = {}
        self._active = None  # (shape key, index of the next layer) of the pass under way
        for index, layer in enumerate(self.layers):
            layer.forward = self._dispatcher(index)

    # ------------------------------------------------------------------------------------------- installing
    def uninstall(self) -> None:
        for layer, original, own in zip(self.layers, self.originals, self._own_forward):
            if own:
                layer.forward = original
            else:
                del layer.forward  # the class's forward again
        self.graphs.clear()
        self._active = None
        self.enabled = False

    def summary(self) -> dict:
        return {"on": self.enabled, "shapes": self.captures, "graphed_passes": self.graphed_passes,
                "eager_passes": dict(self.eager_passes), "static_mib": round(self.static_bytes / 2**20),
                "refused_shapes": len(self.refused)}

    # ------------------------------------------------------------------------------------------- the pass
    def _eager(self, reason: str):
        self.eager_passes[reason] = self.eager_passes.get(reason, 0) + 1
        if self.eager_passes[reason] == 1:
            log.info("layer graphs: a forward pass runs eagerly: %s", reason)
        return None

    def _why_not(self, layer, hidden, mask, past_key_values, use_cache, position_embeddings, kwargs) -> str | None:
        import torch

        if not self.enabled:
            return "graphs off"
        if not torch.is_grad_enabled() or not layer.training:
            return "not training (eval or no_grad)"
        if getattr(layer, "gradient_checkpointing", False):
            return "activation checkpointing"
        if hidden.device.type not in self.device_types:
            return f"device {hidden.device.type}"
        if past_key_values is not None or use_cache:
            return "a KV cache"
        if not (isinstance(position_embeddings, tuple) and len(position_embeddings) == 2
                and all(isinstance(t, torch.Tensor) for t in position_embeddings)):
            return "no rotary position embeddings given"
        if mask is not None and not isinstance(mask, torch.Tensor):
            return f"attention mask of type {type(mask).__name__}"
        if kwargs.get("output_attentions"):
            return "attention weights asked for"
        unknown = sorted(set(kwargs) - IGNORED_KWARGS)
        if unknown:
            return f"arguments {unknown}"
        return None

    def _start_pass(self, hidden, mask, position_ids, position_embeddings, why_not):
        if why_not:
            return self._eager(why_not)
        cos, sin = position_embeddings
        key = (_signature(hidden, mask, position_ids, cos, sin), hidden.requires_grad)
        if key in self.refused:
            return self._eager(self.refused[key])
        if key not in self.graphs:
            reason = self._capture(key, hidden, mask, position_ids, cos, sin)
            if reason:
                self.refused[key] = reason
                return self._eager(reason)
        self.graphed_passes += 1
        return key

    def _dispatcher(self, index: int):
        import torch

        layer, original, last = self.layers[index], self.originals[index], len(self.layers) - 1

        def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                    position_embeddings=None, **kwargs):
            def eager():
                return original(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=use_cache,
                                position_embeddings=position_embeddings, **kwargs)

            if index == 0:  # the pass's arguments are the same for every layer: checked once
                why_not = self._why_not(layer, hidden_states, attention_mask, past_key_values, use_cache,
                                        position_embeddings, kwargs)
                key = self._start_pass(hidden_states, attention_mask, position_ids, position_embeddings, why_not)
                self._active = None if key is None else (key, 0)
            active = self._active
            if active is None or active[1] != index or not torch.is_grad_enabled():
                self._active = None
                return eager()
            key = active[0]
            graphed, requires_grad = self.graphs[key]
            cos, sin = position_embeddings
            if (_signature(hidden_states, attention_mask, position_ids, cos, sin) != key[0]
                    or hidden_states.requires_grad != requires_grad[index]):
                self._active = None  # the layers before replayed their graphs; the rest of the pass runs eagerly
                self._eager("a layer's input differs from the captured one")
                return eager()
            self._active = None if index == last else (key, index + 1)
            for parameter in self.trainable[index]:
                if parameter.grad is not None:  # still accumulating: keep it out of the graph's gradient buffer
                    parameter.grad = parameter.grad.clone()
            tensors = [t for t in (attention_mask, position_ids, cos, sin) if t is not None]
            return graphed[index](hidden_states, *tensors)

        return forward

    # ------------------------------------------------------------------------------------------- capture
    def _capture(self, key, hidden, mask, position_ids, cos, sin) -> str | None:
        """Capture every layer for this shape; None when done, else why not (the shape then runs eagerly)."""
        import torch

        if len(self.graphs) >= self.max_shapes:
            return f"more than {self.max_shapes} shapes"
        extra = [t for t in (mask, position_ids, cos, sin) if t is not None]
        # Fixed buffers per layer: input, output, output gradient, input gradient, and the extra inputs.
        need = len(self.layers) * (4 * hidden.numel() * hidden.element_size()
                                   + sum(t.numel() * t.element_size() for t in extra))
        if self.memory_budget is not None and self.static_bytes + need > self.memory_budget:
            return (f"graph memory budget: {(self.static_bytes + need) / 2**20:.0f} MiB of fixed buffers over "
                    f"{self.memory_budget / 2**20:.0f} MiB")
        present = tuple(t is not None for t in (mask, position_ids, cos, sin))
        call = _layer_call_class()
        callables = tuple(call(layer, original, present) for layer, original in zip(self.layers, self.originals))
        requires_grad, samples, flag = [], [], hidden.requires_grad
        for index in range(len(self.layers)):
            requires_grad.append(flag)
            samples.append((hidden.detach().clone().requires_grad_(flag), *[t.detach() for t in extra]))
            flag = flag or bool(self.trainable[index])
        make_graphed = self.make_graphed or torch.cuda.make_graphed_callables
        autocast = contextlib.nullcontext()
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # make_graphed_callables refuses autocast's weight cache
            autocast = torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)
        if self.pool is None and device_type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()  # one pool for every shape: they never run concurrently
        started = time.perf_counter()
        try:
            with autocast:
                graphed = make_graphed(callables, tuple(samples), num_warmup_iters=self.warmup, pool=self.pool)
        except Exception as exc:  # an op that cannot be captured, or memory: no graphs for the rest of the run
            self.enabled = False
            log.warning("layer graphs: capture failed, training continues eagerly: %s: %s", type(exc).__name__, exc)
            if device_type == "cuda":
                torch.cuda.empty_cache()
            return f"capture failed ({type(exc).__name__})"
        self.graphs[key] = (graphed, requires_grad)
        self.static_bytes += need
        record = {"shape": list(hidden.shape), "mask": None if mask is None else list(mask.shape),
                  "capture_s": round(time.perf_counter() - started, 3), "static_mib": round(need / 2**20)}
        self.captures.append(record)
        log.info("layer graphs: captured %d layers for input %s in %.2f s (%d MiB of fixed buffers)",
                 len(self.layers), record["shape"], record["capture_s"], record["static_mib"])
        return None
