"""A CPU test double of vLLM 0.34.0 (the latest release on PyPI when checked, 2026-12-03) that
enforces the real API and generates with a transformers model underneath.

Read from vLLM 0.34.0's own source (`pip download --no-deps vllm==0.34.0`, wheel unpacked):
  * `vllm/entrypoints/llm.py`: `LLM.__init__(model, *, <40 keyword params>, **kwargs)` where
    `**kwargs` go to `EngineArgs(...)` (a dataclass: an unknown name is a `TypeError`);
    `generate(prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
    tokenization_kwargs=None, mm_processor_kwargs=None)`, `apply_model(func) -> list`,
    `collective_rpc(method, timeout=None, args=(), kwargs=None) -> list`,
    `sleep(level=1, mode="abort", reset_connector=True)`, `wake_up(tags=None) -> bool` (tags in
    weights / kv_cache / scheduling; scheduling resumes only when fully awake, so a request sent to a
    sleeping engine waits forever: here it raises), `reset_prefix_cache(...)`, `get_tokenizer()`.
  * `vllm/engine/arg_utils.py`: EngineArgs fields (ENGINE_ARGS_FIELDS below, 265 names); defaults
    on an 80+ GiB GPU for the LLM class: max_num_batched_tokens 16384, max_num_seqs 1024.
  * `vllm/config/scheduler.py` SchedulerConfig.verify_max_model_len: ValueError when
    max_num_batched_tokens < max_num_seqs, or < max_model_len with chunked prefill off.
  * `vllm/config/model.py` _get_and_verify_max_len: ValueError when max_model_len exceeds the
    config's max_position_embeddings (unless VLLM_ALLOW_LONG_MAX_MODEL_LEN); None = the model max.
  * `vllm/sampling_params.py`: SamplingParams is a msgspec.Struct (unknown keyword -> TypeError
    "Unexpected keyword argument"); _verify_args raises VLLMValidationError (vllm/exceptions.py, not a
    ValueError): temperature in [0, 2], top_p in (0, 1], max_tokens >= 1, n = 1 when greedy.
  * `vllm/v1/engine/input_processor.py`: a prompt of >= max_model_len tokens is a
    VLLMValidationError; `vllm/v1/core/sched/utils.py` check_stop: EOS -> finish "stop" with
    stop_reason None, a stop_token_ids hit -> stop_reason = the token id, max_tokens or
    max_model_len -> "length". Generation-config EOS ids other than the tokenizer's become
    stop_token_ids (update_from_generation_config).
  * `vllm/model_executor/models/{qwen2,llama}.py` + `utils.AutoWeightsLoader`: `load_weights(iter)`
    returns the set of loaded vLLM names (q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj), skips
    a tied lm_head, silently ignores unknown names ending in ".bias", raises ValueError on others.
  * `vllm/v1/engine/core.py` EngineCore.shutdown (via `llm.llm_engine.engine_core.shutdown()`) and
    `vllm/distributed/parallel_state.cleanup_dist_env_and_memory()` free an engine in process.

Emulated, not real: GPU memory is a budget of 1.0 shared by the live engines (an engine whose
gpu_memory_utilization does not fit next to the live ones fails at start-up like vLLM's free-memory
check); compute is fp32 on CPU; logprobs are the processed (temperature/top-p) log-probs.
`install(monkeypatch)` puts the double in sys.modules as `vllm`; `live_engines()` lists engines not
shut down.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import types
from dataclasses import dataclass, field

import torch

VLLM_VERSION = "0.34.0"

ENGINE_ARGS_FIELDS = frozenset("""
    model enable_return_routed_experts return_sampling_mask model_weights served_model_name
    tokenizer hf_config_path runner convert skip_tokenizer_init enable_prompt_embeds
    tokenizer_mode trust_remote_code allowed_local_media_path allowed_media_domains download_dir
    safetensors_load_strategy safetensors_prefetch_num_threads safetensors_prefetch_block_size
    load_format config_format dtype kv_cache_dtype seed max_model_len cudagraph_capture_sizes
    max_cudagraph_capture_size ir_op_priority distributed_executor_backend
    pipeline_parallel_size master_addr master_port nnodes node_rank distributed_timeout_seconds
    cpu_distributed_timeout_seconds numa_bind numa_bind_nodes numa_bind_cpus device_ids
    tensor_parallel_size prefill_context_parallel_size decode_context_parallel_size
    dcp_comm_backend dcp_q_replicate dcp_kv_cache_interleave_size cp_kv_cache_interleave_size
    data_parallel_size data_parallel_rank data_parallel_start_rank data_parallel_size_local
    data_parallel_address data_parallel_rpc_port data_parallel_hybrid_lb
    data_parallel_external_lb data_parallel_multi_port_external_lb data_parallel_backend
    enable_hc_sp enable_expert_parallel enable_batch_sharded_sampling enable_ep_weight_filter
    moe_backend linear_backend sparse_indexer_topk_backend all2all_backend enable_elastic_ep
    elastic_ep_max_dp_size enable_dbo ubatch_size dbo_decode_token_threshold dp_sync_interval
    dbo_prefill_token_threshold disable_nccl_for_dp_synchronization eplb_config enable_eplb
    expert_placement_strategy _api_process_count _api_process_rank max_parallel_loading_workers
    block_size enable_prefix_caching prefix_caching_hash_algo prefix_cache_retention_interval
    disable_sliding_window disable_cascade_attn offload_backend cpu_offload_gb
    cpu_offload_params offload_group_size offload_num_in_group offload_prefetch_step
    offload_params gpu_memory_utilization kv_cache_memory_bytes enable_extensible_kv_cache
    max_num_batched_tokens max_num_scheduled_tokens long_prefill_token_threshold
    long_prefill_token_threshold_adaptive max_num_seqs max_num_active_seqs
    max_num_inflight_kv_loads max_num_queued_reqs max_num_queued_tokens max_logprobs
    logprobs_mode use_fp64_gumbel enable_trace_replay disable_log_stats aggregate_engine_logging
    revision code_revision hf_token hf_overrides model_class_overrides tokenizer_revision
    quantization quantization_config allow_deprecated_quantization enforce_eager
    disable_custom_all_reduce enable_shm_tensor_arena language_model_only limit_mm_per_prompt
    enable_mm_embeds interleave_mm_strings media_io_kwargs mm_processor_kwargs
    mm_processor_cache_gb mm_processor_cache_type mm_hasher_algorithm
    mm_shm_cache_max_object_size_mb mm_encoder_only mm_encoder_tp_mode mm_encoder_attn_backend
    mm_encoder_attn_dtype mm_encoder_fp8_scale_path mm_encoder_fp8_scale_save_path
    mm_encoder_fp8_scale_save_margin io_processor_plugin renderer_num_workers skip_mm_profiling
    video_pruning_rate video_pruning_method mm_tensor_ipc mm_processor_device
    mm_ipc_gpu_memory_gb mm_device_do_normalize enable_lora max_loras max_lora_rank
    default_mm_loras fully_sharded_loras max_cpu_loras lora_dtype lora_target_modules
    enable_tower_connector_lora specialize_active_lora enable_mixed_moe_lora_format
    enable_moe_shared_loras max_lora_cls_labels ray_workers_use_nsight num_gpu_blocks_override
    model_loader_extra_config ignore_patterns enable_chunked_prefill disable_chunked_mm_input
    scheduler_reserve_full_isl prefill_schedule_interval cache_aware_admission_window
    cache_aware_admission_threshold watermark disable_hybrid_kv_cache_manager
    structured_outputs_config aux_output_config reasoning_parser reasoning_parser_plugin
    speculative_config spec_method spec_model spec_tokens watermark_config diffusion_config
    show_hidden_metrics_for_version otlp_traces_endpoint collect_detailed_traces
    per_request_spec_decode_metrics kv_cache_metrics kv_cache_metrics_sample
    custom_histogram_buckets cudagraph_metrics enable_layerwise_nvtx_tracing enable_mfu_metrics
    enable_logging_iteration_details jit_monitor_mode jit_monitor_verbose
    enable_mm_processor_stats scheduling_policy scheduler_cls pooler_config compilation_config
    attention_config engram_config mamba_config kernel_config enable_flashinfer_autotune
    monokernel worker_cls worker_extension_cls profiler_config logging_config log_level
    log_config_file kv_transfer_config kv_events_config ec_transfer_config ec_manager_config
    reasoning_config generation_config enable_sleep_mode sleep_mode_backend
    sleep_mode_offload_cudagraph sleep_preserve_parameter_names enable_cumem_allocator
    enable_nccl_comm_suspend checkpoint_prepare_on_startup override_generation_config model_impl
    attention_backend kv_cache_dtype_skip_layers mamba_cache_dtype mamba_ssm_cache_dtype
    mamba_block_size prefix_match_unit mamba_cache_mode enable_mamba_shared_prefix_checkpoint
    replayssm_buffer_len use_replayssm mamba_backend mamba_ssu_algorithm
    enable_mamba_cache_stochastic_rounding mamba_cache_philox_rounds additional_config
    use_tqdm_on_load pt_load_map_location shuffle_safetensors_files logits_processors
    async_scheduling stream_interval kv_sharing_fast_prefill swa_bounded_replay
    optimization_level performance_mode fault_tolerance_config enable_fault_tolerance
    kv_offloading_size kv_offloading_backend tokens_only shutdown_timeout watchdog_config
    weight_transfer_config fail_on_environ_validation gdn_prefill_backend kda_prefill_backend
    kda_decode_backend
