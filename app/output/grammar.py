"""Constrained decoding with llguidance: grammars for constraints, and the per-sequence logits
processor that enforces them inside the continuous batch.

llguidance was chosen by measurement (bench/RESULTS.md, "Grammar libraries"): with the demo
model's 49k-token vocabulary its masks cost less per step than outlines-core's at 10 sequences,
it compiles schemas in about a millisecond (outlines-core builds a DFA index: up to seconds),
and it enforces every one of the twenty everyday schemas (outlines-core drops number bounds,
for one). xgrammar was not a candidate: its wheel pulls in torch.

Flow: the engine checks a request's constraint before it queues (`check`, no tokenizer needed),
compiles it on the tokenizer thread (`GrammarCompiler.processor`, cached by grammar text), and
hands the processor to mlx-lm's BatchGenerator with the sequence. On the MLX thread the
processor advances its matcher with the token sampled last step and masks the next logits;
EOS is allowed only where the grammar accepts.
"""

from __future__ import annotations

import collections
import json
import threading
import weakref
from typing import Any

import llguidance
import numpy as np
import structlog

from app.core.types import Constraint, JsonConstraint, ToolCallConstraint, ToolSpec
from app.errors import InvalidRequest
from app.output.row_mask import RowMaskProcessor

log = structlog.get_logger(__name__)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# The spacing models write JSON with ({"a": 1, "b": 2}); no free whitespace, so a model can't
# spend its token budget on blank lines inside a document.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_PARALLEL_CALLS = 8
_CACHE_SIZE = 64


# --- constraint -> grammar text --------------------------------------------------------------

# An integer without bounds is capped to what a JSON parser keeps exactly (2^53 - 1): without a
# cap a small model at temperature 0 writes digits until max_tokens ("population": 1111...).
SAFE_INTEGER = 2**53 - 1
_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})


def _bounded(node: Any) -> Any:
    if isinstance(node, list):
        return [_bounded(item) for item in node]
    if not isinstance(node, dict):
        return node
    # Values under these keys are data, not schemas.
    out = {key: value if key in _DATA_KEYS else _bounded(value) for key, value in node.items()}
    kinds = out.get("type")
    if kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds):
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INTEGER
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INTEGER
    return out


