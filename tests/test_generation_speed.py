"""Generation at the GPU's speed (issue 21): one request thread per server, the static KV cache and the merged
adapter, checked on CPU with tiny models (the speed itself is measured on the GPU: BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from tunelens.generation import genserver, server_state
from tunelens.generation.agreement import token_agreement
from tunelens.generation.backend_hf import (
    kv_bytes_per_token, plan_batches, row_bucket, static_cache_len, static_len_bucket,
)
from tunelens.generation.decoding import DecodingConfig
from tunelens.generation.generate import (
    STATIC_AUTO_MIN_NEW_TOKENS, GenerationSettings, generate, hf_generate_batched, resolve_on_device,
    resolve_static_cache,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROWS = [
    {"id": f"s-{i}", "instruction": text, "input": "", "output": "x"}
    for i, text in enumerate(["Name a colour.", "Add the numbers 2 and 3 and say the result.", "Say hello.",
                              "Write a Python function that returns the square of x, with a docstring.",
                              "Name a fruit."])
]
GREEDY = DecodingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory, tmp_path_factory):
    """(model dir, LoRA adapter with random non-zero A and B on every linear layer, test file)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_factory("llama", 2)
    work = tmp_path_factory.mktemp("speed")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(work / "adapter")
    test_file = work / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return model_dir, work / "adapter", test_file


def _generate(tiny, out: Path, **overrides) -> tuple[dict, list[dict]]:
    model_dir, adapter_dir, test_file = tiny
    kwargs = dict(model_name="tiny", model_path=model_dir, decoding_config=GREEDY.as_dict(), max_new_tokens=10,
                  seed=7, backend="hf", batch_size=3, device="cpu")
    if overrides.pop("variant", "base") == "finetuned":
        kwargs.update(variant="finetuned", adapter_dir=adapter_dir)
    kwargs.update(overrides)
    meta = generate(test_file, out, **kwargs)
    return meta, [json.loads(line) for line in Path(out).read_text().splitlines()]


# --------------------------------------------------------------------------------------------- request thread
def test_every_request_of_a_server_runs_on_one_thread(monkeypatch):
    """Per-thread state (CUDA graphs, cuBLAS handles, grad mode) must survive between requests: the server used
    to run each request on its connection's new thread, paying first-call costs every time."""
    state = server_state._Server("k", idle_timeout_s=60)
    seen: list[int] = []
    initialised = threading.local()
    inits = []

    def stand_in(job):
        if not getattr(initialised, "done", False):  # what a fresh thread pays once (a cuBLAS handle, a graph)
            initialised.done = True
            inits.append(threading.get_ident())
        seen.append(threading.get_ident())
        return {"execution": {}}, [job["n"]]

    monkeypatch.setattr(state, "generate", stand_in)
    answers = []
    try:
        for n in range(3):  # as serve() does: each connection handled on a thread of its own
            server_end, client_end = socket.socketpair()
            thread = threading.Thread(target=state.handle, args=(server_end,))
            thread.start()
            genserver.send_frame(client_end, {"op": "generate", "job": {"n": n}})
            answers.append(genserver.recv_frame(client_end, 30))
            thread.join()
            client_end.close()
    finally:
        state.close()
    assert [a["rows"] for a in answers] == [[0], [1], [2]]
    assert len(set(seen)) == 1, "requests ran on different threads"
    assert len(inits) == 1, "per-thread initialisation ran more than once"


# --------------------------------------------------------------------------------------------- static cache
def test_row_and_length_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 36, 64, 65, 196, 304)] == [1, 2, 4, 8, 64, 64, 128, 256, 320]
    # beam search pads to multiples of 4: each filler row costs num_beams sequences
    assert [row_bucket(n, 10) for n in (1, 2, 3, 5, 36, 37)] == [1, 2, 4, 8, 36, 40]
    assert static_cache_len(166, 256) == 512 and static_cache_len(200, 56) == 256 and static_cache_len(1, 1) == 256
    assert static_cache_len(166, 256, 64) == 448 and static_len_bucket("graphs") == 64
    assert static_len_bucket("inductor") == 256  # a compile per shape: coarse buckets


