"""What the model wrote -> what the protocols send: tool calls, reasoning and content.

Shared by every protocol, below `api/`: a request gets one `OutputParser` (see `parser.py`),
which turns the engine's raw text deltas into TextDelta / ReasoningDelta / ToolCallDelta.
"""