""".split())
SAMPLING_PARAMS_FIELDS = frozenset("""
    n presence_penalty frequency_penalty repetition_penalty temperature watermarking top_p top_k
    min_p seed stop stop_token_ids ignore_eos max_tokens min_tokens logprobs prompt_logprobs
    prompt_logprob_token_ids prompt_logprob_start logprob_token_ids flat_logprobs detokenize
    skip_special_tokens spaces_between_special_tokens include_stop_str_in_output output_kind
    stream_interval skip_clone output_text_buffer_length structured_outputs logit_bias
    allowed_token_ids extra_args bad_words skip_reading_prefix_cache thinking_token_budget
    repetition_detection routed_experts_prompt_start trace_decode_token_ids
""".split())
LLM_INIT_KEYWORDS = frozenset("""
    runner convert tokenizer tokenizer_mode skip_tokenizer_init trust_remote_code
    allowed_local_media_path allowed_media_domains tensor_parallel_size dtype quantization
    revision tokenizer_revision chat_template seed gpu_memory_utilization cpu_offload_gb
    offload_group_size offload_num_in_group offload_prefetch_step offload_params enforce_eager
    enable_return_routed_experts return_sampling_mask disable_custom_all_reduce hf_token
    hf_overrides mm_processor_kwargs pooler_config structured_outputs_config profiler_config
    attention_config kv_cache_memory_bytes enable_extensible_kv_cache compilation_config
    quantization_config logits_processors spec_method spec_model spec_tokens