def test_static_plan_charges_the_padded_cache():
    settings = GenerationSettings(max_new_tokens=10)
    lengths = [30] * 10
    # budget 2,000 tokens of cache: a static cache of 256 tokens a row holds 4 rows (bucket 4 -> 1,024 tokens,
    # bucket 8 -> 2,048 > 2,000); the dynamic plan charges only 40 tokens a row
    static = plan_batches(lengths, list(range(10)), settings, 1, (2000, 0), kv_bytes=1, static_len=256)
    dynamic = plan_batches(lengths, list(range(10)), settings, 1, (2000, 0), kv_bytes=1)
    assert [len(b) for b in static] == [4, 4, 2]
    assert [len(b) for b in dynamic] == [10]
    # beams multiply the cache: 3 beams x 256 tokens x row_bucket(2, 3) = 2 rows hold 1,536 tokens, 3 rows (bucket
    # 4) 3,072
    beams = plan_batches(lengths, list(range(10)), settings, 3, (2000, 0), kv_bytes=1, static_len=256)
    assert [len(b) for b in beams] == [2] * 5


def test_static_cache_greedy_equals_the_dynamic_cache(tiny, tmp_path):
    """transformers allows the static cache on CPU (uncompiled): greedy rows are token for token the dynamic
    cache's although each batch of 3 rows is padded to 4 with a copy of its last prompt."""
    dynamic_meta, dynamic = _generate(tiny, tmp_path / "d.jsonl", static_cache=False)
    static_meta, static = _generate(tiny, tmp_path / "s.jsonl", static_cache=True)
    assert dynamic_meta["kv_cache"] == "dynamic" and static_meta["kv_cache"] == "static"
    assert static_meta["batches"][0] | {} == {"rows": 3, "prompt_tokens": static_meta["batches"][0]["prompt_tokens"],
                                              "padded_rows": 4, "cache_len": 64}
    assert "Static KV cache" in static_meta["semantics"] and "Static KV cache" not in dynamic_meta["semantics"]
    assert [r["generated"] for r in static] == [r["generated"] for r in dynamic]
    assert [r["num_generated_tokens"] for r in static] == [r["num_generated_tokens"] for r in dynamic]


def test_static_cache_sampling_is_reproducible(tiny, tmp_path):
    sampled = DecodingConfig(temperature=1.0, top_k=0).as_dict()
    first = _generate(tiny, tmp_path / "a.jsonl", static_cache=True, decoding_config=sampled)[1]
    second = _generate(tiny, tmp_path / "b.jsonl", static_cache=True, decoding_config=sampled)[1]
    assert first == second


def test_beam_search_on_the_static_cache_equals_the_dynamic_cache(tiny, tmp_path):
    """compile_backend graphs runs beam search on tunelens' static cache, whose reorder works in place over the
    generated positions only (graphs.reorder_generated_only): the beams equal the dynamic cache's, which
    transformers reorders whole. The other backends keep the dynamic cache for beams."""
    for beams in (2, 3):
        config = DecodingConfig(num_beams=beams, temperature=0.0).as_dict()
        dynamic_meta, dynamic = _generate(tiny, tmp_path / f"d{beams}.jsonl", decoding_config=config,
                                          max_new_tokens=16)
        meta, static = _generate(tiny, tmp_path / f"s{beams}.jsonl", static_cache=True, decoding_config=config,
                                 max_new_tokens=16)
        assert dynamic_meta["kv_cache"] == "dynamic" and meta["kv_cache"] == "static"
        assert "Beam search on the static cache" in meta["semantics"]
        assert meta["batches"][0]["padded_rows"] == 4  # 3 rows: the beam bucket
        assert [r["generated"] for r in static] == [r["generated"] for r in dynamic]
    # beam sampling (decoding.beam_mode beam_sample): batches of 4 and 1 rows need no filler rows, so the random
    # stream is the dynamic cache's too
    deterministic = [r["generated"] for r in static]  # 3 beams, beam_search
    sample = DecodingConfig(num_beams=3, temperature=1.0, top_k=0).as_dict()
    dynamic = _generate(tiny, tmp_path / "ds.jsonl", decoding_config=sample, beam_mode="beam_sample", batch_size=4,
                        max_new_tokens=16)[1]
    meta, static = _generate(tiny, tmp_path / "ss.jsonl", static_cache=True, decoding_config=sample,
                             beam_mode="beam_sample", batch_size=4, max_new_tokens=16)
    assert meta["kv_cache"] == "static" and [b["padded_rows"] for b in meta["batches"]] == [4, 1]
    assert [r["generated"] for r in static] == [r["generated"] for r in dynamic]
    assert [r["generated"] for r in static] != deterministic  # it did sample
    eager, _ = _generate(tiny, tmp_path / "e.jsonl", static_cache=True, compile_backend="eager",
                         decoding_config=DecodingConfig(num_beams=2, temperature=0.0).as_dict())
    assert eager["kv_cache"] == "dynamic" and "Static KV cache" not in eager["semantics"]


