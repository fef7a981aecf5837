"""Request parsing and validation for the three generation endpoints.

Bodies are checked with pydantic (types) and then with SGLang's own sampling checks
(``SamplingParams.verify``), so bad input gets a clear 400 with SGLang's message. What
the simulator cannot do (batches, n > 1, logprobs, images, ebnf, a required or named
tool_choice without a tool-call parser) is refused with
a 400 that says so, rather than silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ha_agent.config import SimSettings
from ha_agent.openapi.inference import NO_CUSTOM_LOGIT_PROCESSOR
from ha_agent.sim.chat_template import final_assistant, render_chat
from ha_agent.sim.generator import SamplingKey, StopRules
from ha_agent.sim.grammar import GrammarError, compile_constraint, constraint_from_response_format
from ha_agent.sim.reasoning import TEMPLATE_THINK, ReasoningSpec, thinking_requested
from ha_agent.sim.scheduler import GenRequest
from ha_agent.sim.tokenizer import SimTokenizer
from ha_agent.sim.tool_calls import ToolsError, ToolSpec, render_tools, tool_spec

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang SamplingParams default
DEFAULT_SEED = 0  # the simulator is always deterministic


def _refuse_unsupported(body: Any) -> None:
    """What SGLang does and the simulator cannot: refused clearly, never ignored."""
    if not isinstance(body, dict):
        return
    if body.get("custom_logit_processor"):
        raise BadRequest(NO_CUSTOM_LOGIT_PROCESSOR)
    if body.get("cache_salt") is not None:
        raise BadRequest("cache_salt is not supported by the simulator")
    params = body.get("sampling_params")
    for where in (body, params if isinstance(params, dict) else {}):
        if where.get("logit_bias"):
            raise BadRequest("logit_bias is not supported by the simulator")


class BadRequest(ValueError):
    """A 400. ``validation`` marks body/type errors (FastAPI's RequestValidationError);
    ``converting`` a ValueError of an OpenAI route's _convert_to_internal_request, which
    OpenAIServingBase.handle_request answers with type "BadRequest" (the engine's own
    ValueErrors get "BadRequestError")."""

    def __init__(self, message: str, validation: bool = False, converting: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.validation = validation
        self.converting = converting


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class SamplingParamsBody(BaseModel):
    """SGLang's sampling_params; unknown names are refused to catch typos early."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    custom_params: dict[str, Any] | None = None
    stream_interval: int | None = None
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None


class GenerateBody(_Model):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    input_embeds: Any = None
    image_data: Any = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] | None = False
    return_prompt_token_ids: bool = False


class StreamOptions(_Model):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _OpenAICommon(_Model):
    model: str = "default"
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0
    regex: str | None = None
    ebnf: str | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    no_stop_trim: bool = False
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None
    rid: str | None = None


class CompletionBody(_OpenAICommon):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    return_token_ids: bool = False
    json_schema: str | None = None

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        # Same rule and words as SGLang's CompletionRequest.
        if v is not None and v <= 0:
            raise ValueError("max_tokens must be positive")
        return v


