"""Tool calls (`--tool-call-parser`): how the simulated model calls a tool, and how
SGLang parses the call out of the answer.

SGLang 0.5.19 (paths under ``python/sglang/srt/``):

* ``function_call/function_call_parser.py``: ``FunctionCallParser.ToolCallParserEnum``
  maps ``qwen`` and ``qwen25`` to ``Qwen25Detector``; ``parse_stream_chunk`` and
  ``parse_non_stream`` pass text through unchanged when the request has no tools;
  ``parse_stream_end`` calls the detector's ``finish``, which Qwen25Detector does not
  override (``BaseFormatDetector.finish`` releases nothing).
* ``function_call/qwen25_detector.py`` + ``base_format_detector.py``: ``Detector`` below
  is ``Qwen25Detector.parse_streaming_increment`` over
  ``BaseFormatDetector.parse_streaming_increment`` (bot ``<tool_call>\\n``, eot
  ``\\n</tool_call>``, separator ``\\n``), line for line, with ``partial_json_parser``
  as ``function_call/utils.py`` ``_partial_json_loads`` uses it; ``detect_and_parse``
  is the one-shot form (text before the first call, stripped, is the content).
  Their quirks are kept: text that sits in the buffer when ``<tool_call>\\n``
  completes is dropped (it is never sent), and text after a call's ``\\n</tool_call>``
  stays in the buffer and is never sent.
* ``entrypoints/openai/serving_chat.py``: ``_tool_call_parsing_active`` (a parser, tools,
  ``tool_choice`` not ``none``); ``_process_tool_call_stream`` sends normal text and
  each call item as ``ChatCompletionStreamResponse.model_dump_json()`` chunks (the
  name chunk carries ``id`` ``call_<24 hex>`` and ``arguments: ""``, argument chunks
  ``id``/``name`` null); ``_check_for_unstreamed_tool_args`` sends what the arguments
  still lack when the request finishes; the finish chunk says ``tool_calls`` when a
  call was sent and the request stopped (``_generate_chat_stream``);
  ``_process_tool_calls`` is the non-stream form (``finish_reason`` ``tool_calls``,
  ``matched_stop`` null). ``_validate_request`` checks ``tool_choice`` against the tools;
  ``ChatCompletionRequest.set_tool_choice_default`` (``protocol.py``) makes it
  ``auto`` when tools are given, ``none`` otherwise.

The model side: with tools in its prompt the simulated model (``generator.TokenStream``)
calls one of them, Qwen2.5's way: a few words (or none), then
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` and end of turn. The
call is fixed by the generation state at ``<tool_call>``, its arguments drawn from the
tool's JSON schema (``schema_gen.py``), so a context that already holds part of the call
continues it exactly as the original would have.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from json import JSONDecodeError, JSONDecoder
from json.decoder import WHITESPACE  # type: ignore[attr-defined]
from typing import Any

import partial_json_parser
from partial_json_parser.core.exceptions import MalformedJSON
from partial_json_parser.core.options import Allow

from ha_agent.sim.schema_gen import SchemaGenerator, SchemaUnsupported, check_schema

PARSERS = ("qwen25", "qwen")  # both Qwen25Detector
TOOL_START = "<tool_call>"
TOOL_END = "</tool_call>"
BOT = TOOL_START + "\n"  # Qwen25Detector.bot_token
EOT = "\n" + TOOL_END  # Qwen25Detector.eot_token
SEPARATOR = "\n"  # Qwen25Detector.tool_call_separator


class ToolsError(ValueError):
    """A tools / tool_choice combination SGLang answers 400 (or the simulator cannot do)."""


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: Any  # a JSON Schema


@dataclass(frozen=True)
class ToolSpec:
    """One chat request's tools: what the template renders and what the parser knows."""

    tools: tuple[Tool, ...]  # _effective_tools: the request's tools
    offered: tuple[Tool, ...]  # rendered into the prompt (a named tool_choice: that one)
    parser: str | None  # --tool-call-parser; None: the call stays in the content

    @property
    def parsing(self) -> bool:
        """serving_chat._tool_call_parsing_active (tool_choice none never gets here)."""
        return self.parser is not None

    def detector(self) -> Detector:
        return Detector(tuple(t.name for t in self.tools))


def tool_spec(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parser: str | None
) -> ToolSpec | None:
    """The request's tools as serving_chat.py handles them, or None when none apply."""
    choice = tool_choice
    if choice is None:  # ChatCompletionRequest.set_tool_choice_default
        choice = "auto" if tools is not None else "none"
    if isinstance(choice, str) and choice not in ("auto", "required", "none"):
        raise ToolsError(f"tool_choice: {choice!r} is not one of 'auto', 'required', 'none'")
    parsed = [_tool(t) for t in tools or []]
    if choice == "required" and not parsed:  # serving_chat._validate_request
        raise ToolsError("Tools cannot be empty if tool choice is set to required.")
    named = None
    if isinstance(choice, dict):
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else None
        if not isinstance(named, str):
            raise ToolsError("tool_choice: a named tool choice needs function.name")
        if not parsed:
            raise ToolsError("Tools cannot be empty if tool choice is set to a specific tool.")
        if not any(t.name == named for t in parsed):
            raise ToolsError(f"Tool '{named}' not found in tools list.")
    for tool in parsed:
        try:
            check_schema(tool.parameters)
        except SchemaUnsupported as exc:
            raise ToolsError(f"Tool '{tool.name}' parameters: {exc}") from None
    if not parsed or choice == "none":
        return None
    if parser is None and choice != "auto":
        # SGLang then constrains the output to a JSON array of calls (json_schema,
        # get_json_schema_constraint) and parses it with JsonArrayParser; not simulated.
        raise ToolsError(
            "tool_choice 'required' or a named tool without --tool-call-parser is not "
            "supported by the simulator"
        )
    offered = tuple(t for t in parsed if named is None or t.name == named)
    return ToolSpec(tools=tuple(parsed), offered=offered, parser=parser)