def test_beam_reorder_moves_only_generated_positions(tiny_loaded):
    """The in-place reorder gathers positions [prompt, prompt + steps) across a row's beams and leaves the
    prompt's positions (the same for every beam of a row) and the tensors' storage where they were."""
    import torch

    from tunelens.generation import graphs

    model, _ = tiny_loaded
    store = graphs.decode_graphs(model)
    cache = store.cache_for(4, 64)
    config = model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        layer.lazy_initialization(torch.zeros(4, heads, 1, dim), torch.zeros(4, heads, 1, dim))
        layer.keys.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(layer.keys))
        layer.values.copy_(layer.keys + 10)
    storage = [layer.keys.data_ptr() for layer in cache.layers]
    graphs.reorder_generated_only(cache, prompt_len=5)
    swap = torch.tensor([1, 1, 3, 2])  # row 0's beams both take beam 1; row 1's beams swap
    cache.reorder_cache(swap)  # after the prefill: nothing generated, nothing moves
    assert all(torch.equal(layer.keys[:, 0, 0, 0], torch.arange(4.0)) for layer in cache.layers)
    cache.reorder_cache(swap)
    cache.reorder_cache(swap)  # two tokens generated: positions 5 and 6 move
    for layer in cache.layers:
        assert layer.keys[:, 0, :5, 0].tolist() == [[float(b)] * 5 for b in range(4)]  # the prompt stays
        assert layer.keys[:, 0, 5:7, 0].tolist() == [[1.0, 1.0], [1.0, 1.0], [2.0, 3.0], [3.0, 2.0]]
        assert layer.keys[:, 0, 7:, 0].tolist() == [[float(b)] * 57 for b in range(4)]  # not yet written
        assert torch.equal(layer.values, layer.keys + 10)
    assert [layer.keys.data_ptr() for layer in cache.layers] == storage
    graphs.release(model)


def test_a_released_beam_cache_is_freed_at_once(tiny_loaded):
    """The beam reorder is an attribute of its cache: it must not keep the cache alive. A reference cycle left each
    released beam cache to Python's cycle collector; on the H200 ~90 GB of them were still allocated when the
    next requests planned their batches, which then ran out of memory down to single rows."""
    import gc
    import weakref

    from tunelens.generation import graphs

    model, _ = tiny_loaded
    store = graphs.decode_graphs(model)
    cache = store.cache_for(4, 64)
    graphs.reorder_generated_only(cache, prompt_len=5)
    gone = weakref.ref(cache)
    del cache
    enabled = gc.isenabled()
    gc.disable()  # only reference counting may free it
    try:
        graphs.release(model)
        assert gone() is None, "the released beam cache is still alive (a reference cycle through its reorder)"
    finally:
        if enabled:
            gc.enable()