class ChatMessageBody(_Model):
    role: Literal["system", "user", "assistant", "tool", "function", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class ChatBody(_OpenAICommon):
    messages: list[ChatMessageBody]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    continue_final_message: bool = False
    separate_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # SGLang extras (ChatCompletionRequest): the choice's prompt_token_ids,
    # response_token_ids and meta_info; non-stream only.
    return_prompt_token_ids: bool = False
    return_token_ids: bool = False
    return_meta_info: bool = False


@dataclass
class GenerateCall:
    gen: GenRequest
    stream: bool
    return_prompt_token_ids: bool = False


@dataclass
class OpenAICall:
    gen: GenRequest
    stream: bool
    model: str
    include_usage: bool
    continuous_usage: bool
    echo_text: str = ""
    reasoning: ReasoningSpec | None = None  # chat with --reasoning-parser
    tools: ToolSpec | None = None  # chat with tools (and tool_choice not none)
    return_token_ids: bool = False
    return_prompt_token_ids: bool = False  # chat
    return_meta_info: bool = False  # chat


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "Invalid request: " + "; ".join(parts)


def _parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise BadRequest("Invalid request: the body must be a JSON object", validation=True)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(_validation_message(exc), validation=True) from None


def _verify(
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    frequency_penalty: float,
    presence_penalty: float,
    repetition_penalty: float,
    min_new_tokens: int,
    max_new_tokens: int | None,
) -> None:
    """SGLang's SamplingParams.verify, same messages."""
    if not math.isfinite(temperature) or temperature < 0.0:
        raise BadRequest(f"temperature must be a non-negative finite number, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}.")
    if not 0.0 <= min_p <= 1.0:
        raise BadRequest(f"min_p must be in [0, 1], got {min_p}.")
    if top_k < 1 and top_k != -1:
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if not -2.0 <= frequency_penalty <= 2.0:
        raise BadRequest(f"frequency_penalty must be in [-2, 2], got {frequency_penalty}.")
    if not -2.0 <= presence_penalty <= 2.0:
        raise BadRequest(f"presence_penalty must be in [-2, 2], got {presence_penalty}.")
    if not 0.0 < repetition_penalty <= 2.0:
        raise BadRequest(
            f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {repetition_penalty}."
        )
    if min_new_tokens < 0:
        raise BadRequest(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}.")
    if max_new_tokens is not None:
        if max_new_tokens < 0:
            raise BadRequest(f"max_new_tokens must be at least 0, got {max_new_tokens}.")
        if min_new_tokens > max_new_tokens:
            raise BadRequest(
                f"min_new_tokens must be in [0, max_new_tokens({max_new_tokens})], "
                f"got {min_new_tokens}."
            )


class RequestBuilder:
    """Turns validated bodies into GenRequests (tokenizing, context-length checks)."""

    def __init__(self, settings: SimSettings, tokenizer: SimTokenizer) -> None:
        self.settings = settings
        self.tok = tokenizer

    def _prompt_from_ids(self, ids: list[int]) -> tuple[str, list[int]]:
        try:
            self.tok.check_ids(ids)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return self.tok.decode(ids), ids

    def _build(
        self, sp: SamplingParamsBody, prompt_text: str, prompt_ids: list[int], rid: str | None
    ) -> GenRequest:
        temp = 1.0 if sp.temperature is None else sp.temperature
        tp = 1.0 if sp.top_p is None else sp.top_p
        tk = -1 if sp.top_k is None else sp.top_k
        min_tokens = sp.min_new_tokens or 0
        _verify(
            temperature=temp,
            top_p=tp,
            top_k=tk,
            min_p=0.0 if sp.min_p is None else sp.min_p,
            frequency_penalty=sp.frequency_penalty or 0.0,
            presence_penalty=sp.presence_penalty or 0.0,
            repetition_penalty=1.0 if sp.repetition_penalty is None else sp.repetition_penalty,
            min_new_tokens=min_tokens,
            max_new_tokens=sp.max_new_tokens,
        )
        if sp.n not in (None, 1):
            raise BadRequest("n > 1 is not supported by the simulator (send n requests)")
        if sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty not in (None, 1.0):
            raise BadRequest(
                "frequency_penalty, presence_penalty and repetition_penalty are not supported "
                "by the simulator (it samples without penalties)"
            )
        if sp.stop_regex:
            raise BadRequest("stop_regex is not supported by the simulator")
        try:
            constraint = compile_constraint(sp.json_schema, sp.regex, sp.ebnf)
        except GrammarError as exc:
            raise BadRequest(str(exc)) from None
        ctx = self.settings.context_length
        n_in = len(prompt_ids)
        if n_in >= ctx:
            raise BadRequest(
                f"The input ({n_in} tokens) is longer than the model's context length "
                f"({ctx} tokens)."
            )
        # None means "no limit" (the scheduler bounds it, scheduler.clip_max_new_tokens).
        if sp.max_new_tokens is not None and n_in + sp.max_new_tokens > ctx:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {ctx} "
                f"tokens. You requested a total of {n_in + sp.max_new_tokens} tokens: {n_in} "
                f"tokens from the input messages and {sp.max_new_tokens} tokens for the "
                "completion. Please reduce the number of tokens in the input messages or the "
                "completion to fit within the limit."
            )
        stops = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
        rules = StopRules(
            stop=[s for s in stops if s],
            stop_token_ids=frozenset(sp.stop_token_ids or ()),
            # A grammar ends with EOS; ignoring it would only pad the output.
            ignore_eos=bool(sp.ignore_eos) and constraint is None,
            no_stop_trim=bool(sp.no_stop_trim),
        )
        return GenRequest(
            prompt_text=prompt_text,
            prompt_ids=prompt_ids,
            max_new_tokens=sp.max_new_tokens,
            sampling=SamplingKey(
                seed=DEFAULT_SEED if sp.sampling_seed is None else sp.sampling_seed,
                temperature=temp,
                top_p=tp,
                top_k=tk,
            ),
            rules=rules,
            min_new_tokens=min_tokens,
            constraint=constraint,
            rid=rid,
        )

    # -- POST /generate -------------------------------------------------------------
    def generate(self, body: Any) -> GenerateCall:
        req: GenerateBody = _parse(GenerateBody, body)
        _refuse_unsupported(body)
        if req.input_embeds is not None or req.image_data is not None:
            raise BadRequest("input_embeds and image_data are not supported by the simulator")
        if req.text is None and req.input_ids is None:
            raise BadRequest("Either text, input_ids or input_embeds should be provided.")
        if req.return_logprob not in (None, False):
            raise BadRequest("return_logprob is not supported by the simulator")
        batch = BadRequest("batch requests are not supported by the simulator (one per request)")
        if isinstance(req.text, list):
            if len(req.text) != 1:
                raise batch
            req.text = req.text[0]
        if req.input_ids and isinstance(req.input_ids[0], list):
            if len(req.input_ids) != 1:
                raise batch
            req.input_ids = req.input_ids[0]
        if isinstance(req.rid, list) or isinstance(req.sampling_params, list):
            raise batch
        if req.input_ids is not None:
            # With both given the ids are the prompt: TokenizerManager._tokenize_one_request
            # takes obj.input_ids and tokenizes text only without them (text decides the
            # batch size alone, GenerateReqInput._determine_batch_size).
            req.text = None
        sp: SamplingParamsBody = _parse(SamplingParamsBody, req.sampling_params or {})
        if sp.structural_tag is not None:
            raise BadRequest("structural_tag constraints are not supported by the simulator")
        if req.text is not None:
            prompt_text, prompt_ids = req.text, self.tok.encode(req.text)
        else:
            prompt_text, prompt_ids = self._prompt_from_ids(list(req.input_ids or []))  # type: ignore[arg-type]
        gen = self._build(sp, prompt_text, prompt_ids, req.rid)
        gen.stream = req.stream
        return GenerateCall(
            gen=gen, stream=req.stream, return_prompt_token_ids=req.return_prompt_token_ids
        )

    # -- POST /v1/completions -------------------------------------------------------
    def completion(self, body: Any) -> OpenAICall:
        req: CompletionBody = _parse(CompletionBody, body)
        _refuse_unsupported(body)
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise BadRequest("batch prompts are not supported by the simulator")
            prompt = prompt[0]
        if not prompt:
            raise BadRequest("Prompt cannot be empty")
        if req.logprobs is not None:
            raise BadRequest("logprobs are not supported by the simulator")
        if req.suffix:
            raise BadRequest("suffix is not supported by the simulator")
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tok.encode(prompt)
        else:
            prompt_text, prompt_ids = self._prompt_from_ids(list(prompt))
        json_schema = req.json_schema
        try:
            from_format = constraint_from_response_format(req.response_format)
        except GrammarError as exc:
            raise BadRequest(str(exc)) from None
        if from_format is not None:
            json_schema = from_format
        gen = self._openai_gen(req, prompt_text, prompt_ids, req.max_tokens, json_schema)
        call = self._call(req, gen, echo_text=prompt_text if req.echo else "")
        call.return_token_ids = req.return_token_ids
        return call

    # -- POST /v1/chat/completions --------------------------------------------------
    def chat(self, body: Any) -> OpenAICall:
        req: ChatBody = _parse(ChatBody, body)
        _refuse_unsupported(body)
        if not req.messages:
            raise BadRequest("Messages cannot be empty.")
        if req.logprobs:
            raise BadRequest("logprobs are not supported by the simulator")
        if req.stream:
            # serving_chat.py _convert_to_internal_request: SGLang's checks and words.
            if req.return_prompt_token_ids:
                raise BadRequest(
                    "return_prompt_token_ids is not supported with streaming. "
                    "Please set stream=false when using return_prompt_token_ids=true.",
                    converting=True,
                )
            if req.return_token_ids:
                raise BadRequest(
                    "return_token_ids is not supported with streaming on "
                    "/v1/chat/completions. Please set stream=false when using "
                    "return_token_ids=true.",
                    converting=True,
                )
            if req.return_meta_info:
                raise BadRequest(
                    "return_meta_info is not supported with streaming. "
                    "Please set stream=false when using return_meta_info=true.",
                    converting=True,
                )
        try:
            tools = tool_spec(req.tools, req.tool_choice, self.settings.tool_call_parser or None)
        except ToolsError as exc:
            raise BadRequest(str(exc)) from None
        messages = [m.model_dump() for m in req.messages]
        spec = None
        parser = self.settings.reasoning_parser
        if parser:
            spec = ReasoningSpec(
                parser=parser,
                thinking=thinking_requested(parser, req.chat_template_kwargs or {}),
                separate=req.separate_reasoning,
                previous=final_assistant(messages, req.continue_final_message),
            )
        think = spec.think_mode() if spec is not None else None
        try:
            prompt_text = render_chat(
                messages,
                req.continue_final_message,
                TEMPLATE_THINK[parser] if think is not None else "",
                render_tools(tools.offered) if tools is not None else "",
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        try:
            json_schema = constraint_from_response_format(req.response_format)
        except GrammarError as exc:
            raise BadRequest(str(exc)) from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        gen = self._openai_gen(
            req, prompt_text, self.tok.encode(prompt_text), max_tokens, json_schema
        )
        gen.think = think
        gen.tools = tools.offered if tools is not None else None
        call = self._call(req, gen)
        call.reasoning = spec
        call.tools = tools
        call.return_token_ids = req.return_token_ids
        call.return_prompt_token_ids = req.return_prompt_token_ids or req.return_token_ids
        call.return_meta_info = req.return_meta_info
        return call

    def _openai_gen(
        self,
        req: CompletionBody | ChatBody,
        prompt_text: str,
        prompt_ids: list[int],
        max_tokens: int | None,
        json_schema: str | None,
    ) -> GenRequest:
        # SGLang's to_sampling_params (entrypoints/openai/protocol.py): the OpenAI
        # request's fields as the engine's sampling parameters.
        sp = SamplingParamsBody.model_construct(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            repetition_penalty=req.repetition_penalty,
            min_new_tokens=req.min_tokens,
            sampling_seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            stop_regex=req.stop_regex,
            ignore_eos=req.ignore_eos,
            no_stop_trim=req.no_stop_trim,
            json_schema=json_schema,
            regex=req.regex,
            ebnf=req.ebnf,
            n=req.n,
        )
        return self._build(sp, prompt_text, prompt_ids, req.rid)

    @staticmethod
    def _call(req: CompletionBody | ChatBody, gen: GenRequest, echo_text: str = "") -> OpenAICall:
        opts = req.stream_options or StreamOptions()
        gen.stream = req.stream
        return OpenAICall(
            gen=gen,
            stream=req.stream,
            model=req.model,
            include_usage=bool(opts.include_usage),
            continuous_usage=bool(opts.continuous_usage_stats),
            echo_text=echo_text,
        )


def parse_pause_mode(body: Any) -> str:
    mode = (body or {}).get("mode", "abort") if isinstance(body, dict) else None
    if mode not in ("abort", "retract", "in_place"):
        raise BadRequest(
            f"Invalid mode: {mode!r}. Expected one of ['abort', 'retract', 'in_place'].",
            validation=True,
        )
    return str(mode)


def parse_abort(body: Any) -> tuple[str, bool]:
    if not isinstance(body, dict):
        raise BadRequest("Invalid request: the body must be a JSON object", validation=True)
    rid, abort_all = body.get("rid", ""), body.get("abort_all", False)
    if rid is None:
        rid = ""
    if not isinstance(rid, str) or not isinstance(abort_all, bool):
        raise BadRequest("rid must be a string and abort_all a boolean", validation=True)
    return rid, abort_all