def _json_lark(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({"x-guidance": _JSON_STYLE, **_bounded(schema)})


def _call_schema(tools: tuple[ToolSpec, ...], *, all_strict: bool) -> dict[str, Any]:
    """One call's JSON: {"name": <one of tools>, "arguments": <that tool's parameters>}."""
    options = []
    for tool in tools:
        arguments = tool.parameters if (all_strict or tool.strict) and tool.parameters else {
            "type": "object"}
        options.append({"type": "object",
                        "properties": {"name": {"const": tool.name}, "arguments": arguments},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar (Lark syntax) for a constraint."""
    if isinstance(constraint, JsonConstraint):
        schema = constraint.schema if constraint.schema is not None else {"type": "object"}
        return f"start: body\nbody: {_json_lark(schema)}\n"
    body = _json_lark(_call_schema(constraint.tools, all_strict=constraint.forced))
    call = f'call: "{CALL_OPEN}" body "{CALL_CLOSE}"\nbody: {body}\n'
    if not constraint.forced:
        return f"start: call\n{call}"  # armed when the model itself writes the opening marker
    # Calls follow each other directly: after `</tool_call>` the model chooses between another
    # call and the end (a newline there would be a third, likelier, choice that leads small
    # models into repeating the call until max_tokens).
    limit = min(constraint.call_limit or MAX_PARALLEL_CALLS, MAX_PARALLEL_CALLS)
    count = f"{{1,{limit}}}" if limit > 1 else ""
    return f"start: call{count}\n{call}"


def check(constraint: Constraint) -> None:
    """Refuse a constraint llguidance can't enforce (a bad schema, an unsupported keyword),
    naming the request field it came from. Cheap: no tokenizer involved."""
    if isinstance(constraint, ToolCallConstraint) and not constraint.tools:
        raise InvalidRequest(f"{constraint.param}: no tools to call", param=constraint.param)
    try:
        error = _validate(grammar_text(constraint))
    except RecursionError:
        error = "the schema is nested too deeply"
    if error:
        raise InvalidRequest(f"{constraint.param}: the schema can't be enforced: "
                             f"{_first_line(error)}", param=constraint.param)


def _first_line(error: str) -> str:
    # llguidance's message goes on with the grammar text we made up; the cause is on line one.
    line = error.strip().splitlines()[0] if error.strip() else error
    return line.split("failed to compile JSON schema: ", 1)[-1]


def _validate(grammar: str) -> str:
    try:
        return str(llguidance.LLMatcher.validate_grammar(grammar))
    except Exception as error:  # the library's message is the answer
        return str(error)


# --- per tokenizer: compiled matchers, cached --------------------------------------------------

class GrammarCompiler:
    """llguidance's view of one model's tokenizer, with compiled grammars cached by text.

    Built once per tokenizer (about a second for a 49k vocabulary), on the tokenizer thread.
    """

    def __init__(self, tokenizer: Any) -> None:
        backend = tokenizer._tokenizer.backend_tokenizer  # the HF fast tokenizer underneath
        self.eos = sorted(tokenizer.eos_token_ids)
        self.ll = llguidance.LLTokenizer(backend.to_str(), eos_token=self.eos)
        self._compiled: collections.OrderedDict[str, llguidance.LLMatcher] = (
            collections.OrderedDict())
        self._lock = threading.Lock()

    def matcher(self, grammar: str, param: str) -> llguidance.LLMatcher:
        """A fresh matcher for `grammar` (a copy of the cached compiled one)."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
        compiled = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if compiled.is_error():
            raise InvalidRequest(f"{param}: the schema can't be enforced: "
                                 f"{_first_line(compiled.get_error())}", param=param)
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def processor(self, constraint: Constraint) -> GrammarProcessor:
        matcher = self.matcher(grammar_text(constraint), constraint.param)
        if isinstance(constraint, ToolCallConstraint) and not constraint.forced:
            return TriggeredProcessor(matcher, self, limit=constraint.call_limit)
        return GrammarProcessor(matcher, self)

    def token_bytes(self, token: int) -> bytes:
        return bytes(self.ll.decode_bytes([token]))


_compilers: weakref.WeakKeyDictionary[Any, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any) -> GrammarCompiler:
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GrammarCompiler(tokenizer)
        return compiler


# --- on the MLX thread: mask the logits --------------------------------------------------------

class GrammarProcessor(RowMaskProcessor):
    """Masks one sequence's logits to what its grammar allows next (app/output/row_mask.py);
    each call after the first feeds the token sampled by the previous step to the matcher."""

    def __init__(self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler) -> None:
        self._matcher = matcher
        self._compiler = compiler
        words = (compiler.ll.vocab_size + 31) // 32
        self._mask = np.zeros(words, dtype=np.int32)
        self._failed = False

    def row_mask(self, last_token: int, vocab: int) -> np.ndarray[Any, Any] | None:
        """Which of `vocab` tokens may come next (None: any). Never raises: the decode step
        runs it for the whole batch, so a failure here ends this answer only."""
        try:
            return self._next(last_token, vocab)
        except Exception:
            log.exception("grammar_failed")
            self._failed = True
            return self._allowed(vocab)

    def _next(self, last_token: int, vocab: int) -> np.ndarray[Any, Any] | None:
        if self._started:
            self.feed(last_token)
        self._started = True
        return self._allowed(vocab)

    def feed(self, token: int) -> None:
        if not self._failed and not self._matcher.consume_token(token):
            self._failed = True
            log.warning("grammar_rejected_token", token=token, error=self._matcher.get_error())

    def _allowed(self, vocab: int) -> np.ndarray[Any, Any]:
        allowed = np.zeros(vocab, dtype=np.bool_)
        if self._failed:  # only a sampler bug gets here: end the answer rather than wander
            allowed[self._compiler.eos] = True
            return allowed
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        n = min(vocab, len(bits))
        allowed[:n] = bits[:n]  # the model's padded vocabulary rows stay masked
        return allowed


class TriggeredProcessor(GrammarProcessor):
    """A lazy grammar for tool_choice "auto": free text until the model writes `<tool_call>`,
    then the call is constrained until `</tool_call>`; after it, more free text, or only the
    end once `limit` calls were written (1 without parallel calls)."""

    def __init__(self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler, *,
                 limit: int | None) -> None:
        super().__init__(matcher, compiler)
        self._template = matcher
        self._left = limit
        self._armed = False
        self._done = False
        self._recent = b""
        self._trigger = CALL_OPEN.encode()

    def _next(self, last_token: int, vocab: int) -> np.ndarray[Any, Any] | None:
        if self._started:
            if self._armed:
                self.feed(last_token)
                if self._matcher.is_accepting() or self._failed:
                    self._armed, self._recent = False, b""
                    if self._left is not None:
                        self._left -= 1
                        self._done = self._left <= 0
            else:
                self._watch(self._compiler.token_bytes(last_token))
        self._started = True
        if self._armed:
            return self._allowed(vocab)
        if self._done:
            allowed = np.zeros(vocab, dtype=np.bool_)
            allowed[self._compiler.eos] = True
            return allowed
        return None

    def _watch(self, piece: bytes) -> None:
        self._recent = (self._recent + piece)[-64:]
        at = self._recent.find(self._trigger)
        if at < 0:
            return
        # The marker (and whatever the same token wrote after it) starts the grammar.
        self._matcher = self._template.deep_copy()
        self._failed = False
        self._armed = True
        written = self._recent[at:]
        self._recent = b""
        if not self._matcher.consume_tokens(self._compiler.ll.tokenize_bytes(written)):
            self._armed = False  # an odd split we can't follow: leave the call unconstrained