def test_auto_turns_both_on_for_cuda_only(tiny, tmp_path):
    assert resolve_on_device("auto", "cuda:0") and not resolve_on_device("auto", "cpu")
    assert resolve_on_device(True, "cpu") and not resolve_on_device(False, "cuda")
    long, short = STATIC_AUTO_MIN_NEW_TOKENS, STATIC_AUTO_MIN_NEW_TOKENS - 1
    # graphs (the default) captures rather than compiles: on CUDA at any length; a compiling backend from `long`
    assert resolve_static_cache("auto", "cuda:0", short) and resolve_static_cache("auto", "cuda:0", 1, "graphs")
    for backend in ("inductor", "cudagraphs", "eager"):
        assert resolve_static_cache("auto", "cuda:0", long, backend)
        assert not resolve_static_cache("auto", "cuda:0", short, backend)
    assert not resolve_static_cache("auto", "cpu", long) and resolve_static_cache(True, "cpu", 1)
    meta, _ = _generate(tiny, tmp_path / "f.jsonl", variant="finetuned")  # defaults: auto, on CPU
    assert meta["kv_cache"] == "dynamic" and meta["adapter_merged"] is False
    assert "merged" not in meta["semantics"] and "Static" not in meta["semantics"]


# --------------------------------------------------------------------------------------------- merged adapter
def test_merged_adapter_agrees_with_peft_token_for_token(tiny, tmp_path):
    peft_meta, peft_rows = _generate(tiny, tmp_path / "p.jsonl", variant="finetuned", merge_adapter=False)
    merged_meta, merged_rows = _generate(tiny, tmp_path / "m.jsonl", variant="finetuned", merge_adapter=True)
    base_rows = _generate(tiny, tmp_path / "b.jsonl")[1]
    assert peft_meta["adapter_merged"] is False and merged_meta["adapter_merged"] is True
    assert "LoRA adapter merged" in merged_meta["semantics"]
    assert [r["generated"] for r in peft_rows] != [r["generated"] for r in base_rows], "the adapter changes nothing"
    from tunelens.models import load_tokenizer

    tokenizer = load_tokenizer(tiny[0])
    ids = lambda rows: [tokenizer(r["generated"], add_special_tokens=False)["input_ids"] for r in rows]  # noqa: E731
    agreement = token_agreement(ids(peft_rows), ids(merged_rows))
    assert agreement["exact_match"] == 1.0, agreement


def test_server_keeps_the_merged_variant_and_serves_identical_rows(tiny, tmp_path):
    model_dir, adapter_dir, test_file = tiny
    base = tmp_path / "servers"
    job = dict(test_file=str(test_file), model_name="tiny", model_path=str(model_dir), variant="finetuned",
               adapter_dir=str(adapter_dir), decoding_config=GREEDY.as_dict(), max_new_tokens=8, seed=7,
               backend="hf", device="cpu", batch_size=3, merge_adapter=True, static_cache=True)
    try:
        served = [genserver.run_generation_job(job, tmp_path / f"s{i}.jsonl", base=base, start_timeout_s=180)
                  for i in range(2)]
        alone = genserver.run_generation_job(job, tmp_path / "a.jsonl", server=False)
    finally:
        genserver.stop_servers(base)
    assert [m["execution"]["loaded"] for m in served] == [True, False]
    assert served[0]["adapter_merged"] is True and served[0]["kv_cache"] == "static"
    assert (tmp_path / "s0.jsonl").read_bytes() == (tmp_path / "s1.jsonl").read_bytes() == \
        (tmp_path / "a.jsonl").read_bytes()