""".split())

ALLOWED_ARCHITECTURES = frozenset({"Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM",
                                   "MistralForCausalLM"})
_STACKED = ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
            (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj"))

_LIVE: list = []          # engines started and not shut down
CREATED: list = []        # every engine built in this process (kwargs recorded)


class VLLMValidationError(Exception):
    """vllm.exceptions.VLLMValidationError (a VLLMClientError, not a ValueError)."""


def live_engines() -> list:
    return [e for e in _LIVE if not e.llm_engine.engine_core.is_shut_down]


def reset() -> None:
    _LIVE.clear()
    CREATED.clear()


# -----------------------------------------------------------------------------
# SamplingParams / outputs

class SamplingParams:
    """vllm.SamplingParams 0.34.0: its field names, its defaults for the fields used, its checks."""

    def __init__(self, **kw):
        for k in kw:
            if k not in SAMPLING_PARAMS_FIELDS:
                raise TypeError(f"Unexpected keyword argument {k!r}")   # msgspec.Struct's error
        d = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=None,
                 stop_token_ids=None, ignore_eos=False, max_tokens=16, min_tokens=0, logprobs=None,
                 skip_special_tokens=True, include_stop_str_in_output=False, detokenize=True)
        d.update(kw)
        self.__dict__.update(d)
        if self.seed == -1:
            self.seed = None
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        if self.logprobs is True:
            self.logprobs = 1
        self._verify()
        if self.temperature < 1e-5:        # greedy
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def _verify(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise VLLMValidationError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise VLLMValidationError(f"seed must be an int, got {type(self.seed).__name__}")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: object
    outputs: list = field(default_factory=list)
    finished: bool = True


class LoRARequest:  # vllm.lora.request.LoRARequest (msgspec struct: name, int id, path)
    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str = "", **kw):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


# -----------------------------------------------------------------------------
# The model as the worker holds it (apply_model's argument)

class _WorkerModel(torch.nn.Module):
    """What `apply_model(func)` hands to func: load_weights with vLLM's name handling."""

    def __init__(self, hf_model, core):
        super().__init__()
        self.hf = hf_model
        self._core = core

    def load_weights(self, weights) -> set:
        if self._core.weights_asleep:
            raise RuntimeError("load_weights on sleeping weights: the copy lands in unmapped memory "
                               "(wake_up(tags=['weights']) first)")
        params = dict(self.hf.named_parameters())        # tied lm_head appears once (embed_tokens)
        tied = bool(getattr(self.hf.config, "tie_word_embeddings", False))
        loaded, n = set(), 0
        for name, t in weights:
            if tied and name.startswith("lm_head."):
                continue                                  # aliased param: skipped
            vname = name
            for a, b in _STACKED:
                if a + "." in name:
                    vname = name.replace(a + ".", b + ".")
            if name not in params:
                if name.endswith(".bias"):
                    continue                              # AutoWeightsLoader ignores stray biases
                raise ValueError(f"There is no module or parameter named {name!r} in "
                                 f"{type(self.hf).__name__}")
            p = params[name]
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(f"shape mismatch for {name}: {tuple(t.shape)} vs {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t.to(p.dtype))
            loaded.add(vname)
            n += 1
        self._core.load_calls.append(n)               # tensors per load_weights call
        return loaded


class _EngineCore:
    def __init__(self):
        self.is_shut_down = False
        self.weights_asleep = False
        self.kv_asleep = False
        self.load_calls: list[int] = []

    def shutdown(self, timeout=None):
        self.is_shut_down = True


class _LLMEngine:
    def __init__(self):
        self.engine_core = _EngineCore()


# -----------------------------------------------------------------------------
# LLM

_FREE_FRACTION = [1.0]


class LLM:
    """vllm.LLM 0.34.0's constructor and the methods this project calls."""

    def __init__(self, model: str, *, tokenizer: str | None = None, seed: int = 0,
                 gpu_memory_utilization: float | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1,
                 enforce_eager: bool = False, chat_template=None, **kwargs):
        for k in kwargs:
            if k not in ENGINE_ARGS_FIELDS and k not in LLM_INIT_KEYWORDS:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {k!r}")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        cfg = AutoConfig.from_pretrained(model)
        archs = set(getattr(cfg, "architectures", None) or [])
        if not archs & ALLOWED_ARCHITECTURES:
            raise ValueError(f"Model architectures {sorted(archs)} are not supported for now.")
        derived = int(getattr(cfg, "max_position_embeddings", 2048))
        mml = kwargs.get("max_model_len")
        if mml is None or mml == -1:
            mml = derived
        elif mml > derived and not os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
            raise ValueError(f"User-specified max_model_len ({mml}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={derived} or "
                             f"model_max_length=None in model's config.json).")
        mnbt = kwargs.get("max_num_batched_tokens") or 16384
        mns = kwargs.get("max_num_seqs") or 1024
        if mnbt < mml and kwargs.get("enable_chunked_prefill") is False:
            raise ValueError(f"max_num_batched_tokens ({mnbt}) is smaller than max_model_len ({mml}).")
        if mnbt < mns:
            raise ValueError(f"max_num_batched_tokens ({mnbt}) must be greater than or equal to "
                             f"max_num_seqs ({mns}).")
        util = 1.0 if gpu_memory_utilization is None else float(gpu_memory_utilization)
        if not 0.0 < util <= 1.0:
            raise ValueError(f"GPU memory utilization must be within (0, 1]. Got {util}.")
        held = sum(e._util for e in live_engines())
        if held + util > 1.0 + 1e-9:
            raise ValueError(f"Free memory on device cuda:0 ({1.0 - held:.2f} of 1.00 of the GPU) on "
                             f"startup is less than desired GPU memory utilization ({util}). "
                             "Decrease GPU memory utilization or reduce GPU memory used by other "
                             "processes. [test double: live engines hold the rest]")
        self.kwargs = dict(kwargs, model=model, tokenizer=tokenizer, seed=seed, dtype=dtype,
                           gpu_memory_utilization=gpu_memory_utilization)
        self._util = util
        self.max_model_len = int(mml)
        self.enable_sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        self._tok = AutoTokenizer.from_pretrained(tokenizer or model)
        self._hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        gc_eos = getattr(self._hf.generation_config, "eos_token_id", None)
        self._gen_eos = set(gc_eos if isinstance(gc_eos, (list, tuple)) else [gc_eos]) - {None}
        torch.manual_seed(seed)                     # vLLM (in process) seeds the global RNGs
        self._rng = torch.Generator().manual_seed(seed)
        self.llm_engine = _LLMEngine()
        self._model = _WorkerModel(self._hf, self.llm_engine.engine_core)
        self.n_generate_calls = 0
        _LIVE.append(self)
        CREATED.append(self)

    # --- API -----------------------------------------------------------------
    def get_tokenizer(self):
        return self._tok

    def _check_alive(self):
        if self.llm_engine.engine_core.is_shut_down:
            raise RuntimeError("engine core is shut down")

    def apply_model(self, func):
        self._check_alive()
        return [func(self._model)]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self._check_alive()
        if callable(method):
            return [method(types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self._model)),
                           *args, **(kwargs or {}))]
        raise NotImplementedError(f"test double: collective_rpc({method!r})")

    def sleep(self, level: int = 1, mode: str = "abort", reset_connector: bool = True):
        if not self.enable_sleep_mode:
            raise ValueError("Sleep mode is not enabled. Please compile vLLM with sleep mode enabled.")
        if level >= 1:
            self.llm_engine.engine_core.weights_asleep = True
            self.llm_engine.engine_core.kv_asleep = True

    def wake_up(self, tags: list[str] | None = None) -> bool:
        core = self.llm_engine.engine_core
        for t in tags or []:
            if t not in ("weights", "kv_cache", "scheduling"):
                raise ValueError(f"Unknown tag {t!r}")
        if tags is None or "weights" in tags:
            core.weights_asleep = False
        if tags is None or "kv_cache" in tags:
            core.kv_asleep = False
        return not (core.weights_asleep or core.kv_asleep)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        return True

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None,
                 priority=None, tokenization_kwargs=None, mm_processor_kwargs=None):
        self._check_alive()
        core = self.llm_engine.engine_core
        if core.weights_asleep or core.kv_asleep:
            raise RuntimeError("generate() on a sleeping engine: vLLM would wait forever (the "
                               "scheduler resumes only after wake_up of weights and kv_cache)")
        if lora_request is not None and not self.kwargs.get("enable_lora"):
            raise ValueError("LoRA is not enabled! Add enable_lora=True")
        single = isinstance(prompts, (str, dict))
        plist = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        sps = [sampling_params] * len(plist) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(sps) != len(plist):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        self.n_generate_calls += 1
        return [self._one(str(i), p, sp) for i, (p, sp) in enumerate(zip(plist, sps))]

    # --- generation ----------------------------------------------------------
    def _one(self, rid, prompt, sp):
        if isinstance(prompt, dict):
            ids, text = list(prompt["prompt_token_ids"]), prompt.get("prompt")
        else:
            ids, text = self._tok(prompt).input_ids, prompt
        if len(ids) == 0:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if len(ids) >= self.max_model_len:
            raise VLLMValidationError(f"The decoder prompt (length {len(ids)}) is longer than the "
                                      f"maximum model length of {self.max_model_len}.")
        outs = [self._sample(ids, sp, j) for j in range(sp.n)]
        return RequestOutput(rid, text, ids, None, outs)

    @torch.no_grad()
    def _sample(self, ids, sp, j):
        eos = None if sp.ignore_eos else self._tok.eos_token_id
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else self._gen_eos - {eos})
        gen = self._rng if sp.seed is None else torch.Generator().manual_seed(sp.seed * 7919 + j)
        greedy = sp.temperature < 1e-5
        cap = sp.max_tokens if sp.max_tokens is not None else self.max_model_len
        out, lps = [], []
        finish, reason = "length", None
        past, cur = None, torch.tensor([ids])
        while True:
            o = self._hf(input_ids=cur, use_cache=True, **({} if past is None else {self._cache_kw: past}))
            self._cache_kw = "cache" if "cache" in o else "past_key_values"   # transformers 5.x / 4.x
            past = o[self._cache_kw]
            logits = o.logits[0, -1].float()                                    # (V,)
            if greedy:
                logp = torch.log_softmax(logits, -1)
                t = int(logits.argmax())
            else:
                logits = logits / sp.temperature
                if sp.top_k and sp.top_k > 0:
                    kth = torch.topk(logits, min(sp.top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                if sp.top_p < 1.0:
                    srt, idx = torch.sort(logits, descending=True)
                    cum = torch.softmax(srt, -1).cumsum(-1)
                    drop = cum - torch.softmax(srt, -1) > sp.top_p
                    logits = logits.index_fill(0, idx[drop], -math.inf)
                logp = torch.log_softmax(logits, -1)
                t = int(torch.multinomial(logp.exp(), 1, generator=gen))
            out.append(t)
            lps.append({t: Logprob(float(logp[t]), 1)})
            if eos is not None and t == eos and len(out) > sp.min_tokens:
                finish = "stop"
                break
            if t in stop_ids:
                finish, reason = "stop", t
                break
            text = self._tok.decode(out, skip_special_tokens=sp.skip_special_tokens)
            hit = next((s for s in sp.stop if s in text), None)
            if hit is not None:
                finish, reason = "stop", hit
                break
            if len(out) >= cap or len(ids) + len(out) >= self.max_model_len:
                break
            cur = torch.tensor([[t]])
        text = self._tok.decode(out, skip_special_tokens=sp.skip_special_tokens)
        if isinstance(reason, str):
            k = text.find(reason)
            text = text[:k + len(reason)] if sp.include_stop_str_in_output else text[:k]
        return CompletionOutput(j, text, out, float(sum(next(iter(d.values())).logprob for d in lps)),
                                lps if sp.logprobs is not None else None, finish, reason)


# -----------------------------------------------------------------------------
# vllm.distributed.parallel_state and installation

def cleanup_dist_env_and_memory(shutdown_ray: bool = False):
    import gc
    gc.collect()


def install(monkeypatch) -> types.ModuleType:
    """Make `import vllm` (and the submodules this project uses) return the double."""
    reset()
    mods = {}
    root = types.ModuleType("vllm")
    root.__version__ = VLLM_VERSION
    root.__test_double__ = True
    root.LLM, root.SamplingParams = LLM, SamplingParams
    mods["vllm"] = root
    sp = types.ModuleType("vllm.sampling_params")
    sp.SamplingParams = SamplingParams
    mods["vllm.sampling_params"] = sp
    exc = types.ModuleType("vllm.exceptions")
    exc.VLLMValidationError = VLLMValidationError
    mods["vllm.exceptions"] = exc
    dist = types.ModuleType("vllm.distributed")
    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory
    dist.parallel_state = ps
    mods["vllm.distributed"], mods["vllm.distributed.parallel_state"] = dist, ps
    lora = types.ModuleType("vllm.lora")
    lreq = types.ModuleType("vllm.lora.request")
    lreq.LoRARequest = LoRARequest
    lora.request = lreq
    mods["vllm.lora"], mods["vllm.lora.request"] = lora, lreq
    outputs = types.ModuleType("vllm.outputs")
    outputs.RequestOutput, outputs.CompletionOutput = RequestOutput, CompletionOutput
    mods["vllm.outputs"] = outputs
    for k, m in mods.items():
        monkeypatch.setitem(sys.modules, k, m)
    return root