def _tool(raw: Any) -> Tool:
    function = raw.get("function") if isinstance(raw, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ToolsError("tools: each tool needs function.name")
    parameters = function.get("parameters") if isinstance(function, dict) else None
    if parameters is None:  # serving_chat._validate_request: a missing schema is {}
        parameters = {}
    if not isinstance(parameters, dict):
        raise ToolsError(f"Tool '{name}' parameters must be a JSON Schema object")
    return Tool(name=name, parameters=parameters)


def render_tools(tools: tuple[Tool, ...]) -> str:
    """The tools as the simulator's template writes them into the prompt."""
    listed = [{"name": t.name, "parameters": t.parameters} for t in tools]
    return json.dumps(listed, ensure_ascii=False, sort_keys=True)


def call_body(tools: tuple[Tool, ...], seed: bytes) -> str:
    """What the model writes after `<tool_call>`: the call, then `</tool_call>`; fixed by
    the generation state at `<tool_call>` (its digest, `seed`)."""
    rng = random.Random(int.from_bytes(seed, "little"))
    tool = tools[rng.randrange(len(tools))]
    schema = dict(tool.parameters)
    if not any(k in schema for k in ("type", "anyOf", "oneOf", "$ref", "enum", "const")):
        schema["type"] = "object"  # a tool's arguments are an object
    arguments = SchemaGenerator(schema, rng).generate()
    call = json.dumps({"name": tool.name, "arguments": arguments}, ensure_ascii=False)
    return "\n" + call + EOT


@dataclass
class CallItem:
    """function_call/core_types.py ToolCallItem."""

    tool_index: int
    name: str | None
    parameters: str


def new_call_id() -> str:
    """serving_chat._process_tool_call_id for every parser but kimi_k2 / kimi_k3."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_json_loads(text: str, flags: Allow) -> tuple[Any, int]:
    """function_call/utils.py _partial_json_loads."""
    try:
        return partial_json_parser.loads(text, flags), len(text)
    except (JSONDecodeError, IndexError) as e:
        msg = getattr(e, "msg", str(e))
        if "Extra data" in msg or "pop from empty list" in msg:
            start = WHITESPACE.match(text, 0).end()
            obj, end = JSONDecoder().raw_decode(text, start)
            return obj, end
        raise
    except AssertionError as e:
        raise JSONDecodeError("partial_json_parser assertion", text, 0) from e


def _is_complete_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except JSONDecodeError:
        return False


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def _ends_with_partial(buffer: str, token: str) -> int:
    """BaseFormatDetector._ends_with_partial_token."""
    for i in range(1, min(len(buffer) + 1, len(token))):
        if token.startswith(buffer[-i:]):
            return i
    return 0


class Detector:
    """Qwen25Detector's streaming and one-shot parsing (see the module doc)."""

    def __init__(self, tool_names: tuple[str, ...]) -> None:
        self._names = {name: i for i, name in enumerate(tool_names)}
        self._buffer = ""
        self.prev_tool_call_arr: list[dict[str, Any]] = []
        self.current_tool_id = -1
        self.current_tool_name_sent = False
        self.streamed_args_for_tool: list[str] = []
        self._normal_text_buffer = ""

    @staticmethod
    def has_tool_call(text: str) -> bool:
        return BOT in text

    # -- one shot: Qwen25Detector.detect_and_parse, FunctionCallParser.parse_non_stream
    def parse_whole(self, text: str) -> tuple[str, list[CallItem]]:
        idx = text.find(BOT)
        if idx == -1:
            return text, []
        normal = text[:idx].strip()
        calls: list[CallItem] = []
        start = 0
        while True:  # re.findall(bot(.*?)eot, DOTALL)
            at = text.find(BOT, start)
            if at == -1:
                break
            end = text.find(EOT, at + len(BOT))
            if end == -1:
                break
            try:
                parsed = json.loads(text[at + len(BOT) : end].strip())
            except JSONDecodeError:
                parsed = None
            if parsed is not None:
                calls.extend(self._base_json(parsed))
            start = end + len(EOT)
        return normal, calls

    def _base_json(self, action: Any) -> list[CallItem]:
        """BaseFormatDetector.parse_base_json (unknown tools skipped, the default)."""
        out = []
        for act in action if isinstance(action, list) else [action]:
            name = act.get("name") if isinstance(act, dict) else None
            if not (name and name in self._names):
                continue
            args = act.get("parameters") or act.get("arguments", {})
            out.append(CallItem(self._names[name], name, json.dumps(args, ensure_ascii=False)))
        return out

    # -- streaming: Qwen25Detector.parse_streaming_increment ---------------------------
    def parse(self, new_text: str) -> tuple[str, list[CallItem]]:
        normal, calls = self._base_increment(new_text)
        if normal:
            self._normal_text_buffer += normal
            end_token = EOT[1:]  # "</tool_call>"
            if end_token in self._normal_text_buffer:
                normal = self._normal_text_buffer.replace(end_token, "")
                self._normal_text_buffer = ""
            else:
                hold = _ends_with_partial(self._normal_text_buffer, end_token)
                if hold:
                    normal = self._normal_text_buffer[:-hold]
                    self._normal_text_buffer = self._normal_text_buffer[-hold:]
                else:
                    normal = self._normal_text_buffer
                    self._normal_text_buffer = ""
        return normal, calls

    def _base_increment(self, new_text: str) -> tuple[str, list[CallItem]]:
        """BaseFormatDetector.parse_streaming_increment."""
        self._buffer += new_text
        current = self._buffer
        if not (
            self.has_tool_call(current)
            or (self.current_tool_id > 0 and current.startswith(SEPARATOR))
        ):
            if not _ends_with_partial(self._buffer, BOT):
                normal, self._buffer = self._buffer, ""
                return normal.replace(EOT, ""), []
            return "", []
        flags = Allow.ALL if self.current_tool_name_sent else Allow.ALL & ~Allow.STR
        try:
            separator_branch = False
            if self.current_tool_id > 0 and current.startswith(SEPARATOR):
                start = len(SEPARATOR)
                separator_branch = True
            else:
                at = current.find(BOT)
                start = at + len(BOT) if at != -1 else 0
            if start >= len(current):
                return "", []
            try:
                obj, end = _partial_json_loads(current[start:], flags)
            except (MalformedJSON, JSONDecodeError):
                if separator_branch and BOT in current:
                    start = current.find(BOT) + len(BOT)
                    if start >= len(current):
                        return "", []
                    obj, end = _partial_json_loads(current[start:], flags)
                else:
                    raise
            complete = _is_complete_json(current[start : start + end])
            if not isinstance(obj, dict):
                return "", []
            if "name" in obj and obj["name"] not in self._names:
                self._buffer = ""
                self.current_tool_id = -1
                self.current_tool_name_sent = False
                if self.streamed_args_for_tool:
                    self.streamed_args_for_tool.pop()
                return "", []
            if "parameters" in obj:
                obj["arguments"] = obj["parameters"]
            call = obj
        except (MalformedJSON, JSONDecodeError):
            return "", []
        if not call:
            return "", []
        if not self.current_tool_name_sent:
            name = call.get("name")
            if not (name and name in self._names):
                return "", []
            if self.current_tool_id == -1:
                self.current_tool_id = 0
                self.streamed_args_for_tool.append("")
            while len(self.streamed_args_for_tool) <= self.current_tool_id:
                self.streamed_args_for_tool.append("")
            self.current_tool_name_sent = True
            return "", [CallItem(self.current_tool_id, name, "")]
        args = call.get("arguments")
        if args is None:
            return "", []
        sent = len(self.streamed_args_for_tool[self.current_tool_id])
        args_json = json.dumps(args, ensure_ascii=False)
        prev = None
        if self.current_tool_id < len(self.prev_tool_call_arr):
            prev = self.prev_tool_call_arr[self.current_tool_id].get("arguments")
        diff = None
        index = self.current_tool_id
        if complete:
            diff = args_json[sent:]
            self._buffer = current[start + end :]
        elif prev:
            prev_json = json.dumps(prev, ensure_ascii=False)
            if args_json != prev_json:
                diff = _common_prefix(prev_json, args_json)[sent:]
        while len(self.prev_tool_call_arr) <= self.current_tool_id:
            self.prev_tool_call_arr.append({})
        self.prev_tool_call_arr[self.current_tool_id] = call
        if complete:
            self.current_tool_name_sent = False
            self.current_tool_id += 1
        if diff is None:
            return "", []
        self.streamed_args_for_tool[index] += diff
        return "", [CallItem(index, None, diff)]

    def unstreamed_args(self) -> tuple[int, str] | None:
        """serving_chat._check_for_unstreamed_tool_args: (tool index, what its arguments
        still lack) when the request finishes."""
        if not self.prev_tool_call_arr or not self.streamed_args_for_tool:
            return None
        index = len(self.prev_tool_call_arr) - 1
        if index >= len(self.streamed_args_for_tool):
            return None
        expected = self.prev_tool_call_arr[index].get("arguments", {})
        expected_json = (
            expected if isinstance(expected, str) else json.dumps(expected, ensure_ascii=False)
        )
        actual = self.streamed_args_for_tool[index]
        rest = expected_json[len(actual) :] if expected_json.startswith(actual) else ""
        return (index, rest) if rest else None