def test_merged_copy_from_the_loaded_base_equals_a_merged_load_and_leaves_the_base(tiny, tmp_path, caplog):
    """A server that holds the base model makes the merged variant from a copy of those weights (no second read
    from disk): the copy's weights are bitwise those of load_model(..., merge_adapter=True), its rows are the
    in-process merged rows, the base model is untouched (its weights, its next rows), and what the server keeps
    on the base model object (its decoding graphs) is not copied."""
    import logging

    import torch

    from tunelens.generation import graphs
    from tunelens.models import load_model

    model_dir, adapter_dir, test_file = tiny
    common = dict(test_file=str(test_file), model_name="tiny", model_path=str(model_dir),
                  decoding_config=GREEDY.as_dict(), max_new_tokens=8, seed=7, backend="hf", device="cpu", batch_size=3)
    base_job = dict(common, variant="base")
    merged_job = dict(common, variant="finetuned", adapter_dir=str(adapter_dir), merge_adapter=True)
    server = server_state._Server("test", 60.0)
    try:
        base_meta, base_rows = server.generate(base_job)
        base_model = server.hf_models[(None, False)][0]
        before = {name: tensor.clone() for name, tensor in base_model.state_dict().items()}
        sentinel = object()
        base_model.__dict__[graphs.STORE_ATTRIBUTE] = sentinel
        with caplog.at_level(logging.INFO, logger="tunelens.models"):
            merged_meta, merged_rows = server.generate(merged_job)
        assert "into a copy of the loaded weights" in caplog.text
        assert merged_meta["execution"]["loaded"] is True and merged_meta["adapter_merged"] is True
        copy = server.hf_models[(str(adapter_dir), True)][0]
        assert copy is not base_model and graphs.STORE_ATTRIBUTE not in copy.__dict__
        assert base_model.__dict__[graphs.STORE_ATTRIBUTE] is sentinel
        del base_model.__dict__[graphs.STORE_ATTRIBUTE]
        reference, _ = load_model(model_dir, adapter_dir=adapter_dir, device="cpu", merge_adapter=True)
        expected = reference.state_dict()
        assert copy.state_dict().keys() == expected.keys()
        assert all(torch.equal(tensor, expected[name]) for name, tensor in copy.state_dict().items())
        assert any(not torch.equal(expected[name], before[name]) for name in before)  # the adapter did change some
        assert all(torch.equal(tensor, before[name]) for name, tensor in base_model.state_dict().items())
        again_meta, again_rows = server.generate(base_job)
        assert again_rows == base_rows and again_meta["execution"]["loaded"] is False
    finally:
        server.close()
    _, alone_rows = _generate(tiny, tmp_path / "alone.jsonl", variant="finetuned", merge_adapter=True,
                              max_new_tokens=8)
    assert json.loads(json.dumps(merged_rows)) == alone_rows


# --------------------------------------------------------------------------------------------- graphed decoding
PROMPTS = [row["instruction"] for row in ROWS]


def _tokens(model, tokenizer, decoding_config, **settings) -> list[list[int]]:
    settings = GenerationSettings(max_new_tokens=12, seed=7, batch_size=3, **settings)
    return [c.token_ids for c in hf_generate_batched(model, tokenizer, PROMPTS, decoding_config, settings)]


@pytest.fixture(scope="module")
def tiny_loaded(tiny):
    from tunelens.models import load_model

    return load_model(tiny[0], device="cpu")


def test_graphed_decoding_equals_transformers_static_cache(tiny_loaded):
    """compile_backend graphs (tunelens' own StaticCache and fixed step buffers; on CUDA the step is a replayed
    graph, on CPU the same buffers run eagerly): greedy rows equal the dynamic cache's, and sampled rows equal
    transformers' own static cache token for token (same seed, same batches): only the forward is replaced."""
    model, tokenizer = tiny_loaded
    dynamic = _tokens(model, tokenizer, GREEDY)
    assert _tokens(model, tokenizer, GREEDY, static_cache=True, compile_backend="graphs") == dynamic
    sampled = DecodingConfig(temperature=1.0, top_k=0)
    graphed = _tokens(model, tokenizer, sampled, static_cache=True, compile_backend="graphs")
    assert graphed == _tokens(model, tokenizer, sampled, static_cache=True, compile_backend="eager")
    assert graphed != _tokens(model, tokenizer, sampled)  # sampling did sample (the bucket changes the stream)
    assert "forward" not in model.__dict__, "the graphed forward outlived its generate call"


def test_graphed_decoding_keeps_one_cache_per_model(tiny_loaded):
    """The cache (and the step buffers captured against it) is made once per shape and reused by every batch and
    request of that shape; another shape replaces it; a truncated model (early exit) gets its own step."""
    from tunelens.generation import graphs
    from tunelens.probe.probe import truncated_decoder

    model, tokenizer = tiny_loaded
    graphs.release(model)
    store = graphs.decode_graphs(model)
    first = _tokens(model, tokenizer, GREEDY, static_cache=True, compile_backend="graphs")
    # 5 rows in batches of 3 and 2: row buckets 4 and 2, one cache and one step each
    assert list(store.caches) == [(4, 64), (2, 64)] and len(store.captured) == 2
    caches, steps = dict(store.caches), dict(store.captured)
    assert _tokens(model, tokenizer, GREEDY, static_cache=True, compile_backend="graphs") == first
    assert store.caches == caches and store.captured == steps  # the second request reused both
    with truncated_decoder(model, 1):
        shallow = _tokens(model, tokenizer, GREEDY, static_cache=True, compile_backend="graphs")
        assert shallow == _tokens(model, tokenizer, GREEDY)
    assert store.caches == caches and len(store.captured) == 4  # depth 1 has steps of its own, on the same caches
    held = graphs.held_bytes(model)
    assert held == (4 + 2) * 64 * kv_bytes_per_token(model)
    store.MAX_SHAPES = 2
    try:
        settings = GenerationSettings(max_new_tokens=12, seed=7, batch_size=1, static_cache=True,
                                      compile_backend="graphs")
        hf_generate_batched(model, tokenizer, PROMPTS[:1], GREEDY, settings)
        assert list(store.caches) == [(2, 64), (1, 64)]  # the least recently used shape went, with its steps
        assert all(key[0] in {id(c) for c in store.caches.values()} for key in store.captured)
    finally:
        store.MAX_SHAPES = graphs.DecodeGraphs.MAX_SHAPES
    graphs.release(model)
    assert graphs.held_bytes(model) == 0 and store.cache is None and not store.captured and not store.caches


def test_stop_strings_are_prepared_once_per_tokenizer(tiny_loaded, monkeypatch):
    """transformers rebuilds its stop-string tables on every generate call (its cache key is the vocabulary in
    get_vocab() order, which changes between calls): 0.65 s of a 1.8 s request on the H200 bench. tunelens builds
    the criterion once per tokenizer and stop strings, and the answers still end at the stop string."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    from tunelens.generation import backend_hf

    model, tokenizer = tiny_loaded
    built = []
    original = StopStringCriteria.__init__

    def counting(self, *args, **kwargs):
        built.append(kwargs.get("stop_strings"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(StopStringCriteria, "__init__", counting)
    monkeypatch.setattr(backend_hf, "_STOP_CRITERIA", type(backend_hf._STOP_CRITERIA)())
    plain = GenerationSettings(max_new_tokens=12, seed=7, batch_size=2, stop=())
    free = [c.text for c in hf_generate_batched(model, tokenizer, PROMPTS, GREEDY, plain)]
    # a stop string that the free-running answers contain (the tiny random model repeats one character): cut
    # there, with finish reason stop_string
    target = free[0].strip()[0]
    assert all(target in text for text in free)
    stopped = GenerationSettings(max_new_tokens=12, seed=7, batch_size=2, stop=(target,))
    for _ in range(2):
        completions = hf_generate_batched(model, tokenizer, PROMPTS, GREEDY, stopped)
    assert built == [[target]], "the stop-string criterion was rebuilt"
    assert any(c.finish_reason == "stop_string" for c in completions)
    assert all(target not in c.text for c in completions)


def test_sliding_window_caches_are_not_captured(tiny_model_factory):
    """A sliding-window cache layer picks its write path from a Python int each step: a replayed graph would
    repeat one step's choice. Such caches run the step eagerly (on CPU the same store, so greedy rows past the
    window still equal the dynamic cache's); plain static layers are capturable."""
    from transformers import AutoConfig, StaticCache

    from tunelens.generation.graphs import not_capturable
    from tunelens.models import load_model

    gemma_dir = tiny_model_factory("gemma3", 2)
    gemma_config = AutoConfig.from_pretrained(gemma_dir)
    assert "StaticSlidingWindowLayer" in not_capturable(StaticCache(config=gemma_config, max_cache_len=256))
    llama_config = AutoConfig.from_pretrained(tiny_model_factory("llama", 2))
    assert not_capturable(StaticCache(config=llama_config, max_cache_len=256)) is None

    model, tokenizer = load_model(gemma_dir, device="cpu")
    settings = dict(max_new_tokens=80, seed=7, batch_size=2, stop=())  # prompt + 80 tokens > the window of 64
    dynamic = [c.token_ids for c in hf_generate_batched(model, tokenizer, PROMPTS[:2], GREEDY,
                                                         GenerationSettings(**settings))]
    graphed = [c.token_ids for c in hf_generate_batched(model, tokenizer, PROMPTS[:2], GREEDY, GenerationSettings(
        **settings, static_cache=True, compile_backend="graphs"))]
    assert graphed == dynamic and max(len(ids) for ids in dynamic) == 80


def test_other_models_caches_are_released_before_planning(tiny, tiny_loaded):
    """The auto batch plan reads the free memory: a request on one model first frees the decoding caches of the
    process's other models (base and merged copy in one server), so its batches do not depend on which variant
    the server answered before."""
    from tunelens.generation import graphs
    from tunelens.models import load_model

    model, tokenizer = tiny_loaded
    other, _ = load_model(tiny[0], device="cpu")
    static = dict(static_cache=True, compile_backend="graphs")
    _tokens(model, tokenizer, GREEDY, **static)
    assert graphs.held_bytes(model) > 0
    _tokens(other, tokenizer, GREEDY, **static)
    assert graphs.held_bytes(model) == 0 and graphs.held_bytes(other) > 0
    graphs.release_all()
    assert graphs.held_bytes(other) == 0


def test_early_exit_runs_the_static_cache_when_asked_and_says_so(tiny):
    """Early exit takes generation.static_cache / compile_backend like the generate jobs (on CUDA auto = graphs):
    its sidecar names the cache, and its greedy rows at a truncated depth equal the dynamic cache's."""
    from tunelens.probe.probe import early_exit_output

    model_dir, _, test_file = tiny
    job = dict(model_name="tiny", source=str(model_dir), model_path=str(model_dir), adapter_dir=None, variant="base",
               test_path=str(test_file), layer=1, layer_specs=[1, 2], expected_layers=[1, 2], prompt_format="chat",
               decoding={"temperature": 0.0}, max_new_tokens=8, seed=7, device="cpu")
    dynamic_meta, dynamic_rows = early_exit_output(**job)  # static_cache auto: off on CPU
    static_meta, static_rows = early_exit_output(**job, static_cache=True)
    assert dynamic_meta["kv_cache"] == "dynamic" and "Static KV cache" not in dynamic_meta["semantics"]
    assert static_meta["kv_cache"] == "static" and "Static KV cache" in static_meta["semantics"]
    assert [r["generated"] for r in static_rows] == [r["generated"] for r in dynamic_rows]


def test_generation_on_cuda_leaves_out_cudnn_attention(tiny_loaded, monkeypatch):
    """cuDNN's fused attention is not reproducible run to run on the H200 (BENCHMARKS.md, issue 21): generation on
    CUDA runs inside a context that disables it and leaves the other SDPA kernels on; on CPU nothing changes. The
    sidecar says so on CUDA only."""
    import contextlib

    import torch

    from tunelens.generation import backend_hf
    from tunelens.generation.generate import speed_semantics

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with backend_hf.reproducible_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(backend_hf._FLOAT32_SCORES, "cuda", True)  # as torch >= 2.8 on CUDA (checked once per device)
    with backend_hf.reproducible_attention(torch.device("cuda")):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is backend_hf.decode_attention
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    with backend_hf.reproducible_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    # every generate call runs inside it, with the model's input device
    model, tokenizer = tiny_loaded
    entered, generate = [], model.generate
    inside = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(str(device))
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    def checked(*args, **kwargs):
        assert inside, "generate ran outside reproducible_attention"
        return generate(*args, **kwargs)

    monkeypatch.setattr(backend_hf, "reproducible_attention", recording)
    monkeypatch.setattr(model, "generate", checked)
    _tokens(model, tokenizer, GREEDY)
    assert entered == ["cpu", "cpu"]  # 5 rows in batches of 3 and 2
    assert "cuDNN" in speed_semantics("dynamic", False, "graphs", "cuda:0")
    assert speed_semantics("dynamic", False, "graphs", "cpu") == ""
    assert "cuDNN" not in speed_semantics("paged (vLLM)", False, "graphs", "cuda")  # vLLM picks its own kernels


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_decode_attention_equals_sdpa(heads, kv_heads):
    """The decoding step's attention as two batched products (what generation on CUDA runs) gives SDPA's output
    for one query per row, with boolean and additive padding masks and grouped-query heads; a prompt (several
    queries) goes to SDPA itself."""
    import torch
    from torch import nn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tunelens.generation.backend_hf import decode_attention

    torch.manual_seed(0)
    rows, dim, length = 3, 16, 11
    module = nn.Module().eval()
    module.num_key_value_groups = heads // kv_heads
    module.is_causal = True
    key = torch.randn(rows, kv_heads, length, dim)
    value = torch.randn(rows, kv_heads, length, dim)
    allowed = torch.ones(rows, 1, 1, length + 5, dtype=torch.bool)  # a longer mask is cut to the cache's length
    allowed[0, ..., :4] = False  # left padding
    allowed[1, ..., 9:] = False  # static-cache positions not written yet
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (allowed, additive, None):
        query = torch.randn(rows, heads, 1, dim)
        ours, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
        theirs, _ = sdpa_attention_forward(module, query, key, value, None if mask is None else mask[..., :length],
                                           scaling=0.3)
        assert ours.shape == theirs.shape == (rows, 1, heads, dim)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    prompt = torch.randn(rows, heads, 4, dim)
    causal = torch.ones(rows, 1, 4, length, dtype=torch.bool).tril(diagonal=length - 4)
    torch.testing.assert_close(decode_attention(module, prompt, key, value, causal)[0],
                               sdpa_attention_forward(module, prompt, key, value, causal)[0])


def test_generation_with_decode_attention_equals_sdpa(tiny_loaded):
    """Greedy generation through the decoding-step attention gives SDPA's logits at every step (float32, tiny model,
    left-padded rows) on the dynamic and the static cache, and so the same tokens; also through tunelens' graphs
    path."""
    import torch

    from tunelens.generation import backend_hf

    model, tokenizer = tiny_loaded
    encoded = tokenizer(PROMPTS[:3], return_tensors="pt", padding=True, add_special_tokens=False)
    assert not bool(encoded["attention_mask"].all())  # some rows are padded

    def run(cache):
        extra = {"cache_implementation": "static", "disable_compile": True} if cache == "static" else {}
        out = model.generate(**encoded, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, **extra)
        return out.sequences, torch.stack(out.logits)

    for cache in ("dynamic", "static"):
        sequences, logits = run(cache)
        with backend_hf._decode_attention_installed():
            ours, our_logits = run(cache)
        assert torch.equal(ours, sequences), cache
        torch.testing.assert_close(our_logits, logits, rtol=1e-5, atol=1e-5, msg=cache)
    expected = _tokens(model, tokenizer, GREEDY, static_cache=True, compile_backend="graphs")
    with backend_hf._decode_attention_installed():
        assert _tokens(model, tokenizer, GREEDY, static_cache=True, compile_backend="graphs") == expected
